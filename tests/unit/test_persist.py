"""The situation's durable state: the pure export/restore round trip (any sequence of
incidents, answers, ticks and operators' changes comes back equal and behaves the same
afterwards), escalation after a restore fires exactly once on an injected clock, answers
to pre-restart alerts are matched, bad state is refused whole; and the shell's state
file: written on change, read back, a bad file set aside and the gateway started
empty."""

from __future__ import annotations

import asyncio
import copy as copy_module
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core.alerts import AlertState
from gateway.core.picture import Picture
from gateway.core.policy import default_policy
from gateway.core.situation import Output, Situation
from gateway.core.snapshot import SNAPSHOT_VERSION, SnapshotError, StateChanges
from gateway.core.streets import StraightLineEta
from gateway.persist import StateFile, StateUnreadable
from tests.unit.test_situation import PLACES, REGISTRY, T0, Fleet, _service, at

S = AlertState


def new_situation() -> Situation:
    return Situation(Picture(REGISTRY), default_policy(), StraightLineEta())


def fleet_at(now: int = T0) -> Fleet:
    fleet = Fleet(new_situation())
    fleet.report_all(now)
    return fleet


def as_json(data: Any) -> Any:
    """What the shell stores and reads back."""
    return orjson.loads(orjson.dumps(data))


def restored(fleet: Fleet, *, same_tracks: bool = False) -> Fleet:
    """A new gateway's situation restored from `fleet`'s saved state; the device
    sequence numbers go on (devices do not restart with the gateway). Tracks are not
    saved (fixes rebuild them); `same_tracks` copies them over, so that only what was
    restored can make the two differ."""
    copy = Fleet(new_situation())
    copy.situation.restore_state(as_json(fleet.situation.export_state()))
    copy.seqs = dict(fleet.seqs)
    if same_tracks:
        for unit_id, unit in fleet.situation.picture.units.items():
            if unit_id in copy.situation.picture.units:
                mine = copy.situation.picture.units[unit_id]
                mine.track, mine.offsets = copy_module.deepcopy(unit.track), copy_module.deepcopy(unit.offsets)
    return copy


def summary(out: Output) -> list[Any]:
    """An output without the deltas' feature bodies (unit positions are rebuilt)."""
    return [sorted((s.alert_id, s.unit_id, s.expires_ts) for s in out.sends), sorted(out.withdrawn),
            [(r.action, r.subject, r.ts) for r in out.audit], sorted(out.refused), sorted(out.flags)]


# -- the round trip --------------------------------------------------------------------------------

UNITS = sorted(PLACES)
ANSWERS = ["received", "accepted", "declined", "arrived"]
step = st.one_of(
    st.tuples(st.just("panic"), st.sampled_from(UNITS), st.integers(0, 1500)),
    st.tuples(st.just("operator"), st.integers(0, 1500), st.integers(0, 1500)),
    st.tuples(st.just("ack"), st.integers(0, 20), st.sampled_from(ANSWERS)),
    st.tuples(st.just("tick"), st.integers(1, 90_000), st.just(0)),
    st.tuples(st.just("status"), st.sampled_from(UNITS), st.sampled_from(["available", "off_duty"])),
    st.tuples(st.just("cancel"), st.integers(0, 20), st.just(0)),
    st.tuples(st.just("close"), st.integers(0, 5), st.just(0)),
)


