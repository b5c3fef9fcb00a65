"""The situation's durable state as plain data, and the small codecs it needs. Pure: no
I/O; the shell (`gateway.persist`) stores the records and hands them back.

A snapshot is a JSON-safe mapping (only dicts, lists, str, int, float, bool, None)::

    {"version": 1,
     "meta":      {"next_incident", "seen_recv_ms", "geofences": {...}},
     "incidents": {incident_id: {"picture": {...}, "alerts": {...} | None, "recommendation": {...} | None}},
     "units":     {unit_id: {"state", "online", "status_seq", "incident_id", "battery", "last_seen_ms"}}}

One record per incident and per unit, so the shell can rewrite only what changed
(`Situation.take_state_changes`). `version` is checked on restore; a snapshot of another
version, or one that does not parse, raises `SnapshotError` and nothing is restored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.core.decide import Choice, IncidentView, PassedOver, Recommendation
from gateway.core.policy import Rule

SNAPSHOT_VERSION = 1
#: A recommendation's `passed_over` list is kept to this many entries when saved (with
#: thousands of units it would otherwise be the bulk of the state).
PASSED_OVER_KEPT = 100

Record = dict[str, Any]


class SnapshotError(ValueError):
    """Saved state that cannot be restored; the message says where and why."""


@dataclass
class StateChanges:
    """The durable records that changed since the last call: a record to write, or None
    to delete it. `meta` is None when it did not change."""

    meta: Record | None = None
    incidents: dict[str, Record | None] = field(default_factory=dict)
    units: dict[str, Record | None] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.meta is not None or bool(self.incidents) or bool(self.units)

    def then(self, newer: StateChanges) -> StateChanges:
        """These changes followed by `newer` (newer wins), e.g. to retry a failed write."""
        return StateChanges(newer.meta if newer.meta is not None else self.meta,
                            {**self.incidents, **newer.incidents}, {**self.units, **newer.units})


def check_version(data: Mapping[str, Any]) -> None:
    version = data.get("version")
    if version != SNAPSHOT_VERSION:
        raise SnapshotError(f"saved state has version {version!r}; this gateway reads version {SNAPSHOT_VERSION}")


def obj(value: Any, where: str) -> Mapping[str, Any]:
    """`value` as a mapping, or `SnapshotError` naming `where`."""
    if not isinstance(value, Mapping):
        raise SnapshotError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def seq(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise SnapshotError(f"{where}: expected a list, got {type(value).__name__}")
    return list(value)


# -- decide/policy values -----------------------------------------------------------------------------


def rule_record(rule: Rule) -> Record:
    return {f.name: sorted(v) if isinstance(v := getattr(rule, f.name), frozenset) else v
            for f in dataclasses.fields(rule)}


def rule_from(data: Mapping[str, Any]) -> Rule:
    """A rule as saved (validated again by `Rule` itself)."""
    known = {f.name: f for f in dataclasses.fields(Rule)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        f = known.get(key)
        if f is None:
            raise SnapshotError(f"rule: unknown field {key!r}")
        values[key] = frozenset(seq(value, f"rule.{key}")) if isinstance(f.default, frozenset) else value
    return Rule(**values)


def view_record(view: IncidentView) -> Record:
    return {"id": view.id, "type": view.type, "lat": view.lat, "lon": view.lon, "t_ms": view.t_ms,
            "subject": view.subject, "detail": dict(view.detail)}


def view_from(data: Mapping[str, Any]) -> IncidentView:
    return IncidentView(str(data["id"]), str(data["type"]), float(data["lat"]), float(data["lon"]),
                        int(data["t_ms"]), subject=data.get("subject"), detail=dict(obj(data["detail"], "detail")))


def recommendation_record(rec: Recommendation) -> Record:
    return {
        "incident_id": rec.incident_id, "incident_type": rec.incident_type, "rule": rec.rule,
        "lat": rec.lat, "lon": rec.lon, "made_ms": rec.made_ms, "reason": rec.reason,
        "chosen": [dataclasses.asdict(c) for c in rec.chosen],
        "passed_over": [dataclasses.asdict(p) for p in rec.passed_over[:PASSED_OVER_KEPT]],
    }


def recommendation_from(data: Mapping[str, Any]) -> Recommendation:
    chosen = []
    for item in seq(data["chosen"], "recommendation.chosen"):
        c = dict(obj(item, "recommendation.chosen[]"))
        c["capabilities_matched"] = tuple(seq(c["capabilities_matched"], "capabilities_matched"))
        c["reasons"] = tuple(seq(c["reasons"], "reasons"))
        chosen.append(Choice(**c))
    passed = [PassedOver(**obj(p, "recommendation.passed_over[]")) for p in seq(data["passed_over"], "passed_over")]
    return Recommendation(str(data["incident_id"]), str(data["incident_type"]), data["rule"], float(data["lat"]),
                          float(data["lon"]), int(data["made_ms"]), tuple(chosen), tuple(passed),
                          str(data.get("reason", "")))


__all__ = [
    "PASSED_OVER_KEPT",
    "SNAPSHOT_VERSION",
    "Record",
    "SnapshotError",
    "StateChanges",
    "check_version",
    "obj",
    "recommendation_from",
    "recommendation_record",
    "rule_from",
    "rule_record",
    "seq",
    "view_from",
    "view_record",
]
