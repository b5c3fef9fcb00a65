"""The situational picture and the fuse-decide-alert state machine, pure: messages in,
incidents, alerts, unit states and audit records out, on an injected clock."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from edge_agent.wire.geo import offset
from edge_agent.wire.model import validate_body
from gateway.core.anpr import Hotlist, HotlistEntry
from gateway.core.picture import Picture, Registry, RegistryError, UnitInfo
from gateway.core.policy import default_policy
from gateway.core.situation import Situation
from gateway.core.streets import StraightLineEta

T0 = 1_800_000_000_000
CENTRE = (51.5, -0.12)


@dataclass(frozen=True)
class Msg:
    device_id: str
    seq: int
    kind: str
    ts: int
    body: Mapping[str, Any]
    recv_ms: int = 0

    def __post_init__(self) -> None:
        if not self.recv_ms:
            object.__setattr__(self, "recv_ms", self.ts)


def at(north_m: float, east_m: float = 0.0) -> dict[str, float]:
    lat, lon = offset(CENTRE, north_m, east_m)
    return {"lat": lat, "lon": lon, "acc": 5.0}


REGISTRY = Registry([
    UnitInfo("off-a", "officer"),
    UnitInfo("off-b", "officer"),
    UnitInfo("off-c", "officer", capabilities=frozenset({"first_aid"})),
    UnitInfo("sgt-1", "officer", supervisor=True),
    UnitInfo("car-1", "vehicle", capabilities=frozenset({"armed"})),
    UnitInfo("ac-1", "acoustic"), UnitInfo("ac-2", "acoustic"), UnitInfo("ac-3", "acoustic"),
    UnitInfo("ac-4", "acoustic"), UnitInfo("cam-1", "anpr"),
])
PLACES = {"off-a": 100, "off-b": 300, "off-c": 600, "sgt-1": 900, "car-1": 1500}


class Fleet:
    """Units at fixed places reporting fixes, with their own sequence numbers."""

    def __init__(self, situation: Situation) -> None:
        self.situation = situation
        self.seqs: dict[str, int] = {}

    def send(self, device: str, kind: str, body: Mapping[str, Any], now: int) -> Any:
        self.seqs[device] = self.seqs.get(device, 0) + 1
        return self.situation.observe([Msg(device, self.seqs[device], kind, now, body)], now)

    def report_all(self, now: int, where: Mapping[str, float] = PLACES) -> None:
        for unit, north in where.items():
            self.send(unit, "status", {"state": "available"}, now)
            for i in range(3):
                self.send(unit, "telemetry", at(north), now + i * 1000)


@pytest.fixture
def fleet() -> Fleet:
    situation = Situation(Picture(REGISTRY), default_policy(), StraightLineEta())
    f = Fleet(situation)
    f.report_all(T0)
    return f


def test_a_panic_alerts_the_two_nearest_available_and_a_supervisor(fleet: Fleet) -> None:
    now = T0 + 5000
    out = fleet.send("off-a", "event", {"type": "panic", **at(100)}, now)
    [incident] = fleet.situation.picture.incidents.values()
    assert (incident.type, incident.subject) == ("panic", "off-a")
    # by arrival time: off-b walks 200 m (~144 s); car-1 drives 1,400 m (~165 s) and beats off-c on foot
    assert {(s.unit_id, s.role) for s in out.sends} == {("off-b", "responder"), ("car-1", "responder"),
                                                          ("sgt-1", "supervisor")}
    schema = json.loads((Path(__file__).parents[2] / "docs/schemas/alert.json").read_text())
    for send in out.sends:
        validate_body("alert", send.body)
        jsonschema.validate(send.body, schema)
        assert send.reasons
    actions = [r.action for r in out.audit]
    assert actions[:2] == ["incident.opened", "decision.made"]
    assert actions.count("alert.sent") == 3


def test_answers_move_the_alert_and_the_unit(fleet: Fleet) -> None:
    now = T0 + 5000
    out = fleet.send("off-a", "event", {"type": "panic", **at(100)}, now)
    alert = next(s for s in out.sends if s.unit_id == "off-b")
    fleet.send("off-b", "ack", {"alert_id": alert.alert_id, "answer": "received"}, now + 200)
    fleet.send("off-b", "ack", {"alert_id": alert.alert_id, "answer": "accepted"}, now + 3000)
    assert fleet.situation.alerts.alert(alert.alert_id).state == "accepted"
    unit = fleet.situation.picture.units["off-b"]
    assert (unit.state, unit.incident_id) == ("committed", alert.incident_id)
    history = [h.state for h in fleet.situation.alerts.history(alert.alert_id)]
    assert history == ["created", "sent", "delivered", "accepted"]
    # committed units are not asked for the next incident
    out2 = fleet.send("off-c", "event", {"type": "man_down", **at(600)}, now + 4000)
    assert "off-b" not in {s.unit_id for s in out2.sends}


def test_an_answer_from_the_wrong_unit_is_refused_and_counted(fleet: Fleet) -> None:
    out = fleet.send("off-a", "event", {"type": "panic", **at(100)}, T0 + 5000)
    alert = out.sends[0]
    wrong = "off-c" if alert.unit_id != "off-c" else "off-b"
    refused = fleet.send(wrong, "ack", {"alert_id": alert.alert_id, "answer": "accepted"}, T0 + 6000).refused
    assert [reason for reason, _ in refused] == ["wrong_unit"]
    assert fleet.situation.alerts.alert(alert.alert_id).state == "sent"


def test_no_answer_escalates_once_at_the_timeout(fleet: Fleet) -> None:
    now = T0 + 5000
    out = fleet.send("off-a", "event", {"type": "panic", **at(100)}, now)
    first = {s.unit_id for s in out.sends}
    timeout = max(s.expires_ts for s in out.sends)
    assert fleet.situation.tick(timeout - 1).sends == []
    escalated = fleet.situation.tick(timeout).sends
    assert escalated, "the unanswered alerts go to the next-best units"
    assert not {s.unit_id for s in escalated} & first
    for t in range(timeout + 1, timeout + 10):
        assert fleet.situation.tick(t).sends == []


def test_a_second_alarm_of_the_same_officer_is_merged(fleet: Fleet) -> None:
    fleet.send("off-a", "event", {"type": "panic", **at(100)}, T0 + 5000)
    out = fleet.send("off-a", "event", {"type": "man_down", **at(102)}, T0 + 9000)
    assert out.sends == []
    [incident] = fleet.situation.picture.incidents.values()
    assert len(incident.sources) == 2


def test_a_redelivered_event_is_taken_once(fleet: Fleet) -> None:
    msg = Msg("off-a", 99, "event", T0 + 5000, {"type": "panic", **at(100)})
    assert fleet.situation.observe([msg], T0 + 5000).sends
    assert fleet.situation.observe([msg], T0 + 5100).sends == []


def test_a_gunshot_heard_by_four_sensors_is_located_and_sends_the_armed_car() -> None:
    sites = {"ac-1": (400, -400), "ac-2": (400, 400), "ac-3": (-400, 400), "ac-4": (-400, -400)}
    source = (50.0, 120.0)
    situation = Situation(Picture(REGISTRY), default_policy(), StraightLineEta())
    f = Fleet(situation)
    f.report_all(T0)
    sends = []
    for sensor, (n, e) in sites.items():
        dist = ((n - source[0]) ** 2 + (e - source[1]) ** 2) ** 0.5
        t_ns = (T0 + 6000) * 1_000_000 + round(dist / 343.0 * 1e9)
        body = {"type": "gunshot", **at(n, e), "detail": {"t_detect_ns": t_ns, "confidence": 0.9}}
        sends += f.send(sensor, "event", body, T0 + 8000).sends
    [incident] = situation.picture.incidents.values()
    assert incident.type == "gunshot"
    lat, lon = offset(CENTRE, *source)
    assert abs(incident.lat - lat) < 1e-5
    assert abs(incident.lon - lon) < 1e-5
    assert incident.uncertainty_m is not None
    assert [s.unit_id for s in sends] == ["car-1"]


def test_an_anpr_hotlist_hit_opens_an_incident() -> None:
    hotlist = Hotlist([HotlistEntry("RF19XKD", "stolen", T0 + 3_600_000)])
    situation = Situation(Picture(REGISTRY, hotlist=hotlist), default_policy(), StraightLineEta())
    f = Fleet(situation)
    f.report_all(T0)
    f.send("cam-1", "event", {"type": "anpr_read", **at(0), "detail": {"plate": "ZZ11ZZZ"}}, T0 + 4000)
    assert not situation.picture.incidents
    f.send("cam-1", "event", {"type": "anpr_read", **at(0), "detail": {"plate": "RF19 XKD", "direction":
                                                                        "approaching"}}, T0 + 5000)
    [incident] = situation.picture.incidents.values()
    assert (incident.type, incident.detail["plate"], incident.detail["reason"]) == ("anpr_hit", "RF19XKD", "stolen")


def test_operator_incident_override_and_close(fleet: Fleet) -> None:
    lat, lon = offset(CENTRE, 300, 0)
    incident_id, out = fleet.situation.create_incident("operator", lat, lon, T0 + 5000, by="op-1", note="fight")
    [alert] = out.sends
    assert alert.unit_id == "off-b"
    over = fleet.situation.override(alert.alert_id, "op-1", T0 + 6000, reason="closer unit known", new_unit_id="off-c")
    assert [s.unit_id for s in over.sends] == ["off-c"]
    assert ("off-b", alert.alert_id) in over.withdrawn
    assert "alert.override" in [r.action for r in over.audit]
    closed = fleet.situation.close_incident(incident_id, "op-1", T0 + 7000)
    assert fleet.situation.picture.incidents[incident_id].status == "closed"
    assert "incident.closed" in [r.action for r in closed.audit]


def test_picture_features_are_geojson(fleet: Fleet) -> None:
    fleet.send("off-a", "event", {"type": "panic", **at(100)}, T0 + 5000)
    features = fleet.situation.picture.features(T0 + 6000)
    layers = {f["properties"]["layer"] for f in features}
    assert layers == {"unit", "incident"}
    unit = next(f for f in features if f["properties"]["id"] == "off-b")
    assert unit["geometry"]["type"] == "Point"
    _lon, lat = unit["geometry"]["coordinates"]
    assert abs(lat - at(300)["lat"]) < 1e-4


def test_registry_errors_name_the_entry() -> None:
    with pytest.raises(RegistryError, match=r"units\[1\]: 'id' must be"):
        Registry.from_data({"units": [{"id": "a", "kind": "officer"}, {"kind": "vehicle"}]})
    with pytest.raises(RegistryError, match="kind must be one of"):
        Registry.from_data({"units": [{"id": "a", "kind": "horse"}]})
    reg = Registry.from_data({"units": [{"id": "a", "kind": "vehicle", "capabilities": ["armed"]}],
                              "zones": [{"id": "z", "rule": "coverage", "points": [[51.5, -0.12], [51.51, -0.12],
                                                                                  [51.51, -0.11]]}]})
    assert reg.get("a") == UnitInfo("a", "vehicle", capabilities=frozenset({"armed"}))
    assert reg.zones[0].zone_id == "z"


def walk(f: Fleet, unit: str, start: float, end: float, t: int, step_m: float = 5.0) -> int:
    """Fixes every second from `start` to `end` metres north; returns the time after."""
    n = max(1, round(abs(end - start) / step_m))
    for i in range(n + 1):
        f.send(unit, "telemetry", {**at(start + (end - start) * i / n), "speed": step_m,
                                   "heading": 0.0 if end >= start else 180.0}, t)
        t += 1000
    return t


def test_a_coverage_gap_moves_a_spare_unit_and_closes_when_restored() -> None:
    corners = [offset(CENTRE, n, e) for n, e in ((-100, -100), (-100, 100), (50, 100), (50, -100))]
    zone = {"id": "station-square", "rule": "coverage", "min_units": 1, "points": [list(p) for p in corners]}
    registry = Registry.from_data({"units": [{"id": u, "kind": "officer"} for u in ("cov-a", "cov-b")],
                                   "zones": [zone]})
    situation = Situation(Picture(registry), default_policy(), StraightLineEta())
    f = Fleet(situation)
    f.report_all(T0, {"cov-a": 0, "cov-b": 500})  # cov-a inside the square
    assert situation.tick(T0 + 3000).sends == []
    t = walk(f, "cov-a", 0, 300, T0 + 4000)  # it walks out
    out = situation.tick(t)
    [gap] = [i for i in situation.picture.incidents.values() if i.type == "coverage_gap"]
    assert gap.detail["zone"] == "station-square"
    assert len(out.sends) == 1
    t = walk(f, "cov-b", 500, 0, t)  # another comes into the square
    situation.tick(t)
    assert gap.status == "closed"


def test_coverage_is_counted_at_most_once_a_coverage_check() -> None:
    """Counting a coverage zone estimates every available unit: once a `coverage_check_ms`,
    not on every tick."""
    corners = [offset(CENTRE, n, e) for n, e in ((-100, -100), (-100, 100), (50, 100), (50, -100))]
    zone = {"id": "square", "rule": "coverage", "min_units": 1, "points": [list(p) for p in corners]}
    registry = Registry.from_data({"units": [{"id": "cov-a", "kind": "officer"}], "zones": [zone]})
    situation = Situation(Picture(registry), default_policy(), StraightLineEta())
    f = Fleet(situation)
    f.report_all(T0, {"cov-a": 0})
    check_ms = situation.picture.config.coverage_check_ms
    situation.tick(T0 + 3000)  # counted: covered
    f.send("cov-a", "status", {"state": "off_duty"}, T0 + 3100)
    situation.tick(T0 + 3000 + check_ms - 1)
    assert not [i for i in situation.picture.incidents.values() if i.type == "coverage_gap"]
    situation.tick(T0 + 3000 + check_ms)
    [gap] = situation.picture.incidents.values()
    assert (gap.type, gap.detail["zone"]) == ("coverage_gap", "square")


def test_a_monitored_person_entering_an_exclusion_zone_is_a_breach() -> None:
    corners = [offset(CENTRE, n, e) for n, e in ((900, -100), (900, 100), (1100, 100), (1100, -100))]
    zone = {"id": "victim-home", "rule": "exclusion", "monitored": ["tag-7"], "points": [list(p) for p in corners]}
    registry = Registry.from_data({"units": [{"id": "off-z", "kind": "officer"}], "zones": [zone]})
    situation = Situation(Picture(registry), default_policy(), StraightLineEta())
    f = Fleet(situation)
    f.report_all(T0, {"off-z": 0})
    walk(f, "tag-7", 700, 1000, T0 + 2000)
    [breach] = situation.picture.incidents.values()
    assert (breach.type, breach.subject, breach.detail["zone"]) == ("geofence_breach", "tag-7", "victim-home")
    assert situation.alerts.alerts_for(breach.id)[0].unit_id == "off-z"
    walk(f, "tag-7", 1000, 1050, T0 + 60_000)
    assert len(situation.picture.incidents) == 1  # reported once, not every fix


def test_units_whose_clocks_run_behind_are_still_dispatched() -> None:
    """Device time 10 minutes behind the gateway's (a skewed clock, or a simulation that
    keeps device clocks behind): positions are aged on the device's own clock."""
    behind = 600_000
    situation = Situation(Picture(REGISTRY), default_policy(), StraightLineEta())
    for i, (unit, north) in enumerate(PLACES.items()):
        situation.observe([Msg(unit, 1, "status", T0, {"state": "available"}, T0 + behind),
                           Msg(unit, 2, "telemetry", T0 + i, at(north), T0 + behind + i)], T0 + behind + i)
    out = situation.observe([Msg("off-a", 3, "event", T0 + 10, {"type": "panic", **at(100)}, T0 + behind + 10)],
                            T0 + behind + 10)
    assert len(out.sends) == 3