def play(fleet: Fleet, steps: list[tuple[Any, Any, Any]], now: int) -> tuple[int, list[Output]]:
    situation = fleet.situation
    outs: list[Output] = []
    for kind, a, b in steps:
        now += 1000
        alerts = [v.alert_id for i in situation.picture.incidents for v in situation.alerts.alerts_for(i)]
        if kind == "panic":
            outs.append(fleet.send(a, "event", {"type": "panic", **at(b)}, now))
        elif kind == "operator":
            place = at(a, b)
            _, out = situation.create_incident("operator", place["lat"], place["lon"], now, by="operator:op-1")
            outs.append(out)
        elif kind == "ack" and alerts:
            alert = situation.alerts.alert(alerts[a % len(alerts)])
            outs.append(fleet.send(alert.unit_id, "ack", {"alert_id": alert.alert_id, "answer": b}, now))
        elif kind == "tick":
            now += a
            outs.append(situation.tick(now))
        elif kind == "status":
            outs.append(fleet.send(a, "status", {"state": b}, now))
        elif kind == "cancel" and alerts:
            target = alerts[a % len(alerts)]
            if situation.alerts.alert(target).state in (S.SENT, S.DELIVERED, S.ACCEPTED):
                outs.append(situation.override(target, "op-1", now, reason="test", cancel=True))
        elif kind == "close":
            open_ = [i for i, inc in situation.picture.incidents.items() if inc.status != "closed"]
            if open_:
                outs.append(situation.close_incident(open_[a % len(open_)], "op-1", now, reason="test"))
    return now, outs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, max_size=14), st.lists(step, max_size=8))
def test_export_restore_round_trips_and_behaves_the_same(before: list[Any], after: list[Any]) -> None:
    fleet = fleet_at()
    now, _ = play(fleet, before, T0 + 5000)
    saved = as_json(fleet.situation.export_state())
    assert saved["version"] == SNAPSHOT_VERSION
    copy = restored(fleet, same_tracks=True)
    assert as_json(copy.situation.export_state()) == saved
    # both carry on alike: same alerts, same ids, same timeouts, same answers taken
    for f in (fleet, copy):
        f.situation.take_state_changes()
    _, outs_a = play(fleet, after, now + 3000)
    _, outs_b = play(copy, after, now + 3000)
    assert [summary(o) for o in outs_a] == [summary(o) for o in outs_b]
    assert as_json(copy.situation.export_state()) == as_json(fleet.situation.export_state())


def test_state_changes_carry_only_what_changed_and_deletions() -> None:
    fleet = fleet_at()
    fleet.situation.take_state_changes()
    assert not fleet.situation.take_state_changes()
    fleet.send("car-1", "telemetry", at(1500), T0 + 4000)  # a fix alone is not durable
    assert not fleet.situation.take_state_changes()
    out = fleet.send("off-a", "event", {"type": "panic", **at(100)}, T0 + 5000)
    changes = fleet.situation.take_state_changes()
    [incident_id] = changes.incidents
    assert changes.meta is not None
    assert changes.meta["next_incident"] == 2
    record = changes.incidents[incident_id]
    assert record is not None
    assert len(record["alerts"]["alerts"]) == len(out.sends)
    fleet.situation.close_incident(incident_id, "op-1", T0 + 6000, reason="done")
    fleet.situation.tick(T0 + 6000 + 3_700_000)  # closed incidents are kept an hour
    changes = fleet.situation.take_state_changes()
    assert changes.incidents == {incident_id: None}
    merged = StateChanges(None, {"a": {"x": 1}}).then(StateChanges(None, {"a": None, "b": {"y": 2}}))
    assert merged.incidents == {"a": None, "b": {"y": 2}}


# -- time and answers after a restore ------------------------------------------------------------------


def test_a_timeout_that_passed_during_the_outage_escalates_once_right_after_start() -> None:
    fleet = fleet_at()
    out = fleet.send("off-a", "event", {"type": "panic", **at(100)}, T0 + 5000)
    asked = {s.unit_id for s in out.sends}
    timeout_ms = round(default_policy().rules["panic"].timeout_s * 1000)
    copy = restored(fleet)  # saved at once; the gateway is down for five minutes
    restart = T0 + 5000 + 300_000
    copy.report_all(restart)
    first = copy.situation.tick(restart + 3000)
    timed_out = [r for r in first.audit if r.action == "alert.timed_out"]
    escalated = [r for r in first.audit if r.action == "alert.escalated"]
    handled = escalated + [r for r in first.audit if r.action == "alert.flagged"]  # nobody left to ask
    assert len(timed_out) == len(out.sends)
    assert sorted(r.data["alert_id"] for r in handled) == sorted(s.alert_id for s in out.sends)
    assert escalated
    assert {r.data["unit_id"] for r in timed_out} == asked
    assert all(r.ts >= T0 + 5000 + timeout_ms for r in timed_out)
    assert first.sends
    assert not {s.unit_id for s in first.sends} & asked
    for t in (restart + 3000, restart + 3200, restart + 4000):
        again = copy.situation.tick(t)
        assert not [r for r in again.audit if r.action in ("alert.timed_out", "alert.escalated", "alert.flagged")]


