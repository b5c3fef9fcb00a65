"""Store and forward under crashes: nothing a device produced is lost or stored twice.

Real Mosquitto, the real gateway (`bluelight gateway run`, so SIGKILL and SIGSTOP are
real), real agents with their SQLite outboxes. The agents reach the broker through a
TCP proxy, so the test can cut their link while the gateway stays connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from bluelight.broker import BrokerSettings
from certs.pki import Identity, Pki
from edge_agent.agent import Agent
from edge_agent.drivers import Clock, Reading
from edge_agent.settings import AgentSettings
from edge_agent.wire.ids import Role
from tests.helpers import MosquittoProcess, TcpProxy, free_port

TELEMETRY_PER_DEVICE = 80
RATE_HZ = 20.0


class Burst:
    """A fixed number of telemetry readings at a fixed rate, then silence."""

    def __init__(self, count: int, rate_hz: float) -> None:
        self.count, self.rate_hz = count, rate_hz
        self.done = asyncio.Event()

    async def readings(self, clock: Clock) -> AsyncIterator[Reading]:
        for i in range(self.count):
            yield Reading("telemetry", {"lat": 51.5 + i * 1e-5, "lon": -0.12, "acc": 5.0})
            await clock.sleep(1 / self.rate_hz)
        self.done.set()


class GatewayProcess:
    """`bluelight gateway run` as a user starts it."""

    def __init__(self, pki: Pki, broker_port: int, db: Path, log: Path) -> None:
        self.args = [
            sys.executable, "-m", "bluelight", "gateway", "run", "--pki", str(pki.root),
            "--broker", f"localhost:{broker_port}", "--db", str(db), "--http-port", str(free_port()),
        ]
        self.db, self.log_path = db, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)
        if sig == signal.SIGKILL:
            self.proc.wait()

    def connections(self) -> int:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text.count("ingest connected")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stored(self, device: str) -> list[tuple[int, str, int]]:
        """(seq, kind, recv_ts) of every stored message from `device`."""
        if not self.db.exists():
            return []
        db = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        with contextlib.closing(db):
            try:
                return db.execute(
                    "SELECT seq, kind, recv_ts FROM messages WHERE device_id = ? ORDER BY recv_ts, seq", (device,)
                ).fetchall()
            except sqlite3.OperationalError:  # the gateway has not created its schema yet
                return []


async def wait_for(predicate: Callable[[], bool], within_s: float, what: str) -> None:
    try:
        async with asyncio.timeout(within_s):
            while not predicate():
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@pytest.fixture
def crash_broker(pki: Pki, tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A broker whose crash loses its queues (no persistence file to restore)."""
    settings = BrokerSettings(pki_dir=pki.root, port=free_port(), data_dir=tmp_path / "broker", persistence=False)
    proc = MosquittoProcess(settings).start()
    yield proc
    proc.stop()


@pytest.fixture
def gateway(pki: Pki, crash_broker: MosquittoProcess, tmp_path: Path) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(pki, crash_broker.port, tmp_path / "gateway.db", tmp_path / "gateway.log")
    gw.start()
    yield gw
    gw.stop()


def make_agent(pki: Pki, ident: Identity, port: int, outbox: Path) -> tuple[Agent, Burst]:
    burst = Burst(TELEMETRY_PER_DEVICE, RATE_HZ)
    settings = AgentSettings(
        pki_dir=pki.root, id=ident.id, broker=f"localhost:{port}", outbox=outbox, sync="normal",
        resend_after_s=1.0, reconnect_min_s=0.1, reconnect_max_s=0.5, progress_every_s=0,
    )
    return Agent(settings, drivers=[burst]), burst


async def assert_exactly_once(gw: GatewayProcess, agent: Agent) -> None:
    """Every seq the device produced is stored once (the offline status published at
    stop may still be on its way: allow it a few seconds)."""
    produced = list(range(1, agent.outbox.next_seq))
    deadline = time.monotonic() + 10
    while True:
        seqs = [seq for seq, _, _ in gw.stored(agent.id)]
        assert len(seqs) == len(set(seqs)), "a message was stored twice"
        if sorted(seqs) == produced or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    missing = sorted(set(produced) - set(seqs))
    assert not missing, f"{agent.id}: {len(missing)} of {len(produced)} never stored: {missing[:20]}"