def test_the_incident_closes_when_its_last_attending_unit_clears(fleet: Fleet) -> None:
    now = T0 + 5000
    out = fleet.send("off-a", "event", {"type": "panic", **at(100)}, now)
    incident_id = out.sends[0].incident_id
    for send in out.sends:
        fleet.send(send.unit_id, "ack", {"alert_id": send.alert_id, "answer": "accepted"}, now + 1000)
    attending = [s.unit_id for s in out.sends]
    for unit in attending[:-1]:
        fleet.send(unit, "status", {"state": "available"}, now + 60_000)
    assert fleet.situation.picture.incidents[incident_id].status == "assigned"
    closed = fleet.send(attending[-1], "status", {"state": "available"}, now + 61_000)
    assert fleet.situation.picture.incidents[incident_id].status == "closed"
    assert "incident.closed" in [r.action for r in closed.audit]
    assert fleet.situation.tick(now + 200_000).sends == []  # nothing escalates on a closed incident
    fleet.situation.tick(now + 61_000 + 3_600_001)
    assert incident_id not in fleet.situation.picture.incidents  # forgotten after an hour (audited)


# -- the hotlist shell (gateway.situation): save, apply, audit; the watcher ------------------------------------


class _NoDownlink:
    async def publish_down(self, device: str, kind: str, body: Any) -> bool:
        return True


