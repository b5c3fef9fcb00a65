"""The simulator end to end: a short accelerated scenario with every sensor model and
every fault, through a real Mosquitto and the real gateway (`bluelight gateway run`).

Asserts on the simulator's summary and, independently, on what the gateway stored:
forged messages rejected as bad_signature and never stored, replays counted and stored
once, garbage rejected as malformed / too_large, the revoked device refused, and no
valid message lost across link flaps, outages and a broker outage.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest
from click.testing import CliRunner

from bluelight.cli import cli
from certs.pki import Pki
from firmware_sim.fleet import HOTLIST_FILE, REGISTRY_FILE, FleetOptions, run_fleet, write_gateway_files
from firmware_sim.scenario import parse_scenario
from firmware_sim.summary import GatewayApi
from tests.helpers import SupervisedBroker, free_port, stop_process, wait_for_port

pytestmark = pytest.mark.integration

SCENARIO = """\
name: ci-everything
description: Every sensor model and every fault, 200 s at 10x.
seed: 42
duration: 200s
speed: 10
agent:
  resend_after: 5s
  reconnect_max: 2s

units:
  - {type: officer, id: sim-officer, count: 6, patrol_m: 1200, supervisors: 1}
  - {type: vehicle, id: sim-car, count: 3, patrol_m: 4000, capabilities: [armed, first_aid]}
  - {type: officer, id: sim-shift, patrol_m: 800, shift: {start: 20s, end: 150s}}

sensors:
  - type: acoustic
    id: sim-mic
    count: 3
    at: [Elm Street & Mill Lane, Hatter Street & Jubilee Avenue, Elm Street & Harbour Lane]
  - {type: anpr, id: sim-anpr, at: Canal Road & North Avenue, heading: 90}

incidents:
  - {at: 45s, type: panic, unit: sim-officer-002}
  - {at: 25s, type: man_down, unit: sim-officer-003}
  - {at: 70s, type: gunshot, place: Elm Street & Jubilee Avenue}
  - {at: 75s, type: hotlist_vehicle, plate: RF19 XKD, speed_mps: 15,
     route: [Abbey Street & North Avenue, Canal Road & North Avenue, Canal Road & Mill Lane]}
  - {at: 100s, type: crash, unit: sim-car-002, decel_g: 9}
  - {at: 110s, type: holster, unit: sim-officer-002}
  - {at: 112s, type: bodycam, unit: sim-officer-002, on: true}

faults:
  - {at: 0, type: clock_skew, unit: sim-officer-004, offset: 90s}
  - {at: 10s, type: forged, unit: sim-officer-005}
  - {at: 20s, type: link_flap, unit: sim-officer-001, down: 10s, up: 10s, cycles: 2}
  - {at: 20s, type: revoked, unit: sim-officer-006, reconnect_after: 10s}
  - {at: 30s, type: link_outage, unit: sim-car-001, for: 40s}
  - {at: 40s, type: gps_jump, unit: sim-car-003, offset_m: 400}
  - {at: 50s, type: gps_loss, unit: sim-car-003, for: 30s}
  - {at: 140s, type: sensor_dropout, unit: sim-mic-002, for: 30s}
  - {at: 80s, type: replay, unit: sim-officer-002, count: 3}
  - {at: 90s, type: malformed, unit: sim-officer-003, count: 4}
  - {at: 130s, type: broker_outage, for: 30s}
"""


class Gateway:
    """`bluelight gateway run` as a user starts it, with the scenario's unit registry
    and hotlist and the built-in city's streets, stopped by PID."""

    def __init__(self, pki: Pki, broker_port: int, tmp: Path) -> None:
        self.db = tmp / "gateway.db"
        self.http_port = free_port()
        self.log = tmp / "gateway.log"
        run_dir = tmp / "sim"
        run_dir.mkdir()
        write_gateway_files(parse_scenario(SCENARIO, "ci-everything.yaml"), run_dir)
        city = resources.files("firmware_sim").joinpath("data/city.geojson")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bluelight", "gateway", "run", "--pki", str(pki.root),
                 "--broker", f"localhost:{broker_port}", "--db", str(self.db), "--http-port", str(self.http_port),
                 "--registry", str(run_dir / REGISTRY_FILE), "--hotlist", str(run_dir / HOTLIST_FILE),
                 "--map", str(city)],
                stdout=log, stderr=subprocess.STDOUT,
            )
        wait_for_port(self.http_port, 30)

    @property
    def api(self) -> str:
        return f"https://localhost:{self.http_port}/api/v1"

    def query(self, sql: str, *args: object) -> list[tuple[object, ...]]:
        db = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        with contextlib.closing(db):
            return db.execute(sql, args).fetchall()

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def broker(pki: Pki, tmp_path: Path) -> Iterator[SupervisedBroker]:
    b = SupervisedBroker(pki, tmp_path)
    yield b
    b.stop()


@pytest.fixture
def gateway(pki: Pki, broker: SupervisedBroker, tmp_path: Path) -> Iterator[Gateway]:
    gw = Gateway(pki, broker.port, tmp_path)
    yield gw
    gw.stop()


