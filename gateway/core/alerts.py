"""The alert lifecycle, as a state machine with an injected clock: every call takes
`now_ms`; nothing here reads a clock, sends a message or sleeps.

    created -> sent -> delivered -> accepted -> arrived
                 \\         \\-> declined -> escalated      (a new alert to the next-best unit)
                  \\-> timed_out ----------> escalated
    sent / delivered / accepted -> overridden | cancelled   (an operator)

One incident holds one *slot* per unit its recommendation chose (responders, then a
supervisor). An alert that times out or is declined is escalated once: its slot gets a
new alert, to the next-best unit not yet asked, at most `max_escalations` times per
slot; past that, or when nobody qualifies, the control room is flagged. Roles nobody
could take when the incident opened are offered again every `REFILL_EVERY_MS` to units
that have become available since, while the incident is open. Alert ids are
`<incident>-a<n>`, n counting every alert made for the incident, so they are
deterministic. Every transition is a `Change`, returned to the caller and kept for the
audit log (`take_audit`); each alert keeps its history of (state, ts, by).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from edge_agent.wire.model import ANSWERS
from gateway.core.decide import Choice, IncidentView, Recommendation, render, template_values
from gateway.core.policy import Rule
from gateway.core.snapshot import Record, SnapshotError, obj, rule_from, rule_record, seq, view_from, view_record

GATEWAY = "gateway"
#: How often an incident that could not get all the units its rule asks for looks for
#: units that have become available since.
REFILL_EVERY_MS = 10_000

#: Ask the decision again for an incident, leaving out these units (used to escalate).
RecommendAgain = Callable[[IncidentView, frozenset[str]], Recommendation]


class AlertState(StrEnum):
    CREATED = "created"
    SENT = "sent"
    DELIVERED = "delivered"
    ACCEPTED = "accepted"
    DECLINED = "declined"
    ARRIVED = "arrived"
    TIMED_OUT = "timed_out"
    ESCALATED = "escalated"
    OVERRIDDEN = "overridden"
    CANCELLED = "cancelled"


S = AlertState
#: Waiting for an answer: these time out.
AWAITING = frozenset({S.SENT, S.DELIVERED})
#: The unit holds the alert: an operator may override or cancel it.
ACTIVE = frozenset({S.SENT, S.DELIVERED, S.ACCEPTED})
_NEXT: Mapping[AlertState, frozenset[AlertState]] = {
    S.CREATED: frozenset({S.SENT}),
    S.SENT: frozenset({S.DELIVERED, S.ACCEPTED, S.DECLINED, S.ARRIVED, S.TIMED_OUT, S.OVERRIDDEN, S.CANCELLED}),
    S.DELIVERED: frozenset({S.ACCEPTED, S.DECLINED, S.ARRIVED, S.TIMED_OUT, S.OVERRIDDEN, S.CANCELLED}),
    S.ACCEPTED: frozenset({S.ARRIVED, S.DECLINED, S.OVERRIDDEN, S.CANCELLED}),
    S.DECLINED: frozenset({S.ESCALATED}),
    S.TIMED_OUT: frozenset({S.ESCALATED}),
    S.ARRIVED: frozenset(),
    S.ESCALATED: frozenset(),
    S.OVERRIDDEN: frozenset(),
    S.CANCELLED: frozenset(),
}
#: The answer an ack carries, as the state it moves the alert to.
_ANSWER_STATE = {"received": S.DELIVERED, "accepted": S.ACCEPTED, "declined": S.DECLINED, "arrived": S.ARRIVED}


# -- errors ----------------------------------------------------------------------------------------


class AlertError(ValueError):
    """An ack or override the book refuses. `reason` is a short code to count."""

    reason = "alert_error"

    def __init__(self, detail: str, *, alert_id: str | None = None, unit_id: str | None = None) -> None:
        super().__init__(detail)
        self.detail, self.alert_id, self.unit_id = detail, alert_id, unit_id


class UnknownAlert(AlertError):
    reason = "unknown_alert"


class WrongUnit(AlertError):
    """An ack from a unit the alert was not sent to."""

    reason = "wrong_unit"


class AlertClosed(AlertError):
    """An ack for an alert that no longer stands (escalated, overridden, cancelled, ...)."""

    reason = "alert_closed"

    def __init__(self, detail: str, *, state: AlertState, alert_id: str | None = None,
                 unit_id: str | None = None) -> None:
        super().__init__(detail, alert_id=alert_id, unit_id=unit_id)
        self.state = state


class BadAnswer(AlertError):
    reason = "bad_answer"


class AmbiguousTarget(AlertError):
    """An override by incident id when the incident has several alerts: name one."""

    reason = "ambiguous_target"


# -- values ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlertOut:
    """An alert for the dispatcher to sign and publish to `unit_id`. `body` is the data
    model `alert` body (it passes `validate_body("alert", body)`)."""

    alert_id: str
    incident_id: str
    unit_id: str
    action: str
    lat: float
    lon: float
    reasons: tuple[str, ...]
    expires_ts: int
    alternatives: tuple[Mapping[str, Any], ...]
    role: str
    attempt: int
    body: Mapping[str, Any]


@dataclass(frozen=True)
class HistoryEntry:
    state: AlertState
    ts_ms: int
    by: str


@dataclass(frozen=True)
class Change:
    """One transition (or a control-room flag without one, when `alert_id` is None).
    `send`: a new alert to publish; `withdraw`: tell `unit_id` its alert no longer
    stands; `flag`: what the control room must see."""

    ts_ms: int
    incident_id: str
    alert_id: str | None
    unit_id: str | None
    state: AlertState | None
    previous: AlertState | None
    by: str
    why: str
    send: AlertOut | None = None
    withdraw: bool = False
    flag: str | None = None

    def audit(self) -> dict[str, Any]:
        """The record for the audit log: who, what, when, why."""
        what = "flag" if self.state is None else f"{self.previous or 'new'} -> {self.state}"
        out: dict[str, Any] = {
            "ts": self.ts_ms, "who": self.by, "what": what, "why": self.why,
            "incident_id": self.incident_id, "alert_id": self.alert_id, "unit_id": self.unit_id,
        }
        if self.flag is not None:
            out["flag"] = self.flag
        return out


@dataclass
class _Alert:
    alert_id: str
    incident_id: str
    unit_id: str
    slot: int
    attempt: int
    expires_ts: int
    out: AlertOut
    state: AlertState = S.CREATED
    history: list[HistoryEntry] = field(default_factory=list)


@dataclass
class _Slot:
    role: str
    alerts: list[str] = field(default_factory=list)
    escalations: int = 0
    pending: bool = False  # its alert timed out or was declined, not yet escalated
    exhausted: bool = False


@dataclass
class _Incident:
    incident: IncidentView
    rule: Rule
    lat: float
    lon: float
    alternatives_shown: int
    slots: list[_Slot] = field(default_factory=list)
    attempts: int = 0
    closed: bool = False
    #: Roles the recommendation could not fill (too few units qualified), and when to
    #: look again for units that have become available since.
    unfilled: list[str] = field(default_factory=list)
    next_refill_ms: int = 0


@dataclass(frozen=True)
class AlertView:
    """A read-only view of one alert for the API: where it stands and how it got there."""

    alert_id: str
    incident_id: str
    unit_id: str
    role: str
    attempt: int
    state: AlertState
    expires_ts: int
    history: tuple[HistoryEntry, ...]


# -- the book ---------------------------------------------------------------------------------------


class AlertBook:
    """Every incident's alerts and their lifecycle. Not thread-safe: one owner calls it."""

    def __init__(self) -> None:
        self._incidents: dict[str, _Incident] = {}
        self._alerts: dict[str, _Alert] = {}
        self._audit: list[Change] = []

    # -- reading -------------------------------------------------------------------------------

    def alert(self, alert_id: str) -> AlertView:
        a = self._get(alert_id)
        slot = self._incidents[a.incident_id].slots[a.slot]
        return AlertView(a.alert_id, a.incident_id, a.unit_id, slot.role, a.attempt, a.state, a.expires_ts,
                         tuple(a.history))

    def alerts_for(self, incident_id: str) -> list[AlertView]:
        return [self.alert(a) for a in sorted(self._alerts, key=_alert_order) if
                self._alerts[a].incident_id == incident_id]

    def history(self, alert_id: str) -> tuple[HistoryEntry, ...]:
        return tuple(self._get(alert_id).history)

    def unanswered(self) -> list[AlertView]:
        """Alerts still waiting for an answer (the control room's 'who has not answered')."""
        return [self.alert(a.alert_id) for a in self._alerts.values() if a.state in AWAITING]

    def unreceived(self, now_ms: int) -> list[AlertOut]:
        """Alerts sent that no device has acknowledged yet and that have not expired, in
        order: after a restart they are published again (the gateway cannot know whether
        it published them before it stopped; a device takes an alert id once)."""
        return [a.out for a in sorted(self._alerts.values(), key=lambda a: _alert_order(a.alert_id))
                if a.state is S.SENT and a.expires_ts > now_ms]

    def forget(self, incident_id: str) -> None:
        """Drop a closed incident's alerts from memory (they are in the audit log)."""
        self._incidents.pop(incident_id, None)
        for alert_id in [a for a, alert in self._alerts.items() if alert.incident_id == incident_id]:
            del self._alerts[alert_id]

    # -- saving and restoring (plain data, see gateway.core.snapshot) -----------------------

    def incident_ids(self) -> list[str]:
        return list(self._incidents)

    def export_incident(self, incident_id: str) -> Record | None:
        """One incident's alerts, slots and escalation state as plain data (None: it has
        none). Times are absolute, so a restored book times out and escalates where this
        one would have."""
        inc = self._incidents.get(incident_id)
        if inc is None:
            return None
        alerts = [self._alerts[a] for s in inc.slots for a in s.alerts]
        return {
            "incident": view_record(inc.incident), "rule": rule_record(inc.rule), "lat": inc.lat, "lon": inc.lon,
            "alternatives_shown": inc.alternatives_shown, "attempts": inc.attempts, "closed": inc.closed,
            "unfilled": list(inc.unfilled), "next_refill_ms": inc.next_refill_ms,
            "slots": [{"role": s.role, "alerts": list(s.alerts), "escalations": s.escalations, "pending": s.pending,
                       "exhausted": s.exhausted} for s in inc.slots],
            "alerts": [{"alert_id": a.alert_id, "unit_id": a.unit_id, "slot": a.slot, "attempt": a.attempt,
                        "expires_ts": a.expires_ts, "state": a.state.value, "body": dict(a.out.body),
                        "history": [[h.state.value, h.ts_ms, h.by] for h in a.history]} for a in alerts],
        }

    @classmethod
    def restore(cls, records: Mapping[str, Mapping[str, Any]]) -> AlertBook:
        """A book from `export_incident` records by incident id. Raises `SnapshotError`
        (nothing half-restored: the caller gets a whole book or none)."""
        book = cls()
        for incident_id, record in records.items():
            try:
                inc, alerts = _incident_from(obj(record, f"alerts of {incident_id}"))
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                if isinstance(exc, SnapshotError):
                    raise SnapshotError(f"alerts of incident {incident_id}: {exc}") from None
                raise SnapshotError(f"alerts of incident {incident_id}: bad or missing {exc!s}") from None
            if inc.incident.id != incident_id:
                raise SnapshotError(f"alerts of incident {incident_id} name incident {inc.incident.id}")
            clash = set(alerts) & set(book._alerts)
            if clash:
                raise SnapshotError(f"alert ids saved twice: {sorted(clash)}")
            book._incidents[incident_id] = inc
            book._alerts.update(alerts)
        return book

    def take_audit(self) -> list[Change]:
        """Every change since the last call, whichever method made it, oldest first."""
        out, self._audit = self._audit, []
        return out

    # -- opening -------------------------------------------------------------------------------

    def open_incident_alerts(self, incident: IncidentView, recommendation: Recommendation, rule: Rule,
                             now_ms: int, *, alternatives_shown: int = 3) -> list[AlertOut]:
        """Make one alert per chosen unit (state `sent`: handed to the dispatcher to
        publish). With nobody chosen, the control room is flagged with the reason."""
        if incident.id in self._incidents:
            raise AlertError(f"incident {incident.id} already has alerts; use tick or override", alert_id=None)
        inc = _Incident(incident, rule, recommendation.lat, recommendation.lon, alternatives_shown)
        self._incidents[incident.id] = inc
        outs: list[AlertOut] = []
        changes: list[Change] = []
        for choice in recommendation.chosen:
            slot = len(inc.slots)
            inc.slots.append(_Slot(choice.role))
            outs.append(self._issue(inc, slot, changes, now_ms=now_ms, by=GATEWAY, why=choice.why, choice=choice,
                                    rec=recommendation))
        if recommendation.reason:
            changes.append(Change(now_ms, incident.id, None, None, None, None, GATEWAY, recommendation.reason,
                                  flag=f"{incident.type} {incident.id}: {recommendation.reason}"))
        responders = sum(c.role == "responder" for c in recommendation.chosen)
        inc.unfilled = ["responder"] * max(0, rule.count - responders)
        if rule.supervisor and not any(c.role == "supervisor" for c in recommendation.chosen):
            inc.unfilled.insert(0, "supervisor")
        inc.next_refill_ms = now_ms + REFILL_EVERY_MS
        self._audit.extend(changes)
        return outs

    def _refill(self, inc: _Incident, now_ms: int, again: RecommendAgain) -> list[Change]:
        """Ask units that have become available for the roles nobody could take when the
        incident opened (checked every REFILL_EVERY_MS while it is open)."""
        inc.next_refill_ms = now_ms + REFILL_EVERY_MS
        asked = {self._alerts[a].unit_id for s in inc.slots for a in s.alerts}
        rec = again(inc.incident, frozenset(asked))
        changes: list[Change] = []
        for role in list(inc.unfilled):
            pick = _pick(rec, role, asked)
            if pick is None:
                continue
            inc.unfilled.remove(role)
            asked.add(pick.unit_id)
            slot = len(inc.slots)
            inc.slots.append(_Slot(role))
            self._issue(inc, slot, changes, now_ms=now_ms, by=GATEWAY, why=pick.why, choice=pick, rec=rec,
                        extra_reasons=("became available after the incident opened",))
        return changes

    def _issue(self, inc: _Incident, slot: int, changes: list[Change], *, now_ms: int, by: str, why: str,
               choice: Choice | None = None, rec: Recommendation | None = None, unit_id: str | None = None,
               extra_reasons: Sequence[str] = ()) -> AlertOut:
        inc.attempts += 1
        incident = inc.incident
        alert_id = f"{incident.id}-a{inc.attempts}"
        unit = choice.unit_id if choice is not None else unit_id
        assert unit is not None
        expires = now_ms + round(inc.rule.timeout_s * 1000)
        if choice is not None:
            action, reasons = choice.action, (*extra_reasons, *choice.reasons)
        else:
            values = template_values(incident, (inc.lat, inc.lon)) | {"unit": unit, "approach": ""}
            action, reasons = render(inc.rule.action, values), tuple(extra_reasons)
        shown = inc.alternatives_shown
        alternatives = tuple(p.as_dict() for p in rec.passed_over[:shown]) if rec is not None else ()
        body: dict[str, Any] = {
            "alert_id": alert_id, "incident_id": incident.id, "action": action,
            "lat": inc.lat, "lon": inc.lon, "reasons": list(reasons), "expires_ts": expires,
            "alternatives": [dict(a) for a in alternatives], "incident_type": incident.type,
            "role": inc.slots[slot].role,
        }
        if choice is not None:
            body["eta_s"] = round(choice.eta_s)
            if choice.approach:
                body["route_hint"] = {"approach": choice.approach}
        unc = incident.detail.get("uncertainty_m")
        if isinstance(unc, int | float) and not isinstance(unc, bool) and 0 <= unc <= 1e6:
            body["acc"] = float(unc)
        out = AlertOut(alert_id, incident.id, unit, action, inc.lat, inc.lon, tuple(reasons), expires,
                       alternatives, inc.slots[slot].role, inc.attempts, body)
        alert = _Alert(alert_id, incident.id, unit, slot, inc.attempts, expires, out)
        self._alerts[alert_id] = alert
        inc.slots[slot].alerts.append(alert_id)
        alert.history.append(HistoryEntry(S.CREATED, now_ms, by))
        changes.append(Change(now_ms, incident.id, alert_id, unit, S.CREATED, None, by, why))
        changes.append(self._move(alert, S.SENT, now_ms, by, "handed to the dispatcher", send=out))
        return out

    def _move(self, alert: _Alert, state: AlertState, now_ms: int, by: str, why: str, *,
              send: AlertOut | None = None, withdraw: bool = False, flag: str | None = None) -> Change:
        if state not in _NEXT[alert.state]:
            raise AssertionError(f"{alert.alert_id}: {alert.state} -> {state} is not a transition")
        previous = alert.state
        alert.state = state
        alert.history.append(HistoryEntry(state, now_ms, by))
        return Change(now_ms, alert.incident_id, alert.alert_id, alert.unit_id, state, previous, by, why,
                      send=send, withdraw=withdraw, flag=flag)

    def _get(self, alert_id: str) -> _Alert:
        alert = self._alerts.get(alert_id)
        if alert is None:
            raise UnknownAlert(f"no alert {alert_id!r}", alert_id=alert_id)
        return alert

    # -- answers -------------------------------------------------------------------------------

    def on_ack(self, unit_id: str, alert_id: str, answer: str, now_ms: int, *, reason: str = "",
               recommend_again: RecommendAgain | None = None) -> list[Change]:
        """Apply an officer's ack. A repeated answer is a no-op (MQTT redelivers); a late
        `received` after an answer is ignored. A decline is escalated at once if
        `recommend_again` is given, else at the next `tick`. Raises `UnknownAlert`,
        `WrongUnit`, `BadAnswer` or `AlertClosed`."""
        alert = self._alerts.get(alert_id)
        if alert is None:
            raise UnknownAlert(f"no alert {alert_id!r}", alert_id=alert_id, unit_id=unit_id)
        if unit_id != alert.unit_id:
            raise WrongUnit(f"alert {alert_id} was sent to {alert.unit_id}, not {unit_id}",
                            alert_id=alert_id, unit_id=unit_id)
        if answer not in ANSWERS:
            raise BadAnswer(f"answer must be one of {', '.join(sorted(ANSWERS))}, got {answer!r}",
                            alert_id=alert_id, unit_id=unit_id)
        state = _ANSWER_STATE[answer]
        if state == alert.state:
            return []
        if state is S.DELIVERED and alert.state in {S.ACCEPTED, S.ARRIVED, S.DECLINED}:
            return []  # the receipt overtook by the answer
        if state not in _NEXT[alert.state]:
            raise AlertClosed(f"alert {alert_id} is {alert.state}; {answer!r} no longer applies",
                              state=alert.state, alert_id=alert_id, unit_id=unit_id)
        why = f"{answer} by the officer" + (f": {reason}" if reason else "")
        changes = [self._move(alert, state, now_ms, unit_id, why)]
        if state is S.DECLINED:
            inc = self._incidents[alert.incident_id]
            inc.slots[alert.slot].pending = True
            if recommend_again is not None:
                changes += self._escalate(inc, alert.slot, now_ms, recommend_again)
        self._audit.extend(changes)
        return changes

    # -- time ----------------------------------------------------------------------------------

    def tick(self, now_ms: int, recommend_again: RecommendAgain) -> list[Change]:
        """Time out unanswered alerts whose `expires_ts` has come and escalate each timed-out
        or declined alert once. Calling it again at the same or a later time does nothing
        more for those alerts."""
        changes: list[Change] = []
        for alert in sorted(self._alerts.values(), key=lambda a: (a.expires_ts, _alert_order(a.alert_id))):
            if alert.state in AWAITING and now_ms >= alert.expires_ts:
                inc = self._incidents[alert.incident_id]
                changes.append(self._move(alert, S.TIMED_OUT, now_ms, GATEWAY,
                                          f"no answer in {inc.rule.timeout_s:g} s", withdraw=True))
                inc.slots[alert.slot].pending = True
        for incident_id in sorted(self._incidents):
            inc = self._incidents[incident_id]
            # supervisors first, so a supervisor is not used up as a mere responder
            order = sorted(range(len(inc.slots)), key=lambda n: (inc.slots[n].role != "supervisor", n))
            for n in order:
                if inc.slots[n].pending:
                    changes += self._escalate(inc, n, now_ms, recommend_again)
            if inc.unfilled and not inc.closed and now_ms >= inc.next_refill_ms:
                changes += self._refill(inc, now_ms, recommend_again)
        self._audit.extend(changes)
        return changes

    def _escalate(self, inc: _Incident, slot_no: int, now_ms: int, again: RecommendAgain) -> list[Change]:
        slot = inc.slots[slot_no]
        slot.pending = False
        old = self._alerts[slot.alerts[-1]]
        incident = inc.incident
        what = "declined" if old.state is S.DECLINED else f"not answered in {inc.rule.timeout_s:g} s"
        if inc.closed:
            return []
        if slot.escalations >= inc.rule.max_escalations:
            slot.exhausted = True
            why = f"{old.unit_id} {what}; {inc.rule.max_escalations} escalation(s) used: the control room must assign"
            return [Change(now_ms, incident.id, old.alert_id, old.unit_id, None, None, GATEWAY, why,
                           flag=f"{incident.type} {incident.id}: {why}")]
        asked = frozenset(self._alerts[a].unit_id for s in inc.slots for a in s.alerts)
        rec = again(incident, asked)
        pick = _pick(rec, slot.role, asked)
        if pick is None:
            slot.exhausted = True
            why = f"{old.unit_id} {what}; no other {slot.role} qualifies"
            if rec.reason:
                why += f" ({rec.reason})"
            return [Change(now_ms, incident.id, old.alert_id, old.unit_id, None, None, GATEWAY, why,
                           flag=f"{incident.type} {incident.id}: {why}")]
        slot.escalations += 1
        why = f"{old.unit_id} {what}; escalated to {pick.unit_id} ({slot.escalations}/{inc.rule.max_escalations})"
        changes = [self._move(old, S.ESCALATED, now_ms, GATEWAY, why, flag=f"{incident.type} {incident.id}: {why}")]
        self._issue(inc, slot_no, changes, now_ms=now_ms, by=GATEWAY, why=pick.why, choice=pick, rec=rec,
                    extra_reasons=(f"escalated: {old.unit_id} {what}",))
        return changes

    # -- operators -----------------------------------------------------------------------------

    def override(self, target: str, operator_id: str, now_ms: int, *, reason: str,
                 new_unit_id: str | None = None, cancel: bool = False) -> list[Change]:
        """An operator reassigns an alert to `new_unit_id`, or cancels it (`cancel=True`).
        `target` is an alert id, or an incident id: cancelling an incident cancels all its
        alerts and stops escalation; reassigning one needs it to hold exactly one active
        alert (else `AmbiguousTarget`), or none (then the unit is added to it)."""
        if cancel == (new_unit_id is not None):
            raise AlertError("override needs exactly one of new_unit_id or cancel")
        if not reason.strip():
            raise AlertError("an override needs a reason (it goes in the audit log)")
        by = f"operator:{operator_id}"
        changes: list[Change] = []
        if target in self._alerts:
            alert = self._alerts[target]
            inc = self._incidents[alert.incident_id]
            if alert.state not in ACTIVE and not (new_unit_id and alert.state in {S.TIMED_OUT, S.DECLINED}):
                raise AlertClosed(f"alert {target} is {alert.state}", state=alert.state, alert_id=target)
            if cancel:
                changes.append(self._move(alert, S.CANCELLED, now_ms, by, reason, withdraw=True))
            else:
                assert new_unit_id is not None
                changes += self._reassign(inc, alert, new_unit_id, now_ms=now_ms, by=by, reason=reason)
        elif target in self._incidents:
            inc = self._incidents[target]
            active = [self._alerts[a] for s in inc.slots for a in s.alerts if self._alerts[a].state in ACTIVE]
            if cancel:
                inc.closed = True
                for slot in inc.slots:
                    slot.pending = False
                changes += [self._move(a, S.CANCELLED, now_ms, by, reason, withdraw=True) for a in active]
                changes.append(Change(now_ms, inc.incident.id, None, None, None, None, by,
                                      f"incident cancelled: {reason}"))
            else:
                assert new_unit_id is not None
                if len(active) > 1:
                    raise AmbiguousTarget(f"incident {target} has {len(active)} active alerts "
                                          f"({', '.join(a.alert_id for a in active)}): name one")
                if active:
                    changes += self._reassign(inc, active[0], new_unit_id, now_ms=now_ms, by=by, reason=reason)
                else:
                    self._check_free(inc, new_unit_id)
                    free = [n for n, s in enumerate(inc.slots) if s.exhausted or s.pending or not s.alerts]
                    slot_no = free[0] if free else len(inc.slots)
                    if not free:
                        inc.slots.append(_Slot("responder"))
                    inc.slots[slot_no].pending = inc.slots[slot_no].exhausted = False
                    inc.closed = False
                    self._issue(inc, slot_no, changes, now_ms=now_ms, by=by, why=reason, unit_id=new_unit_id,
                                extra_reasons=(f"assigned by operator {operator_id}: {reason}",))
        else:
            raise UnknownAlert(f"no alert or incident {target!r}", alert_id=target)
        self._audit.extend(changes)
        return changes

    def _check_free(self, inc: _Incident, unit_id: str) -> None:
        for slot in inc.slots:
            for a in slot.alerts:
                alert = self._alerts[a]
                if alert.unit_id == unit_id and alert.state in ACTIVE:
                    raise AlertError(f"{unit_id} already holds {a} for incident {inc.incident.id}",
                                     alert_id=a, unit_id=unit_id)

    def _reassign(self, inc: _Incident, alert: _Alert, new_unit_id: str, *, now_ms: int, by: str,
                  reason: str) -> list[Change]:
        self._check_free(inc, new_unit_id)
        changes: list[Change] = []
        why = f"reassigned from {alert.unit_id} to {new_unit_id}: {reason}"
        if alert.state in ACTIVE:
            changes.append(self._move(alert, S.OVERRIDDEN, now_ms, by, why, withdraw=True))
        else:  # timed out or declined, awaiting escalation: the operator's choice replaces it
            changes.append(self._move(alert, S.ESCALATED, now_ms, by, why))
        slot = inc.slots[alert.slot]
        slot.pending = slot.exhausted = False
        self._issue(inc, alert.slot, changes, now_ms=now_ms, by=by, why=reason, unit_id=new_unit_id,
                    extra_reasons=(f"assigned by operator {by.removeprefix('operator:')}: {reason}",))
        return changes