async def wait_drained(agents: list[Agent], bursts: list[Burst], within_s: float = 60) -> None:
    """Until every burst is produced and every outbox is empty (all receipted)."""
    deadline = time.monotonic() + within_s
    while not (
        all(b.done.is_set() for b in bursts) and all(sum(a.outbox.stats().pending.values()) == 0 for a in agents)
    ):
        assert time.monotonic() < deadline, [a.outbox.stats() for a in agents]
        await asyncio.sleep(0.2)


async def test_broker_sigkill_with_messages_queued_for_gateway(
    pki: Pki, crash_broker: MosquittoProcess, gateway: GatewayProcess, tmp_path: Path
) -> None:
    idents = [pki.issue(Role.DEVICE, f"sf-broker-{i}") for i in range(2)]
    proxy = TcpProxy(crash_broker.port)
    await proxy.open()
    pairs = [make_agent(pki, ident, proxy.port, tmp_path / f"{ident.id}.db") for ident in idents]
    agents, bursts = [a for a, _ in pairs], [b for _, b in pairs]
    with contextlib.ExitStack() as stack:
        for agent in agents:
            stack.enter_context(agent)
        async with asyncio.TaskGroup() as tg:
            for agent in agents:
                tg.create_task(agent.run())
            await wait_for(lambda: len(gateway.stored(agents[0].id)) >= 10, 30, "telemetry to flow")
            # The gateway stops reading: the broker queues for it, devices get PUBACKs
            # but no receipts.
            gateway.signal(signal.SIGSTOP)
            await asyncio.sleep(1.0)
            await proxy.cut()
            event_seq = agents[0].emit(Reading("event", {"type": "panic", "lat": 51.5, "lon": -0.12}))
            assert event_seq is not None
            crash_broker.kill()
            await asyncio.sleep(0.5)
            crash_broker.start()
            gateway.signal(signal.SIGCONT)
            # The gateway first drains what its dead connections had buffered, then
            # reconnects both (bulk and urgent).
            await wait_for(lambda: gateway.connections() >= 4, 30, "the gateway to reconnect")
            reconnected_ms = time.time_ns() // 1_000_000
            await proxy.open()
            await wait_drained(agents, bursts)
            for agent in agents:
                agent.stop()
    await proxy.cut()
    for agent in agents:
        await assert_exactly_once(gateway, agent)
    after = [row for row in gateway.stored(agents[0].id) if row[2] >= reconnected_ms]
    event_ms = next(recv_ts for seq, _, recv_ts in after if seq == event_seq)
    # The agent sends the alarm first; it comes in on the gateway's urgent connection,
    # the telemetry backlog on the bulk one, read in whichever order the event loop sees
    # the two sockets: so first, or within a few milliseconds of the first telemetry.
    first_ms = min(recv_ts for _, _, recv_ts in after)
    assert event_ms <= first_ms + 25, f"the alarm was not first: {after[:5]}"


async def test_gateway_sigkill_and_restart(pki: Pki, crash_broker: MosquittoProcess, gateway: GatewayProcess,
                                           tmp_path: Path) -> None:
    idents = [pki.issue(Role.DEVICE, f"sf-gateway-{i}") for i in range(2)]
    pairs = [make_agent(pki, ident, crash_broker.port, tmp_path / f"{ident.id}.db") for ident in idents]
    agents, bursts = [a for a, _ in pairs], [b for _, b in pairs]
    with contextlib.ExitStack() as stack:
        for agent in agents:
            stack.enter_context(agent)
        async with asyncio.TaskGroup() as tg:
            for agent in agents:
                tg.create_task(agent.run())
            await wait_for(lambda: len(gateway.stored(agents[0].id)) >= 10, 30, "telemetry to flow")
            gateway.signal(signal.SIGKILL)
            assert agents[1].emit(Reading("event", {"type": "panic", "lat": 51.5, "lon": -0.12})) is not None
            await asyncio.sleep(1.5)
            gateway.start()
            await wait_drained(agents, bursts)
            for agent in agents:
                agent.stop()
    for agent in agents:
        await assert_exactly_once(gateway, agent)
