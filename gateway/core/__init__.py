"""The gateway's pure core: replay window, clock-skew estimate, the ingest decision and
the `tail` line format. No I/O, no asyncio, no clock of its own."""

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