def _incident_from(data: Mapping[str, Any]) -> tuple[_Incident, dict[str, _Alert]]:
    view = view_from(obj(data["incident"], "incident"))
    inc = _Incident(view, rule_from(obj(data["rule"], "rule")), float(data["lat"]), float(data["lon"]),
                    int(data["alternatives_shown"]), attempts=int(data["attempts"]), closed=bool(data["closed"]),
                    unfilled=[str(r) for r in seq(data["unfilled"], "unfilled")],
                    next_refill_ms=int(data["next_refill_ms"]))
    for item in seq(data["slots"], "slots"):
        s = obj(item, "slots[]")
        inc.slots.append(_Slot(str(s["role"]), [str(a) for a in seq(s["alerts"], "slot alerts")],
                               int(s["escalations"]), bool(s["pending"]), bool(s["exhausted"])))
    alerts: dict[str, _Alert] = {}
    for item in seq(data["alerts"], "alerts"):
        a = obj(item, "alerts[]")
        alert_id, unit, slot_no = str(a["alert_id"]), str(a["unit_id"]), int(a["slot"])
        body = dict(obj(a["body"], f"{alert_id}.body"))
        slot = inc.slots[slot_no]
        out = AlertOut(alert_id, view.id, unit, str(body["action"]), float(body["lat"]), float(body["lon"]),
                       tuple(str(r) for r in seq(body["reasons"], "reasons")), int(a["expires_ts"]),
                       tuple(dict(obj(x, "alternatives[]")) for x in seq(body["alternatives"], "alternatives")),
                       slot.role, int(a["attempt"]), body)
        history = [HistoryEntry(AlertState(h[0]), int(h[1]), str(h[2])) for h in seq(a["history"], "history")]
        alerts[alert_id] = _Alert(alert_id, view.id, unit, slot_no, int(a["attempt"]), int(a["expires_ts"]), out,
                                  AlertState(a["state"]), history)
    listed = [a for s in inc.slots for a in s.alerts]
    if sorted(listed) != sorted(alerts) or len(set(listed)) != len(listed):
        raise SnapshotError(f"slots list alerts {sorted(listed)} but {sorted(alerts)} are saved")
    for alert in alerts.values():
        if alert.alert_id not in inc.slots[alert.slot].alerts:
            raise SnapshotError(f"alert {alert.alert_id} is not in its slot {alert.slot}")
    return inc, alerts


def _pick(rec: Recommendation, role: str, asked: Iterable[str]) -> Choice | None:
    skip = set(asked)
    for choice in rec.chosen:
        if choice.unit_id in skip:
            continue
        if role == "supervisor" and not (choice.role == "supervisor" or choice.supervisor):
            continue
        if role == "responder" and choice.role != "responder":
            continue
        return choice
    return None


def _alert_order(alert_id: str) -> tuple[str, int]:
    head, _, n = alert_id.rpartition("-a")
    return (head, int(n)) if n.isdigit() else (alert_id, 0)


def outgoing(changes: Iterable[Change]) -> list[AlertOut]:
    """The alerts among `changes` that the dispatcher must publish."""
    return [c.send for c in changes if c.send is not None]


__all__ = [
    "ACTIVE",
    "AWAITING",
    "AlertBook",
    "AlertClosed",
    "AlertError",
    "AlertOut",
    "AlertState",
    "AlertView",
    "AmbiguousTarget",
    "BadAnswer",
    "Change",
    "HistoryEntry",
    "RecommendAgain",
    "UnknownAlert",
    "WrongUnit",
    "outgoing",
]
