"""The gateway's pure core: replay window, clock-skew estimate, the ingest decision and
the `tail` line format. No I/O, no asyncio, no clock of its own."""

from gateway.core.alerts import AlertBook, AlertError, AlertOut, AlertState, Change
from gateway.core.decide import Choice, IncidentView, PassedOver, Recommendation, UnitView, recommend
from gateway.core.ingest import Accepted, IngestCore, IngestCounts, Rejection
from gateway.core.policy import Policy, PolicyError, Rule, default_policy, load_policy, parse_policy
from gateway.core.receipts import ReceiptBook
from gateway.core.skew import SkewEstimator
from gateway.core.streets import Eta, EtaModel, KindSpeed, StraightLineEta, StreetEta, StreetGraph
from gateway.core.window import Observation, ReplayWindow, Verdict

__all__ = [
    "Accepted",
    "AlertBook",
    "AlertError",
    "AlertOut",
    "AlertState",
    "Change",
    "Choice",
    "Eta",
    "EtaModel",
    "IncidentView",
    "KindSpeed",
    "PassedOver",
    "Policy",
    "PolicyError",
    "Recommendation",
    "Rule",
    "StraightLineEta",
    "StreetEta",
    "StreetGraph",
    "UnitView",
    "default_policy",
    "load_policy",
    "parse_policy",
    "recommend",
    "IngestCore",
    "IngestCounts",
    "Observation",
    "ReceiptBook",
    "Rejection",
    "ReplayWindow",
    "SkewEstimator",
    "Verdict",
]
