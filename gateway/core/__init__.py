"""The gateway's pure core: replay window, clock-skew estimate, the ingest decision,
the `tail` line format and fusion (tracks, gunshot location, ANPR hotlist, geofences).
No I/O, no asyncio, no clock of its own."""

from gateway.core.anpr import Hotlist, HotlistEntry, HotlistError, HotlistHit, PlateSightings, Sighting
from gateway.core.geofence import GeofenceError, GeofenceEvent, GeofenceMonitor, Polygon, Zone
from gateway.core.ingest import Accepted, IngestCore, IngestCounts, Rejection
from gateway.core.multilat import Detection, GunshotFix, MultilatError, locate
from gateway.core.receipts import ReceiptBook
from gateway.core.skew import SkewEstimator
from gateway.core.track import BadFix, FusionError, StreetMap, Track, TrackEstimate
from gateway.core.window import Observation, ReplayWindow, Verdict

__all__ = [
    "Accepted",
    "BadFix",
    "Detection",
    "FusionError",
    "GeofenceError",
    "GeofenceEvent",
    "GeofenceMonitor",
    "GunshotFix",
    "Hotlist",
    "HotlistEntry",
    "HotlistError",
    "HotlistHit",
    "IngestCore",
    "IngestCounts",
    "MultilatError",
    "Observation",
    "PlateSightings",
    "Polygon",
    "ReceiptBook",
    "Rejection",
    "ReplayWindow",
    "Sighting",
    "SkewEstimator",
    "StreetMap",
    "Track",
    "TrackEstimate",
    "Verdict",
    "Zone",
    "locate",
]