def _service(tmp_path: Path, hotlist_path: Path | None) -> Any:
    from certs.auditlog import AuditLog  # noqa: PLC0415
    from certs.pki import new_key  # noqa: PLC0415
    from edge_agent.wire.envelope import KeySigner  # noqa: PLC0415
    from gateway.situation import SituationService, load_hotlist  # noqa: PLC0415

    situation = Situation(Picture(REGISTRY, hotlist=load_hotlist(hotlist_path)), default_policy(), StraightLineEta())
    audit = AuditLog.open(tmp_path / "audit.db", KeySigner("gateway", new_key()))
    service = SituationService(situation, _NoDownlink(), audit, tick_s=0.05, clock_ms=lambda: T0,
                               hotlist_path=hotlist_path)
    service.watch(None, hotlist_path)
    return service


async def test_hotlist_changes_are_saved_applied_and_audited(tmp_path: Path) -> None:
    from gateway.situation import HotlistNotSaved, HotlistRefused, load_hotlist  # noqa: PLC0415

    path = tmp_path / "hotlist.yaml"
    path.write_text("hotlist: []\n")
    service = _service(tmp_path, path)
    assert await service.put_hotlist_entry(HotlistEntry("AB12 CDE", "stolen", T0 + 1000), by="op-1") is False
    assert await service.put_hotlist_entry(HotlistEntry("AB12CDE", "stolen, armed", T0 + 2000), by="op-1") is True
    assert [e.reason for e in load_hotlist(path)] == ["stolen, armed"]
    service.reload_changed()  # its own write: no reload
    assert [r.action for r in service._audit_pending] == ["hotlist.changed", "hotlist.changed"]
    with pytest.raises(HotlistRefused):
        await service.put_hotlist_entry(HotlistEntry("ZZ1", "late", T0), by="op-1")
    with pytest.raises(KeyError):
        await service.remove_hotlist_entry("ZZ1", by="op-1")
    # a hand edit that does not validate: the API refuses to overwrite it, the live list stays
    path.write_text("hotlist: [{plate: XX1}]\n")
    with pytest.raises(HotlistNotSaved, match="does not validate"):
        await service.remove_hotlist_entry("AB12CDE", by="op-1")
    assert service.situation.picture.hotlist.get("AB12CDE") is not None
    path.write_text(f"hotlist: [{{plate: XX1, reason: fixed, expires_ts: {T0 + 5000}}}]\n")
    with pytest.raises(KeyError):  # the fixed file was loaded first: AB12CDE is no longer listed
        await service.remove_hotlist_entry("AB12CDE", by="op-1")
    removed = await service.remove_hotlist_entry("xx1", by="op-2")
    assert removed.reason == "fixed"
    assert list(load_hotlist(path)) == []
    service._audit.close()


