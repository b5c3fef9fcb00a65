"""The README's run command, as a user runs it: `bluelight demo` brings up PKI, broker,
gateway and fleet; the API shows the fleet; Ctrl-C stops every process it started."""

from __future__ import annotations

import contextlib
import json
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


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_demo_runs_the_platform_and_stops_cleanly(tmp_path: Path) -> None:
    broker_port, http_port = free_port(), free_port()
    log_path = tmp_path / "demo.log"
    with log_path.open("wb") as log:
        demo = subprocess.Popen(
            [sys.executable, "-m", "bluelight", "demo", "--dir", str(tmp_path / "demo"), "--units", "3",
             "--broker-port", str(broker_port), "--http-port", str(http_port), "--panic-every", "2"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            pki = Pki(tmp_path / "demo" / "pki")
            deadline = time.monotonic() + 60
            devices: list[dict[str, object]] = []
            events = 0
            while time.monotonic() < deadline:
                time.sleep(0.5)
                assert demo.poll() is None, log_path.read_text()
                if not _port_open(http_port):
                    continue
                ctx = client_context(pki, pki.identity("control-room"))
                with httpx.Client(verify=ctx, base_url=f"https://localhost:{http_port}") as api:
                    devices = api.get("/api/v1/devices").json()
                    stats = api.get("/api/v1/stats").json()
                db = sqlite3.connect(f"file:{tmp_path / 'demo' / 'gateway.db'}?mode=ro", uri=True)
                with contextlib.closing(db):
                    events = db.execute("SELECT count(*) FROM messages WHERE kind = 'event'").fetchone()[0]
                units = [d for d in devices if str(d["id"]).startswith("unit-")]
                if len(units) == 3 and all(d["online"] and int(str(d["stored"])) >= 3 for d in units) and events:
                    break
            else:
                raise AssertionError(f"demo fleet never showed up: {json.dumps(devices)}\n{log_path.read_text()}")
            assert stats["accepted"] > 0
            assert sum(stats["rejected"].values()) == 0, stats
        finally:
            demo.send_signal(signal.SIGINT)
            code = demo.wait(30)
    output = log_path.read_text()
    assert code == 0, output
    assert "bluelight tail --pki" in output
    assert "pressed panic" in output
    assert not _port_open(broker_port), "broker still running after Ctrl-C"
    assert not _port_open(http_port), "gateway still running after Ctrl-C"
