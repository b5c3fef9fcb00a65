"""The README's run command, as a user runs it: `bluelight demo` brings up PKI, broker,
gateway and the simulator's `demo` scenario (47 units, 6 fixed sensors, incidents); the
API shows the fleet's telemetry, the scenario's first incident (a panic at 1 minute,
here at 20x) is stored, becomes an incident and alerts other officers, who accept;
Ctrl-C stops every process it started."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

from certs.pki import Pki
from certs.tls import client_context
from tests.helpers import free_port

#: The demo scenario's fleet and its first incident.
UNITS, SENSORS = 47, 6
FIRST_PANIC_UNIT = "officer-004"
SPEED = 20


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (children, grandchildren, ...)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{parent}/task"):
                with contextlib.suppress(OSError):
                    children = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
                    for child in map(int, children):
                        if child not in found:
                            found.add(child)
                            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _panics(db_path: Path) -> int:
    if not db_path.exists():
        return 0
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    with contextlib.closing(db):
        try:
            row = db.execute(
                "SELECT count(*) FROM messages WHERE kind = 'event' AND device_id = ? "
                "AND json_extract(body, '$.type') = 'panic'",
                (FIRST_PANIC_UNIT,),
            ).fetchone()
        except sqlite3.OperationalError:  # the gateway has not created its tables yet
            return 0
    return int(row[0])


def test_demo_runs_the_scenario_and_stops_cleanly(tmp_path: Path) -> None:
    broker_port, http_port = free_port(), free_port()
    work = tmp_path / "demo"
    log_path = tmp_path / "demo.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        demo = subprocess.Popen(
            [sys.executable, "-m", "bluelight", "demo", "--dir", str(work), "--broker-port", str(broker_port),
             "--http-port", str(http_port), "--speed", str(SPEED)],
            stdout=log, stderr=subprocess.STDOUT,
        )
        children: set[int] = set()
        left: list[int] = []
        try:
            pki = Pki(work / "pki")
            deadline = time.monotonic() + 45
            devices: list[dict[str, object]] = []
            panics = 0
            accepted: list[dict[str, object]] = []
            while time.monotonic() < deadline:
                time.sleep(0.5)
                assert demo.poll() is None, log_path.read_text()
                children |= _descendants(demo.pid)
                if not _port_open(http_port):
                    continue
                ctx = client_context(pki, pki.identity("control-room"))
                with httpx.Client(verify=ctx, base_url=f"https://localhost:{http_port}") as api:
                    devices = api.get("/api/v1/devices").json()
                    stats = api.get("/api/v1/stats").json()
                    incidents = api.get("/api/v1/incidents").json()
                panics = _panics(work / "gateway.db")
                reporting = [d for d in devices if int(str(d["stored"])) >= 3]
                units = [d for d in reporting if str(d["id"]).startswith(("officer-", "car-", "arv-"))]
                accepted = [a for i in incidents if i["type"] == "panic" and i["subject"] == FIRST_PANIC_UNIT
                            for a in i["alerts"] if a["state"] in ("accepted", "arrived")]
                if len(units) == UNITS and len(reporting) >= UNITS + SENSORS and panics and accepted:
                    break
            else:
                seen = {str(d["id"]): d["stored"] for d in devices}
                raise AssertionError(f"demo fleet or its first panic never showed up (panics {panics}, "
                                     f"accepted alerts {len(accepted)}): "
                                     f"{json.dumps(seen)}\n{log_path.read_text()[-5000:]}")
            assert stats["accepted"] > 0
            assert FIRST_PANIC_UNIT not in {a["unit_id"] for a in accepted}
            assert sum(stats["rejected"].values()) == 0, stats
        finally:
            children |= _descendants(demo.pid)
            demo.send_signal(signal.SIGINT)
            try:
                code = demo.wait(30)
            finally:
                if demo.poll() is None:
                    demo.kill()
                time.sleep(0.2)
                left = [pid for pid in children if _alive(pid)]
                for pid in left:  # do not leave them to the next test
                    os.kill(pid, signal.SIGKILL)
    output = log_path.read_text()
    assert code == 0, output
    assert "bluelight tail --pki" in output
    assert "scenario 'demo'" in output
    assert f"incident panic: {FIRST_PANIC_UNIT} pressed panic" in output
    assert "demo: stopped" in output
    assert len(children) >= 2, f"expected the broker and the gateway below the demo, saw {children}"
    assert not left, f"processes left after Ctrl-C: {left}"
    assert not _port_open(broker_port), "broker still running after Ctrl-C"
    assert not _port_open(http_port), "gateway still running after Ctrl-C"
    assert time.monotonic() - started < 60