async def test_an_unwritable_hotlist_file_changes_nothing(tmp_path: Path) -> None:
    from gateway.situation import HotlistNotSaved  # noqa: PLC0415

    path = tmp_path / "hotlist.yaml"
    path.write_text("hotlist: []\n")
    service = _service(tmp_path, path)
    (tmp_path / f".hotlist.yaml.{os.getpid()}.tmp").mkdir()  # the temp file cannot be created (even by root)
    with pytest.raises(HotlistNotSaved, match="nothing was changed"):
        await service.put_hotlist_entry(HotlistEntry("AB12CDE", "stolen", T0 + 1000), by="op-1")
    assert path.read_text() == "hotlist: []\n"
    assert len(service.situation.picture.hotlist) == 0
    assert service._audit_pending == []
    service._audit.close()


async def test_without_a_file_changes_are_live_only(tmp_path: Path) -> None:
    service = _service(tmp_path, None)
    await service.put_hotlist_entry(HotlistEntry("AB12CDE", "stolen", T0 + 1000), by="op-1")
    assert [e["plate"] for e in service.hotlist()] == ["AB12CDE"]
    assert service._audit_pending[0].data["saved_to"] is None
    service._audit.close()


def test_a_unit_that_becomes_available_later_fills_the_empty_slot() -> None:
    situation = Situation(Picture(REGISTRY), default_policy(), StraightLineEta())
    f = Fleet(situation)
    f.report_all(T0, {"off-a": 100, "off-b": 300})  # one responder besides the subject, no supervisor
    for unit in ("off-c", "car-1", "sgt-1"):
        f.send(unit, "status", {"state": "off_duty"}, T0)
        f.send(unit, "telemetry", at(PLACES[unit]), T0)
    now = T0 + 5000
    out = f.send("off-a", "event", {"type": "panic", **at(100)}, now)
    assert [s.unit_id for s in out.sends] == ["off-b"]
    f.send("off-c", "status", {"state": "available"}, now + 2000)
    f.send("off-c", "telemetry", at(PLACES["off-c"]), now + 2000)
    assert situation.tick(now + 9_000).sends == []  # looked again only every 10 s
    refill = situation.tick(now + 10_000).sends
    assert [(s.unit_id, s.role) for s in refill] == [("off-c", "responder")]
    assert "became available after the incident opened" in refill[0].reasons
    assert situation.tick(now + 20_000).sends == []  # filled: not asked twice
