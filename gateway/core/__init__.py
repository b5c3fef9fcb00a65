"""The gateway's pure core. No I/O, no asyncio, no clock of its own.

Ingest: `ingest` (the decision per message), `window` (replay), `skew`, `receipts`,
`tail`. Fusion: `track` (Kalman tracks), `multilat` (gunshot location), `anpr`
(hotlist, plate sightings), `geofence`, `picture` (the situational picture).
Next best action: `streets` (arrival times), `policy`, `decide`, `alerts` (lifecycle
and escalation), `audit` (the hash chain). Import fusion and decision names from their
modules; this package exports the ingest's."""

from gateway.core.ingest import Accepted, IngestCore, IngestCounts, Rejection
from gateway.core.receipts import ReceiptBook
from gateway.core.skew import SkewEstimator
from gateway.core.window import Observation, ReplayWindow, Verdict

__all__ = [
    "Accepted",
    "IngestCore",
    "IngestCounts",
    "Observation",
    "ReceiptBook",
    "Rejection",
    "ReplayWindow",
    "SkewEstimator",
    "Verdict",
]
