"""Fuse, decide, alert: the picture, the policy and the alert book as one state machine.

    situation = Situation(picture, policy, eta_model)
    out = situation.observe(records, now_ms)     # stored messages in
    out.sends     # alerts to sign and publish (AlertOut)
    out.deltas    # picture and alert changes for the dashboard
    out.audit     # records for the audit log
    situation.tick(now_ms)                      # timeouts, escalations, unlocated shots

A new incident is decided at once (`decide.recommend` under the policy) and its alerts
opened; officers' answers move the alerts and the units (accepted -> committed,
arrived -> at_scene); unanswered alerts escalate on `tick`. Operators open incidents,
override (reassign or cancel) and close them. Pure: `now_ms` is passed in.

Durable state (`gateway.core.snapshot`): `export_state()` is the whole of it as plain
data, `take_state_changes()` the records changed since the last call (for the shell to
write), `restore_state(data)` puts it back after a restart: incidents (open, and closed
ones still shown), their alerts with history, slots, escalation counts and absolute
timeouts, recommendations, units' states and commitments, geofence state and the
incident counter. Tracks are not saved: they are rebuilt from fixes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from certs.auditchain import AuditRecord
from gateway.core.alerts import AlertBook, AlertError, AlertOut, AlertState, Change, RecommendAgain
from gateway.core.decide import IncidentView, Recommendation, recommend
from gateway.core.picture import Delta, Picture, StoredMessage, Update, feature
from gateway.core.policy import Policy
from gateway.core.snapshot import (
    SNAPSHOT_VERSION,
    Record,
    SnapshotError,
    StateChanges,
    check_version,
    obj,
    recommendation_from,
    recommendation_record,
)
from gateway.core.streets import EtaModel

GATEWAY = "gateway"
#: Message kinds that can change durable state without a picture delta: when one is
#: seen, the watermark (`seen_recv_ms`) is saved, so a restart replays only later ones.
DURABLE_KINDS = frozenset({"event", "ack", "status"})
#: What an alert's state does to the unit that holds it.
UNIT_STATE_FOR = {AlertState.ACCEPTED: "committed", AlertState.ARRIVED: "at_scene"}


@dataclass
class Output:
    """What one call changed: alerts to publish, deltas to stream, records to audit,
    and acks that were refused (counted by reason)."""

    sends: list[AlertOut] = field(default_factory=list)
    withdrawn: list[tuple[str, str]] = field(default_factory=list)
    deltas: list[Delta] = field(default_factory=list)
    audit: list[AuditRecord] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)


class Situation:
    """Not thread-safe: one owner (the gateway's event loop) calls it."""

    def __init__(self, picture: Picture, policy: Policy, eta_model: EtaModel) -> None:
        self.picture = picture
        self.policy = policy
        self.eta_model = eta_model
        self.alerts = AlertBook()
        self.recommendations: dict[str, Recommendation] = {}
        #: The latest gateway receive time of any message observed (the replay watermark).
        self.seen_recv_ms = 0
        self._dirty_incidents: set[str] = set()
        self._dirty_units: set[str] = set()
        self._dirty_meta = False

    # -- inputs ------------------------------------------------------------------------------

    def observe(self, messages: Iterable[StoredMessage], now_ms: int) -> Output:
        out = Output()
        for message in messages:
            self.seen_recv_ms = max(self.seen_recv_ms, message.recv_ms)
            if message.kind in DURABLE_KINDS:
                self._dirty_meta = True
                if message.kind == "status":
                    self._dirty_units.add(message.device_id)
            self._apply(self.picture.observe(message, now_ms), now_ms, out)
        return out

    def tick(self, now_ms: int, *, watched: bool = True) -> Output:
        """Time passing; with `watched`, also the deltas of the units and sensors that
        messages changed since the last tick (for the stream)."""
        out = Output(deltas=self.picture.take_changes(now_ms, build=watched))
        self._apply(self.picture.tick(now_ms), now_ms, out)
        self.alerts.tick(now_ms, self._again(now_ms))
        self._changes(now_ms, out)
        return out

    def create_incident(
        self, type_: str, lat: float, lon: float, now_ms: int, *, by: str, note: str = "", subject: str | None = None
    ) -> tuple[str, Output]:
        """An operator's incident; decided and alerted like any other."""
        update = self.picture.open_incident(type_, lat, lon, now_ms, by=by, note=note, subject=subject)
        out = Output(audit=[AuditRecord("incident.created", by, update.new_incidents[0],
                                        {"type": type_, "lat": lat, "lon": lon, "note": note}, now_ms)])
        self._apply(update, now_ms, out, by=by)
        return update.new_incidents[0], out

    def override(
        self, target: str, operator: str, now_ms: int, *, reason: str, new_unit_id: str | None = None,
        cancel: bool = False,
    ) -> Output:
        """Reassign an alert or incident to `new_unit_id`, or cancel it. Raises
        `AlertError` (subclasses say why) for a bad target."""
        self.alerts.override(target, operator, now_ms, reason=reason, new_unit_id=new_unit_id, cancel=cancel)
        out = Output(audit=[AuditRecord("alert.override", operator, target,
                                        {"reason": reason, "new_unit_id": new_unit_id, "cancel": cancel}, now_ms)])
        self._changes(now_ms, out)
        return out

    def close_incident(self, incident_id: str, by: str, now_ms: int, *, reason: str = "") -> Output:
        if incident_id not in self.picture.incidents:
            raise KeyError(incident_id)
        out = Output()
        self._close(incident_id, by, now_ms, reason, out)
        return out

    def _close(self, incident_id: str, by: str, now_ms: int, reason: str, out: Output) -> None:
        if self.alerts.alerts_for(incident_id):  # cancel what is open, stop escalating
            self.alerts.override(incident_id, by, now_ms, reason=reason or "closed", cancel=True)
            self._changes(now_ms, out)
        closed = self.picture.close_incident(incident_id, now_ms)
        self._mark(closed.deltas)
        out.deltas += closed.deltas
        out.audit.append(AuditRecord("incident.closed", by, incident_id, {"reason": reason}, now_ms))

    # -- views -------------------------------------------------------------------------------

    def alert_json(self, alert_id: str) -> dict[str, Any]:
        view = self.alerts.alert(alert_id)
        return {
            "alert_id": view.alert_id, "incident_id": view.incident_id, "unit_id": view.unit_id,
            "role": view.role, "attempt": view.attempt, "state": view.state.value, "expires_ts": view.expires_ts,
            "history": [{"state": h.state.value, "ts": h.ts_ms, "by": h.by} for h in view.history],
        }

    # -- durable state -----------------------------------------------------------------------

    def export_state(self) -> Record:
        """Everything a restarted gateway needs, as plain data (`gateway.core.snapshot`)."""
        units = {u: r for u in self.picture.units if (r := self.picture.export_unit(u)) is not None}
        return {"version": SNAPSHOT_VERSION, "meta": self._meta_record(),
                "incidents": {i: self._incident_record(i) for i in self.picture.incidents}, "units": units}

    def take_state_changes(self) -> StateChanges:
        """The records changed since the last call (None: delete it); the meta record
        comes with any change."""
        incidents, self._dirty_incidents = self._dirty_incidents, set()
        units, self._dirty_units = self._dirty_units, set()
        changes = StateChanges(None, {i: self._incident_record(i) for i in sorted(incidents)},
                               {u: self.picture.export_unit(u) for u in sorted(units)})
        if changes or self._dirty_meta:
            changes.meta = self._meta_record()
        self._dirty_meta = False
        return changes

    def restore_state(self, data: Record) -> dict[str, int]:
        """Put back what `export_state` gave (on a fresh situation, before any message).
        Raises `SnapshotError` and changes nothing if any part does not parse. Returns
        counts for the log."""
        check_version(data)
        meta, incidents, units = (obj(data.get(k), k) for k in ("meta", "incidents", "units"))
        pictures: dict[str, Any] = {}
        books: dict[str, Any] = {}
        recs: dict[str, Recommendation] = {}
        try:
            seen = int(meta.get("seen_recv_ms", 0))
            for incident_id, item in incidents.items():
                record = obj(item, f"incident {incident_id}")
                pictures[incident_id] = record["picture"]
                if record.get("alerts") is not None:
                    books[incident_id] = record["alerts"]
                if record.get("recommendation") is not None:
                    recs[incident_id] = recommendation_from(obj(record["recommendation"], "recommendation"))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, SnapshotError):
                raise
            raise SnapshotError(f"incidents: bad or missing {exc}") from None
        book = AlertBook.restore(books)
        missing = set(book.incident_ids()) - set(pictures)
        if missing:
            raise SnapshotError(f"alerts saved for incidents that are not: {sorted(missing)}")
        self.picture.restore_state(meta, pictures, units)  # last: it changes nothing unless all parse
        self.alerts, self.recommendations = book, recs
        self.seen_recv_ms = max(self.seen_recv_ms, seen)
        return {"incidents": len(pictures),
                "open": sum(i.status != "closed" for i in self.picture.incidents.values()),
                "alerts": sum(len(book.alerts_for(i)) for i in book.incident_ids()),
                "unanswered": len(book.unanswered()), "units": len(units)}

    def _meta_record(self) -> Record:
        return {**self.picture.export_meta(), "seen_recv_ms": self.seen_recv_ms}

    def _incident_record(self, incident_id: str) -> Record | None:
        picture = self.picture.export_incident(incident_id)
        if picture is None:
            return None
        rec = self.recommendations.get(incident_id)
        return {"picture": picture, "alerts": self.alerts.export_incident(incident_id),
                "recommendation": None if rec is None else recommendation_record(rec)}

    def _mark(self, deltas: Iterable[Delta]) -> None:
        for delta in deltas:
            if delta.layer == "incidents":
                self._dirty_incidents.add(delta.id)
            elif delta.layer == "units":
                self._dirty_units.add(delta.id)

    # -- plumbing ----------------------------------------------------------------------------

    def _again(self, now_ms: int) -> RecommendAgain:
        def again(incident: IncidentView, exclude: frozenset[str]) -> Recommendation:
            rec = recommend(incident, self.picture.unit_views(now_ms), self.policy, self.eta_model, now_ms,
                            exclude=exclude)
            self.recommendations[incident.id] = rec
            self._dirty_incidents.add(incident.id)
            return rec

        return again

    def _apply(self, update: Update, now_ms: int, out: Output, *, by: str = GATEWAY) -> None:
        out.deltas += update.deltas
        self._mark(update.deltas)
        self._dirty_incidents.update(update.new_incidents, update.forgotten)
        if update.new_incidents:
            self._dirty_meta = True
        for incident_id in update.new_incidents:
            incident = self.picture.incidents[incident_id]
            view = incident.view()
            out.audit.append(AuditRecord("incident.opened", by, incident_id,
                                         {"type": incident.type, "lat": incident.lat, "lon": incident.lon,
                                          "subject": incident.subject, "sources": list(incident.sources)}, now_ms))
            rule = self.policy.rule_for(incident.type)
            if rule is None:
                out.flags.append(f"{incident_id}: no policy rule for {incident.type!r}")
                continue
            rec = self._again(now_ms)(view, frozenset())
            out.audit.append(AuditRecord("decision.made", GATEWAY, incident_id, _decision(rec), now_ms))
            self.alerts.open_incident_alerts(view, rec, rule, now_ms, alternatives_shown=self.policy.alternatives_shown)
            self._changes(now_ms, out)
        for incident_id in update.cleared:
            self._close(incident_id, GATEWAY, now_ms, "the last attending unit is available again", out)
        for incident_id in update.forgotten:
            self.alerts.forget(incident_id)
            self.recommendations.pop(incident_id, None)
            out.deltas.append(Delta("incidents", incident_id, "remove", None))
        for answer in update.answers:
            try:
                self.alerts.on_ack(answer.unit_id, answer.alert_id, answer.answer, now_ms, reason=answer.reason,
                                   recommend_again=self._again(now_ms))
            except AlertError as exc:
                out.refused.append((exc.reason, str(exc)))
            self._changes(now_ms, out)

    def _changes(self, now_ms: int, out: Output) -> None:
        """Everything the alert book did since the last call: audit it, publish what it
        sends, move the units it concerns."""
        for change in self.alerts.take_audit():
            self._dirty_incidents.add(change.incident_id)
            out.audit.append(AuditRecord(_action(change), change.by, change.alert_id or change.incident_id,
                                         change.audit(), change.ts_ms))
            if change.send is not None:
                out.sends.append(change.send)
            if change.withdraw and change.unit_id is not None and change.alert_id is not None:
                out.withdrawn.append((change.unit_id, change.alert_id))
            if change.flag is not None:
                out.flags.append(f"{change.incident_id}: {change.flag}")
            if change.alert_id is not None:
                out.deltas.append(self._alert_delta(change.alert_id))
            if change.unit_id is not None and change.state is not None:
                state = UNIT_STATE_FOR.get(change.state)
                if state is not None:
                    out.deltas.append(self.picture.set_state(change.unit_id, state, now_ms,
                                                             incident_id=change.incident_id))
                    self._dirty_units.add(change.unit_id)
                elif change.state in (AlertState.OVERRIDDEN, AlertState.CANCELLED):
                    unit = self.picture.units.get(change.unit_id)
                    if unit is not None and unit.incident_id == change.incident_id:
                        out.deltas.append(self.picture.set_state(change.unit_id, "available", now_ms))
                        self._dirty_units.add(change.unit_id)

    def _alert_delta(self, alert_id: str) -> Delta:
        return Delta("alerts", alert_id, "upsert", feature("alert", alert_id, None, None, self.alert_json(alert_id)))


def _action(change: Change) -> str:
    if change.state is None:
        return "alert.flagged"
    return f"alert.{change.state.value}"


def _decision(rec: Recommendation) -> dict[str, Any]:
    return {
        "chosen": [{"unit": c.unit_id, "why": c.why, "eta_s": round(c.eta_s, 1)} for c in rec.chosen],
        "passed_over": [{"unit": p.unit_id, "why": p.why} for p in rec.passed_over[:10]],
        "reason": rec.reason,
    }