async def test_every_model_and_fault_end_to_end(
    pki: Pki, broker: SupervisedBroker, gateway: Gateway, tmp_path: Path
) -> None:
    scenario = parse_scenario(SCENARIO, "ci-everything.yaml")
    truth = tmp_path / "truth.jsonl"
    options = FleetOptions(
        pki_dir=pki.root, broker=broker.broker_addr, run_dir=tmp_path / "sim", gateway_api=gateway.api,
        truth_path=truth, drain_s=20,
    )
    started = time.monotonic()
    summary = await run_fleet(scenario, options)
    elapsed = time.monotonic() - started
    text = "\n".join(summary.lines())
    assert elapsed < 60, text

    # The simulator's own judgement: every incident detected and stored, every fault
    # handled as it should be, nothing valid lost.
    assert summary.ok, text
    assert all(v.ok is True for v in summary.faults), text
    assert all(v.ok is True for v in summary.incidents), text
    assert summary.loss.ok is True, text
    assert summary.lost_devices == {}, text
    assert {v.label.split()[2] for v in summary.faults} == {f.type for f in scenario.faults}

    # What the gateway stored, read from its database.
    counters = {str(name): int(str(n)) for name, n in gateway.query("SELECT name, count FROM counters")}
    assert counters.get("bad_signature", 0) >= 1, counters
    assert counters.get("replayed", 0) >= 3, counters
    assert counters.get("malformed", 0) >= 3, counters
    assert counters.get("too_large", 0) >= 1, counters
    forged = next(r for r in summary.faults if "forged" in r.label)
    first_forged = int(forged.injected.split("from seq ")[1].split()[0])
    assert gateway.query(
        "SELECT count(*) FROM messages WHERE device_id = 'sim-officer-005' AND seq >= ?", first_forged
    ) == [(0,)]
    assert gateway.query(
        "SELECT count(*), count(DISTINCT seq) FROM messages WHERE device_id = 'sim-officer-002' AND seq <= 10"
    )[0] in ((10, 10), (9, 9))
    events = {kind for (kind,) in gateway.query(
        "SELECT DISTINCT json_extract(body, '$.type') FROM messages WHERE kind = 'event'")}
    assert {"panic", "man_down", "gunshot", "anpr_read", "crash"} <= events, events

    # The gateway's API agrees: every healthy device complete, the revoked one stopped.
    api = GatewayApi(gateway.api, pki, "sim-operator")
    devices = api.devices()
    healthy = [d for d in scenario.device_ids if d not in ("sim-officer-005", "sim-officer-006")]
    for ident in healthy:
        assert devices[ident]["missing"] == [], (ident, devices[ident])
    revoked = next(r for r in summary.faults if "revoked" in r.label)
    assert "0 succeeded" in revoked.platform, text

    # The situational picture: each incident became one, alerts went out, simulated
    # officers accepted and their units turned committed; the audit chain verifies.
    incidents = api.get("/incidents")
    types = {i["type"] for i in incidents}
    assert {"panic", "man_down", "gunshot", "anpr_hit", "crash"} <= types, types
    alerts = api.get("/alerts")
    accepted = [a for a in alerts if a["state"] in ("accepted", "arrived")]
    assert accepted, alerts
    panic = next(i for i in incidents if i["type"] == "panic")
    assert panic["subject"] == "sim-officer-002"
    assert "sim-officer-002" not in {a["unit_id"] for a in panic["alerts"]}
    officer_down = [a for i in incidents if i["type"] in ("panic", "man_down") for a in i["alerts"]]
    assert sum(a["role"] == "responder" for a in officer_down) >= 2, officer_down  # (supervisors: test_dispatch)
    for gunshot in (i for i in incidents if i["type"] == "gunshot"):
        # only the armed cars are asked; when all are committed the control room is told why
        armed = [a for a in gunshot["alerts"] if a["unit_id"].startswith("sim-car")]
        assert len(armed) == len(gunshot["alerts"]), gunshot
        assert armed or "armed" in gunshot["recommendation"]["reason"], gunshot
    units = {f["properties"]["id"]: f["properties"] for f in api.get("/picture")["features"]
             if f["properties"]["layer"] == "unit"}
    assert any(u["state"] in ("committed", "at_scene") for u in units.values()), units
    audit = CliRunner().invoke(cli, ["audit", "verify", str(gateway.db), "--pki", str(pki.root)])
    assert audit.exit_code == 0, audit.output
    assert audit.output.startswith("ok: ")

    # Ground truth was written: the run, every incident and every fault.
    records = [json.loads(line) for line in truth.read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert {"run", "incident", "fault"} <= kinds, kinds
    assert sum(r["kind"] == "fault" for r in records) == len(scenario.faults)


def test_cli_lists_and_checks_scenarios(tmp_path: Path) -> None:
    runner = CliRunner()
    listed = runner.invoke(cli, ["sim", "list"])
    assert listed.exit_code == 0, listed.output
    names = [line.split()[0] for line in listed.output.splitlines()]
    assert {"quiet-patrol", "city-shift", "adversarial", "fleet-scale", "demo"} <= set(names)
    checked = runner.invoke(cli, ["sim", "check", "city-shift"])
    assert checked.exit_code == 0
    assert "ok" in checked.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(SCENARIO.replace("type: anpr", "type: anrp"))
    result = runner.invoke(cli, ["sim", "check", str(bad)])
    assert result.exit_code == 1
    line = next(n for n, text in enumerate(bad.read_text().splitlines(), 1) if "anrp" in text)
    assert result.output.strip().splitlines() == [
        f"Error: {bad}:{line}: sensors[1].type: must be one of acoustic, anpr, got 'anrp'; did you mean 'anpr'?"
    ]
    missing = runner.invoke(cli, ["sim", "run", "nope", "--pki", str(tmp_path), "--broker", "localhost:1"])
    assert missing.exit_code == 1
    assert missing.output.startswith("Error: no built-in scenario 'nope'")
