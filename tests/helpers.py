"""Real processes for tests: a Mosquitto broker with Bluelight's production config on a
free loopback port, started and stopped by PID."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bluelight.broker import Broker, BrokerSettings, find_mosquitto
from certs.pki import Pki


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
        if self.proc is not None:
            stop_process(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class SupervisedBroker:
    """`bluelight broker run`, as the demo and an operator run it: it reloads the CRL
    itself when a certificate is revoked, and restarts a Mosquitto that dies."""

    def __init__(self, pki: Pki, tmp: Path) -> None:
        self.port = free_port()
        self.log_path = tmp / "broker-cli.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bluelight", "broker", "run", "--pki", str(pki.root),
                 "--port", str(self.port), "--data", str(tmp / "broker")],
                stdout=log, stderr=subprocess.STDOUT,
            )
        wait_for_port(self.port, 15)

    @property
    def broker_addr(self) -> str:
        return f"localhost:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s; waits for the process to end."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            kill_pid(proc.pid)
            proc.wait()


class TcpProxy:
    """A loopback TCP forwarder a test can cut and restore: a link outage for the
    clients behind it while everyone else stays connected. TLS passes through untouched."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def cut(self) -> None:
        """Stop accepting and drop every connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._writers -= {writer, up_writer}
