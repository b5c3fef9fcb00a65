"""Real processes for tests: a Mosquitto broker with Bluelight's production config on a
free loopback port, started and stopped by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bluelight.broker import Broker, BrokerSettings, find_mosquitto


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


@dataclass
class MosquittoProcess:
    """Mosquitto run with the exact config `bluelight broker run` writes."""

    settings: BrokerSettings
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.settings.work_dir / "mosquitto.log"

    @property
    def port(self) -> int:
        return self.settings.port

    @property
    def broker_addr(self) -> str:
        return f"localhost:{self.port}"

    def start(self) -> MosquittoProcess:
        broker = Broker(self.settings)
        broker.write_files()
        exe = find_mosquitto()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([exe, "-c", str(broker.config_path)], stdout=log, stderr=log)
        wait_for_port(self.port)
        return self

    def reload(self) -> None:
        """What the broker supervisor does when the CRL changes."""
        Broker(self.settings).write_acl()
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def kill(self) -> None:
        """SIGKILL: in-memory queues are lost, as in a crash."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