def test_a_timeout_not_yet_due_keeps_its_deadline() -> None:
    fleet = fleet_at()
    out = fleet.send("off-a", "event", {"type": "panic", **at(100)}, T0 + 5000)
    deadline = out.sends[0].expires_ts
    copy = restored(fleet)
    copy.report_all(T0 + 8000)
    assert not [r for r in copy.situation.tick(deadline - 1).audit if r.action == "alert.timed_out"]
    assert [r for r in copy.situation.tick(deadline).audit if r.action == "alert.timed_out"]


def answered_then_restarted(answer: str, answered_ms: int) -> tuple[Any, Any, Fleet]:
    """A panic at T0 + 5 s, off-b's `answer` to its alert, then a restart: the panic's
    outcome, off-b's alert and the restored fleet."""
    fleet = fleet_at()
    out = fleet.send("off-a", "event", {"type": "panic", **at(100)}, T0 + 5000)
    alert = next(s for s in out.sends if s.unit_id == "off-b")
    fleet.send("off-b", "ack", {"alert_id": alert.alert_id, "answer": answer}, answered_ms)
    return out, alert, restored(fleet)


def test_an_answer_to_a_pre_restart_alert_is_matched() -> None:
    out, alert, copy = answered_then_restarted("received", T0 + 5200)
    assert copy.situation.alerts.alert(alert.alert_id).state is S.DELIVERED
    assert [s.alert_id for s in copy.situation.alerts.unreceived(T0 + 6000)] == \
        sorted({s.alert_id for s in out.sends} - {alert.alert_id})
    copy.send("off-b", "ack", {"alert_id": alert.alert_id, "answer": "accepted"}, T0 + 7000)
    view = copy.situation.alerts.alert(alert.alert_id)
    assert [h.state for h in view.history] == ["created", "sent", "delivered", "accepted"]
    unit = copy.situation.picture.units["off-b"]
    assert (unit.state, unit.incident_id) == ("committed", alert.incident_id)
    # a new incident after the restart gets a new id, and the answer from the wrong unit is still refused
    copy.report_all(T0 + 8000)
    refused = copy.send("off-c", "ack", {"alert_id": alert.alert_id, "answer": "accepted"}, T0 + 9000)
    assert refused.refused[0][0] == "wrong_unit"
    place = at(1400)
    new_id, _ = copy.situation.create_incident("operator", place["lat"], place["lon"], T0 + 9500, by="op")
    assert new_id != alert.incident_id
    assert len(copy.situation.picture.incidents) == 2


def test_a_committed_unit_stays_committed_and_is_not_asked_again() -> None:
    _out, _alert, copy = answered_then_restarted("accepted", T0 + 6000)
    for unit in PLACES:  # fixes only: no status after the restart
        for i in range(3):
            copy.send(unit, "telemetry", at(PLACES[unit]), T0 + 7000 + i * 1000)
    assert copy.situation.picture.units["off-b"].state == "committed"
    out2 = copy.send("off-c", "event", {"type": "man_down", **at(600)}, T0 + 10_000)
    assert out2.sends
    assert "off-b" not in {s.unit_id for s in out2.sends}


# -- bad state -------------------------------------------------------------------------------------


def _saved() -> dict[str, Any]:
    fleet = fleet_at()
    fleet.send("off-a", "event", {"type": "panic", **at(100)}, T0 + 5000)
    data: dict[str, Any] = as_json(fleet.situation.export_state())
    return data


def _break_version(d: dict[str, Any]) -> None:
    d["version"] = SNAPSHOT_VERSION + 1


def _break_slot(d: dict[str, Any]) -> None:
    next(iter(d["incidents"].values()))["alerts"]["slots"][0]["alerts"] = ["nope-a9"]


