"""The gateway ingest against a real Mosquitto with mutual TLS: devices publish signed
envelopes with aiomqtt, the gateway (run in-process, and once through the CLI) verifies,
stores and sends signed receipts; bad input is rejected and counted while valid traffic
keeps flowing; revocation takes effect without a restart."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization

from certs.pki import Identity, Pki
from certs.registry import KeyRegistry
from certs.tls import client_context
from edge_agent.link import verify_downlink
from edge_agent.wire.envelope import KeySigner, Message, seal
from edge_agent.wire.ids import Role
from edge_agent.wire.model import parse_ranges
from edge_agent.wire.topics import Topic, down_filter
from gateway.service import Gateway
from gateway.settings import GatewaySettings
from gateway.store import Store
from tests.helpers import MosquittoProcess, free_port, wait_for_port
from tests.unit.test_gateway_core import oversized

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BODY = {"lat": 51.5, "lon": -0.12}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def eventually(check: Callable[[], Any], within: float = 10.0, what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what} (last: {result!r})")
        await asyncio.sleep(0.05)


def read(db: Path, fn: Callable[[Store], Any]) -> Any:
    if not db.exists():
        return None
    with Store.open(db, readonly=True) as store:
        return fn(store)


class Device:
    """A device identity on its own MQTT 5 connection, collecting verified receipts."""

    def __init__(self, pki: Pki, ident: Identity, client: aiomqtt.Client) -> None:
        key = serialization.load_pem_private_key(ident.key.read_bytes(), password=None)
        self.id = ident.id
        self.signer = KeySigner(ident.id, key)  # type: ignore[arg-type]
        self.client = client
        self.registry = KeyRegistry(pki)
        self.receipts: list[Message] = []
        self.receipted: set[int] = set()
        self.alerts: list[Message] = []
        self.withdrawn: list[str] = []

    def seal(self, seq: int, kind: str = "telemetry", body: dict[str, Any] | None = None) -> bytes:
        return seal(Message(self.id, seq, now_ms(), kind, BODY if body is None else body), self.signer)

    async def send(self, seq: int, kind: str = "telemetry", body: dict[str, Any] | None = None) -> bytes:
        data = self.seal(seq, kind, body)
        await self.send_raw(data, kind)
        return data

    async def send_raw(self, data: bytes, kind: str = "telemetry") -> None:
        await self.client.publish(str(Topic.up(self.id, kind)), data, qos=1)

    async def read_receipts(self) -> None:
        async for message in self.client.messages:
            payload = message.payload
            assert isinstance(payload, bytes)
            receipt = verify_downlink(message.topic.value, payload, self.id, self.registry)
            assert receipt.sender == "gateway"
            if receipt.kind == "alert":
                self.alerts.append(receipt)
                continue
            if receipt.body["type"] == "withdraw":  # an alert that timed out or was reassigned
                self.withdrawn.append(receipt.body["alert_id"])
                continue
            assert receipt.body["type"] == "receipt"
            self.receipts.append(receipt)
            for lo, hi in parse_ranges(receipt.body["ranges"]):
                self.receipted.update(range(lo, hi + 1))


@contextlib.asynccontextmanager
async def device(pki: Pki, ident: Identity, broker: MosquittoProcess) -> AsyncIterator[Device]:
    async with aiomqtt.Client(
        "localhost",
        broker.port,
        identifier=ident.id,
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=client_context(pki, ident),
    ) as client:
        client.pending_calls_threshold = 10_000  # some tests publish bursts on purpose
        await client.subscribe(down_filter(ident.id), qos=1)
        dev = Device(pki, ident, client)
        reader = asyncio.create_task(dev.read_receipts())
        try:
            yield dev
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


def fresh(issue: Callable[[Role, str], Identity], prefix: str = "gwt") -> Identity:
    return issue(Role.DEVICE, f"{prefix}-{uuid.uuid4().hex[:8]}")


def settings_for(pki: Pki, broker: MosquittoProcess, db: Path, **overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {
        "pki_dir": pki.root,
        "broker": broker.broker_addr,
        "db_path": db,
        "http_port": 0,
        "batch_latency_ms": 20,
        "receipt_interval_ms": 100,
        "report_interval_s": 1.0,
    }
    values.update(overrides)
    return GatewaySettings(**values)


@contextlib.asynccontextmanager
async def running(settings: GatewaySettings) -> AsyncIterator[Gateway]:
    gw = Gateway(settings)
    task = asyncio.create_task(gw.run(), name="test-gateway")
    try:
        async with asyncio.timeout(15):
            await gw.ready.wait()
            assert gw.ingest is not None
            await gw.ingest.connected.wait()
        yield gw
    finally:
        gw.stop()
        async with asyncio.timeout(15):
            await task


@pytest_asyncio.fixture
async def gateway(pki: Pki, broker: MosquittoProcess, tmp_path: Path) -> AsyncIterator[Gateway]:
    async with running(settings_for(pki, broker, tmp_path / "gw.db")) as gw:
        yield gw


@pytest.mark.parametrize("workers", [0, 2], ids=["verify-thread", "verify-processes"])
async def test_valid_telemetry_is_stored_and_receipted(
    pki: Pki, broker: MosquittoProcess, tmp_path: Path, issue: Callable[[Role, str], Identity], workers: int
) -> None:
    settings = settings_for(pki, broker, tmp_path / "gw.db", verify_workers=workers)
    db = settings.db_path
    async with running(settings), device(pki, fresh(issue), broker) as dev:
        sent = [await dev.send(seq) for seq in (1, 2, 3)]
        await eventually(lambda: dev.receipted >= {1, 2, 3}, what="a receipt for seqs 1-3")
    rows = read(db, lambda s: s.messages(dev.id))
    assert [(r["seq"], r["kind"], r["body"]) for r in rows] == [(i, "telemetry", BODY) for i in (1, 2, 3)]
    assert all(r["recv_ts"] >= r["ts"] - 2000 for r in rows)
    assert read(db, lambda s: s.raw(dev.id, 2)) == sent[1]  # the signed envelope, as received
    receipt = dev.receipts[0]
    assert receipt.body["ranges"][0][0] == 1
    stats = read(db, Store.stats)
    assert stats["accepted"] == 3
    assert stats["rejected"]["replayed"] == 0


async def test_bad_messages_are_rejected_and_counted_while_valid_traffic_flows(
    gateway: Gateway, pki: Pki, broker: MosquittoProcess, issue: Callable[[Role, str], Identity]
) -> None:
    db = gateway.settings.db_path
    good_n = 300
    async with device(pki, fresh(issue), broker) as bad, device(pki, fresh(issue), broker) as good:

        async def valid_stream() -> None:
            for seq in range(1, good_n + 1):
                await good.send(seq)

        async def attacks() -> None:
            first = await bad.send(1)
            await bad.send_raw(first)  # replayed: the same bytes again
            forger = KeySigner(bad.id, good.signer.key)  # someone else's key under bad's kid
            await bad.send_raw(seal(Message(bad.id, 2, now_ms(), "telemetry", BODY), forger))
            await bad.send_raw(os.urandom(200))  # garbage
            await bad.send_raw(bad.seal(3)[:-40])  # truncated envelope
            await bad.send_raw(oversized(bad.signer, 4))  # > 64 KiB
            await bad.send_raw(bad.seal(5, "telemetry"), kind="event")  # kind differs from the topic
            await bad.send(6)

        await asyncio.gather(valid_stream(), attacks())
        await eventually(
            lambda: (row := read(db, lambda s: s.device(good.id))) and row["stored"] == good_n,
            what="every valid message stored",
        )
        await eventually(lambda: {1, 6} <= bad.receipted, what="receipts for the bad device's valid seqs")
    stats = read(db, Store.stats)
    rejected = stats["rejected"]
    assert rejected["replayed"] == 1
    assert rejected["bad_signature"] == 1
    assert rejected["malformed"] == 2
    assert rejected["too_large"] == 1
    assert rejected["topic_mismatch"] == 1
    assert stats["accepted"] == good_n + 2
    assert [m["seq"] for m in read(db, lambda s: s.messages(bad.id))] == [1, 6]
    good_row = read(db, lambda s: s.device(good.id))
    assert (good_row["last_seq"], good_row["missing"]) == (good_n, [])


async def test_revoked_device_is_rejected_at_once(
    gateway: Gateway, pki: Pki, broker: MosquittoProcess, issue: Callable[[Role, str], Identity]
) -> None:
    db = gateway.settings.db_path
    async with device(pki, fresh(issue, "rev"), broker) as dev:
        await dev.send(1)
        await eventually(lambda: 1 in dev.receipted, what="the first message stored")
        pki.revoke(dev.id)  # the broker is not reloaded: the session stays open
        await dev.send(2)
        await eventually(lambda: read(db, Store.stats)["rejected"]["revoked"] == 1, 2.0, "a `revoked` rejection")
        await dev.send(3)
        await eventually(lambda: read(db, Store.stats)["rejected"]["revoked"] == 2, 2.0, "another one")
    assert [m["seq"] for m in read(db, lambda s: s.messages(dev.id))] == [1]
    assert dev.receipted == {1}


async def test_device_list_shows_missing_seqs_and_presence(
    gateway: Gateway, pki: Pki, broker: MosquittoProcess, issue: Callable[[Role, str], Identity]
) -> None:
    db = gateway.settings.db_path
    async with device(pki, fresh(issue), broker) as dev:
        for seq in (1, 2, 4):
            await dev.send(seq)
        row = await eventually(lambda: (r := read(db, lambda s: s.device(dev.id))) and r["stored"] == 3 and r)
        assert (row["last_seq"], row["stored"], row["missing"], row["missing_count"]) == (4, 3, [3], 1)
        assert (row["role"], row["online"]) == ("device", None)
        await dev.send(5, "status", {"state": "online"})
        await dev.send(3)  # the late arrival fills the gap
        row = await eventually(lambda: (r := read(db, lambda s: s.device(dev.id))) and r["stored"] == 5 and r)
        assert (row["missing"], row["missing_count"], row["online"], row["state"]) == ([], 0, True, "online")
        await dev.send(6, "status", {"state": "offline", "reason": "test"})
        row = await eventually(lambda: (r := read(db, lambda s: s.device(dev.id))) and r["stored"] == 6 and r)
        assert row["online"] is False


async def test_messages_queued_while_the_gateway_is_down_are_stored_once(
    pki: Pki, broker: MosquittoProcess, tmp_path: Path, issue: Callable[[Role, str], Identity]
) -> None:
    """The gateway's persistent session: the broker queues for it while it is stopped;
    its own receipt sequence numbers continue after a restart."""
    settings = settings_for(pki, broker, tmp_path / "gw.db")
    async with device(pki, fresh(issue), broker) as dev:
        async with running(settings):
            await dev.send(1)
            await eventually(lambda: 1 in dev.receipted, what="a receipt before the restart")
        first_receipt_seq = dev.receipts[-1].seq
        for seq in range(2, 202):
            await dev.send(seq)
        await dev.send(1)  # a resend of something already stored
        async with running(settings):
            await eventually(lambda: set(range(1, 202)) <= dev.receipted, what="receipts for everything")
    rows = read(settings.db_path, lambda s: s.messages(dev.id))
    assert [r["seq"] for r in rows] == list(range(1, 202))
    assert dev.receipts[-1].seq > first_receipt_seq
    assert read(settings.db_path, Store.stats)["rejected"]["replayed"] >= 1


async def test_a_burst_larger_than_the_inbox_is_stored_without_loss(
    pki: Pki, broker: MosquittoProcess, tmp_path: Path, issue: Callable[[Role, str], Identity]
) -> None:
    """Thousands of messages queued for the gateway's session arrive in one burst on
    reconnect (before the SUBACK) and again while it runs: reading pauses at the inbox
    bound instead of dropping, and the gateway keeps ingesting (it once wedged here)."""
    settings = settings_for(pki, broker, tmp_path / "gw.db", queue_bound=1024)
    per_device, n_devices = 1500, 3
    async with contextlib.AsyncExitStack() as stack:
        devs = [await stack.enter_async_context(device(pki, fresh(issue, "burst"), broker)) for _ in range(n_devices)]

        async def burst(first: int) -> None:
            sealed = [(dev, dev.seal(seq)) for seq in range(first, first + per_device) for dev in devs]
            await asyncio.gather(*(dev.send_raw(data) for dev, data in sealed))

        async with running(settings):
            pass  # makes the persistent session
        await burst(1)  # queued by the broker while the gateway is stopped
        async with running(settings) as gw:
            assert gw.ingest is not None
            await burst(per_device + 1)  # and a second burst while it is busy with the first
            want = set(range(1, 2 * per_device + 1))
            await eventually(lambda: all(want <= dev.receipted for dev in devs), within=60, what="every receipt")
            live = gw.ingest.live()
            assert live["overflow"] == 0
            assert live["read_pauses"] > 0  # back-pressure did its work
            assert live["connected"] is True
    for dev in devs:
        stored = read(settings.db_path, lambda s, d=dev: s.messages(d.id, limit=len(want) + 1))
        assert [r["seq"] for r in stored] == sorted(want)


async def test_both_ingest_connections_send_small_packets_at_once(gateway: Gateway) -> None:
    assert gateway.ingest is not None
    await gateway.ingest.connected.wait()
    for lane in (gateway.ingest._bulk, gateway.ingest._urgent):
        assert lane.client is not None
        sock = lane.client._client.socket()
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


async def test_an_alarm_overtakes_a_telemetry_backlog(
    pki: Pki, broker: MosquittoProcess, tmp_path: Path, issue: Callable[[Role, str], Identity]
) -> None:
    """Telemetry queued while the gateway was away arrives as a backlog of thousands; a
    panic pressed meanwhile has its own connection and queue, so it is stored and
    receipted long before the backlog is, and nothing of the backlog is lost."""
    settings = settings_for(pki, broker, tmp_path / "gw.db", queue_bound=1024, verify_workers=0)
    per_device, n_devices = 3000, 4
    async with contextlib.AsyncExitStack() as stack:
        devs = [await stack.enter_async_context(device(pki, fresh(issue, "lag"), broker)) for _ in range(n_devices)]
        officer = await stack.enter_async_context(device(pki, fresh(issue, "sos"), broker))
        async with running(settings):
            pass  # makes the persistent sessions
        sealed = [(dev, dev.seal(seq)) for seq in range(1, per_device + 1) for dev in devs]
        await asyncio.gather(*(dev.send_raw(data) for dev, data in sealed))
        async with running(settings) as gw:
            assert gw.ingest is not None
            await gw.ingest.connected.wait()
            await officer.send(1, "event", {"type": "panic"})
            await eventually(lambda: 1 in officer.receipted, within=30, what="the panic's receipt")
            backlog_stored = read(settings.db_path, Store.stats)["accepted"]
            assert backlog_stored < n_devices * per_device // 2, "the panic waited for the backlog"
            await eventually(lambda: all(dev.receipted >= set(range(1, per_device + 1)) for dev in devs),
                             within=90, what="every backlog receipt")
            assert gw.ingest.live()["overflow"] == 0
    [panic] = read(settings.db_path, lambda s: s.messages(officer.id))
    assert panic["kind"] == "event"
    assert read(settings.db_path, Store.stats)["accepted"] == n_devices * per_device + 1


async def test_cli_run_and_tail(
    pki: Pki, broker: MosquittoProcess, tmp_path: Path, issue: Callable[[Role, str], Identity]
) -> None:
    """`bluelight gateway run` prints where its API is and stops cleanly on Ctrl-C;
    `bluelight tail` prints verified lines and REJECTED lines."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    http_port = free_port()
    common = ("--pki", str(pki.root), "--broker", broker.broker_addr)
    gw = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bluelight", "gateway", "run", *common, "--db", str(tmp_path / "cli.db"),
        "--http-port", str(http_port), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    tail = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bluelight", "tail", *common,
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        await asyncio.to_thread(wait_for_port, http_port, 30)
        await eventually(lambda: _connected(broker, "-tail-"), 30, "tail to connect")
        await asyncio.sleep(0.5)  # its SUBSCRIBE follows the CONNACK at once
        async with device(pki, fresh(issue), broker) as dev:
            await dev.send(1, "event", {"type": "panic"})
            await dev.send_raw(b"\x00garbage")
            await eventually(lambda: 1 in dev.receipted, 15, "a receipt from the CLI gateway")
    finally:
        for proc in (tail, gw):
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            tail_out, tail_err = await tail.communicate()
            gw_out, gw_err = await gw.communicate()
    assert gw.returncode == 0, gw_err.decode()
    assert f"API at https://127.0.0.1:{http_port}/api/v1" in gw_out.decode()
    assert tail.returncode == 0, tail_err.decode()
    lines = tail_out.decode().splitlines()
    assert any(f" {dev.id} #1 event " in line and '{"type":"panic"}' in line for line in lines), lines
    assert any(line.startswith(f"REJECTED malformed bl/v1/{dev.id}/up/telemetry: ") for line in lines), lines


def _connected(broker: MosquittoProcess, marker: str) -> bool:
    return any(marker in line and "New client connected" in line for line in broker.log().splitlines())
