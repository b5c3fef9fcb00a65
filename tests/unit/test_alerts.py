"""The alert lifecycle with an injected clock: bodies fit the data model, acks move the
state, the wrong officer is refused, a timeout escalates exactly once however often the
clock ticks, a decline escalates at once, escalation stops at the policy's limit, and
operators override with a record of who, what, when and why."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.wire.model import validate_body
from gateway.core.alerts import (
    AlertBook,
    AlertClosed,
    AlertState,
    AmbiguousTarget,
    BadAnswer,
    UnknownAlert,
    WrongUnit,
    outgoing,
)
from gateway.core.decide import IncidentView, Recommendation, UnitView, recommend
from gateway.core.policy import default_policy
from gateway.core.streets import Eta, Placed

NOW = 1_767_225_600_000
POLICY = default_policy()
S = AlertState


class FixedEta:
    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds

    def etas(self, units: Sequence[Placed], lat: float, lon: float) -> dict[str, Eta]:
        return {u.id: Eta(self.seconds[u.id], 10 * self.seconds[u.id]) for u in units if u.id in self.seconds}


UNITS = [UnitView(f"u{i}", "vehicle", 51.5, -0.12) for i in range(1, 6)]
ETA = FixedEta({f"u{i}": 10.0 * i for i in range(1, 6)})
INCIDENT = IncidentView("inc-7", "operator", 51.5, -0.12, NOW)
RULE = POLICY.rules["operator"]  # 1 unit, 60 s, 2 escalations


def again(incident: IncidentView, exclude: frozenset[str]) -> Recommendation:
    return recommend(incident, UNITS, POLICY, ETA, NOW, exclude=exclude)


def opened(incident: IncidentView = INCIDENT) -> tuple[AlertBook, str]:
    book = AlertBook()
    rec = again(incident, frozenset())
    outs = book.open_incident_alerts(incident, rec, POLICY.rule_for(incident.type) or RULE, NOW)
    return book, outs[0].alert_id


def test_alerts_fit_the_data_model_and_explain_themselves() -> None:
    book = AlertBook()
    rec = again(INCIDENT, frozenset())
    (out,) = book.open_incident_alerts(INCIDENT, rec, RULE, NOW)
    assert (out.alert_id, out.unit_id, out.expires_ts) == ("inc-7-a1", "u1", NOW + 60_000)
    validate_body("alert", out.body)
    assert out.body["reasons"][0].startswith("ETA 10 s")
    assert [a["unit_id"] for a in out.alternatives] == ["u2", "u3", "u4"]
    assert out.alternatives[0]["why"] == "ETA 20 s vs 10 s"
    assert [h.state for h in book.history(out.alert_id)] == [S.CREATED, S.SENT]
    audit = [c.audit() for c in book.take_audit()]
    assert [a["what"] for a in audit] == ["new -> created", "created -> sent"]
    assert audit[0]["who"] == "gateway"
    assert book.take_audit() == []


def test_acks_move_the_alert_along() -> None:
    book, aid = opened()
    assert book.on_ack("u1", aid, "received", NOW + 500)[0].state is S.DELIVERED
    assert book.on_ack("u1", aid, "received", NOW + 600) == []  # redelivered
    assert book.on_ack("u1", aid, "accepted", NOW + 2_000)[0].state is S.ACCEPTED
    assert book.on_ack("u1", aid, "received", NOW + 2_100) == []  # receipt overtaken by the answer
    assert book.tick(NOW + 3_600_000, again) == []  # accepted alerts do not time out
    assert book.on_ack("u1", aid, "arrived", NOW + 90_000)[0].state is S.ARRIVED
    assert [(h.state, h.by) for h in book.history(aid)][2:] == [
        (S.DELIVERED, "u1"), (S.ACCEPTED, "u1"), (S.ARRIVED, "u1")]


def test_acks_from_the_wrong_officer_or_for_unknown_alerts_are_rejected() -> None:
    book, aid = opened()
    with pytest.raises(WrongUnit) as info:
        book.on_ack("u2", aid, "accepted", NOW)
    assert (info.value.reason, info.value.unit_id) == ("wrong_unit", "u2")
    with pytest.raises(UnknownAlert):
        book.on_ack("u1", "inc-7-a99", "accepted", NOW)
    with pytest.raises(BadAnswer):
        book.on_ack("u1", aid, "maybe", NOW)
    assert book.alert(aid).state is S.SENT


def _escalations(changes: list) -> int:  # type: ignore[type-arg]
    return sum(1 for c in changes if c.state is S.ESCALATED)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 200_000), min_size=1, max_size=40))
def test_a_timeout_escalates_exactly_once_however_often_the_clock_ticks(offsets: list[int]) -> None:
    book, aid = opened()
    changes = []
    for t in sorted(offsets):
        changes += book.tick(NOW + t, again)
    changes += book.tick(NOW + 60_000, again)
    first_round = [c for c in changes if c.alert_id == aid]
    assert _escalations(first_round) == 1
    assert sum(1 for c in first_round if c.state is S.TIMED_OUT) == 1
    timed_out = next(c for c in first_round if c.state is S.TIMED_OUT)
    assert timed_out.ts_ms >= NOW + 60_000  # never before the timeout
    assert book.alert(aid).state is S.ESCALATED
    assert book.alert("inc-7-a2").unit_id == "u2"


def test_timeout_escalates_to_the_next_best_flags_the_control_room_and_stops_at_the_limit() -> None:
    book, _ = opened()
    assert book.tick(NOW + 59_999, again) == []
    changes = book.tick(NOW + 60_000, again)
    assert [(c.alert_id, c.state) for c in changes] == [
        ("inc-7-a1", S.TIMED_OUT), ("inc-7-a1", S.ESCALATED), ("inc-7-a2", S.CREATED), ("inc-7-a2", S.SENT)]
    assert changes[0].withdraw
    assert changes[1].flag == "operator inc-7: u1 not answered in 60 s; escalated to u2 (1/2)"
    (new,) = outgoing(changes)
    assert new.unit_id == "u2"
    assert new.reasons[0] == "escalated: u1 not answered in 60 s"
    validate_body("alert", new.body)
    book.tick(NOW + 120_000, again)  # u2 times out -> u3 (2/2)
    assert book.alert("inc-7-a3").unit_id == "u3"
    last = book.tick(NOW + 180_000, again)  # u3 times out: the limit is reached
    assert [c.state for c in last] == [S.TIMED_OUT, None]
    assert last[1].flag is not None
    assert "2 escalation(s) used: the control room must assign" in last[1].flag
    assert book.tick(NOW + 999_000, again) == []


def test_decline_escalates_immediately() -> None:
    book, aid = opened()
    changes = book.on_ack("u1", aid, "declined", NOW + 3_000, reason="at another job", recommend_again=again)
    assert [c.state for c in changes] == [S.DECLINED, S.ESCALATED, S.CREATED, S.SENT]
    assert changes[0].why == "declined by the officer: at another job"
    assert outgoing(changes)[0].unit_id == "u2"
    assert outgoing(changes)[0].expires_ts == NOW + 3_000 + 60_000
    # without recommend_again the next tick does it, once
    book2, aid2 = opened()
    book2.on_ack("u1", aid2, "declined", NOW + 3_000)
    assert _escalations(book2.tick(NOW + 3_000, again)) == 1
    assert _escalations(book2.tick(NOW + 3_001, again)) == 0


def test_late_answers_to_a_closed_alert_are_refused() -> None:
    book, aid = opened()
    book.tick(NOW + 60_000, again)
    with pytest.raises(AlertClosed) as info:
        book.on_ack("u1", aid, "accepted", NOW + 61_000)
    assert info.value.state is S.ESCALATED


def test_escalation_keeps_the_role_and_never_asks_a_unit_twice() -> None:
    units = [UnitView("me", "officer", 51.5, -0.12), *UNITS[:3],
             UnitView("sgt1", "officer", 51.5, -0.12, supervisor=True),
             UnitView("sgt2", "officer", 51.5, -0.12, supervisor=True)]
    eta = FixedEta({"me": 1, "u1": 10, "u2": 20, "u3": 30, "sgt1": 100, "sgt2": 200})
    panic = IncidentView("p-1", "panic", 51.5, -0.12, NOW, subject="me")

    def panic_again(incident: IncidentView, exclude: frozenset[str]) -> Recommendation:
        return recommend(incident, units, POLICY, eta, NOW, exclude=exclude)

    book = AlertBook()
    outs = book.open_incident_alerts(panic, panic_again(panic, frozenset()), POLICY.rules["panic"], NOW)
    assert [(o.unit_id, o.role) for o in outs] == [("u1", "responder"), ("u2", "responder"), ("sgt1", "supervisor")]
    changes = book.tick(NOW + 20_000, panic_again)  # nobody answered in 20 s
    new = {o.role: o.unit_id for o in outgoing(changes) if o.role == "supervisor"}
    assert new == {"supervisor": "sgt2"}
    assert sorted(o.unit_id for o in outgoing(changes) if o.role == "responder") == ["u3"]
    flags = [c.flag for c in changes if c.flag]
    assert any("no other responder qualifies" in f for f in flags)  # u1 and u2 both timed out, only u3 left


def test_override_reassigns_and_is_recorded() -> None:
    book, aid = opened()
    book.take_audit()
    changes = book.override(aid, "op-4", NOW + 5_000, new_unit_id="u5", reason="u5 knows the estate")
    assert [(c.alert_id, c.state) for c in changes] == [
        ("inc-7-a1", S.OVERRIDDEN), ("inc-7-a2", S.CREATED), ("inc-7-a2", S.SENT)]
    assert changes[0].withdraw
    assert changes[0].by == "operator:op-4"
    (new,) = outgoing(changes)
    assert new.unit_id == "u5"
    assert new.reasons == ("assigned by operator op-4: u5 knows the estate",)
    validate_body("alert", new.body)
    audit = [c.audit() for c in book.take_audit()]
    assert audit[0] == {
        "ts": NOW + 5_000, "who": "operator:op-4", "what": "sent -> overridden",
        "why": "reassigned from u1 to u5: u5 knows the estate",
        "incident_id": "inc-7", "alert_id": "inc-7-a1", "unit_id": "u1",
    }
    assert book.history(aid)[-1].by == "operator:op-4"
    with pytest.raises(WrongUnit):
        book.on_ack("u1", "inc-7-a2", "accepted", NOW + 6_000)


def test_override_by_incident_cancels_everything_and_stops_escalation() -> None:
    book, aid = opened()
    book.on_ack("u1", aid, "declined", NOW + 1_000)  # pending escalation
    changes = book.override("inc-7", "op-1", NOW + 2_000, cancel=True, reason="false alarm")
    assert changes[-1].why == "incident cancelled: false alarm"
    assert book.tick(NOW + 10_000, again) == []
    with pytest.raises(UnknownAlert):
        book.override("nope", "op-1", NOW, cancel=True, reason="x")
    with pytest.raises(ValueError, match="reason"):
        book.override(aid, "op-1", NOW, cancel=True, reason=" ")


def test_override_by_incident_needs_one_alert_to_reassign() -> None:
    panic = IncidentView("p-2", "panic", 51.5, -0.12, NOW)
    book = AlertBook()
    book.open_incident_alerts(panic, again(panic, frozenset()), POLICY.rules["panic"], NOW)
    with pytest.raises(AmbiguousTarget):
        book.override("p-2", "op-1", NOW, new_unit_id="u5", reason="closer")


def test_nobody_to_ask_flags_the_control_room_and_an_operator_can_assign() -> None:
    book = AlertBook()
    rec = recommend(INCIDENT, [], POLICY, ETA, NOW)
    assert book.open_incident_alerts(INCIDENT, rec, RULE, NOW) == []
    (flag,) = book.take_audit()
    assert flag.flag is not None
    assert "no available unit" in flag.flag
    (new,) = outgoing(book.override("inc-7", "op-2", NOW + 1, new_unit_id="u4", reason="called on radio"))
    assert (new.alert_id, new.unit_id) == ("inc-7-a1", "u4")