def _break_state(d: dict[str, Any]) -> None:
    next(iter(d["incidents"].values()))["alerts"]["alerts"][0]["state"] = "lost"


def _break_unit(d: dict[str, Any]) -> None:
    d["units"]["off-b"] = {"state": "flying"}


def _break_incident(d: dict[str, Any]) -> None:
    next(iter(d["incidents"].values()))["picture"]["lat"] = "north"


def _break_types(d: dict[str, Any]) -> None:
    d["incidents"] = []


@pytest.mark.parametrize("breaks", [_break_version, _break_slot, _break_state, _break_unit, _break_incident,
                                    _break_types])
def test_bad_state_is_refused_whole(breaks: Any) -> None:
    data = _saved()
    breaks(data)
    fresh = new_situation()
    before = as_json(fresh.export_state())
    with pytest.raises(SnapshotError):
        fresh.restore_state(data)
    assert as_json(fresh.export_state()) == before


# -- the shell: the state file -----------------------------------------------------------------------


def test_the_state_file_writes_changes_and_reads_them_back(tmp_path: Path) -> None:
    fleet = fleet_at()
    fleet.send("off-a", "event", {"type": "panic", **at(100)}, T0 + 5000)
    path = tmp_path / "gw.situation.db"
    state = StateFile.open(path)
    assert state.load() is None
    assert state.write(fleet.situation.take_state_changes()) > 0
    incident_id = next(iter(fleet.situation.picture.incidents))
    fleet.situation.close_incident(incident_id, "op-1", T0 + 6000, reason="done")
    state.write(fleet.situation.take_state_changes())
    state.close()
    state = StateFile.open(path)
    loaded = state.load()
    state.close()
    assert loaded == as_json(fleet.situation.export_state())


def test_a_file_that_is_not_a_database_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "gw.situation.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateUnreadable, match="not a readable database"):
        StateFile.open(path)


async def test_bad_saved_state_is_set_aside_counted_and_the_gateway_starts_empty(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gw.situation.db"
    state = StateFile.open(path)
    data = _saved()
    _break_slot(data)
    state.replace(data)
    state.close()
    service = _service(tmp_path, None)
    await service.restore(path)
    try:
        assert service.counts["state_restore_failed"] == 1
        assert not service.situation.picture.incidents
        [aside] = await asyncio.to_thread(lambda: list(tmp_path.glob("gw.situation.db.bad-*")))
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1
        assert str(aside) in errors[0].getMessage()
        with sqlite3.connect(aside) as conn:  # kept as it was, for a look
            assert conn.execute("SELECT count(*) FROM situation_state").fetchone()[0] > 0
        # a fresh file is used from now on
        fleet = Fleet(service.situation)
        fleet.report_all(T0)
        fleet.send("off-a", "event", {"type": "panic", **at(100)}, T0 + 5000)
        await service.flush()
    finally:
        await service.close()
    state = StateFile.open(path)
    loaded = state.load()
    state.close()
    assert loaded is not None
    assert len(loaded["incidents"]) == 1


async def test_the_service_restores_and_resends_unreceived_alerts(tmp_path: Path) -> None:
    path = tmp_path / "gw.situation.db"
    first = _service(tmp_path, None)
    await first.restore(path)
    fleet = Fleet(first.situation)
    fleet.report_all(T0 - 10_000)
    out = fleet.send("off-a", "event", {"type": "panic", **at(100)}, T0 - 1000)
    fleet.send(out.sends[0].unit_id, "ack", {"alert_id": out.sends[0].alert_id, "answer": "received"}, T0 - 500)
    await first.flush()
    await first.close()
    second = _service(tmp_path, None)  # its clock says T0: the alerts have not expired
    await second.restore(path)
    try:
        assert second.counts["state_restore_failed"] == 0
        assert [a["alert_id"] for a in second.alerts()] == [a["alert_id"] for a in first.alerts()]
        queued = [body["alert_id"] for _unit, kind, body in second._sends if kind == "alert"]
        assert queued == [s.alert_id for s in out.sends[1:]]
    finally:
        await second.close()
