"""The edge agent against a real Mosquitto with mutual TLS: signed telemetry, receipts,
resends, alarms overtaking a backlog after an outage, retained presence and the will.
The test plays the gateway with the gateway's own certificate and key."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography.hazmat.primitives import serialization
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from certs.pki import Identity, Pki
from certs.registry import KeyRegistry
from certs.signing import load_signer
from certs.tls import client_context
from edge_agent.agent import Agent
from edge_agent.outbox import WILL_BODY
from edge_agent.settings import AgentSettings
from edge_agent.wire.envelope import KeySigner, Message, open_envelope, seal
from edge_agent.wire.ids import SENDING_ROLES, Role
from edge_agent.wire.model import receipt_body
from edge_agent.wire.topics import Topic
from edge_agent.wire.verify import verify_message
from tests.helpers import MosquittoProcess

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Got:
    """One verified uplink as the gateway sees it."""

    topic: str
    message: Message
    retain: bool
    data: bytes


def fresh_device(issue: Callable[[Role, str], Identity]) -> str:
    ident = issue(Role.DEVICE, f"agt-{uuid.uuid4().hex[:10]}")
    return ident.id


def settings_for(pki: Pki, device: str, broker: MosquittoProcess, tmp_path: Path, **overrides: Any) -> AgentSettings:
    values: dict[str, Any] = {
        "pki_dir": pki.root,
        "id": device,
        "broker": broker.broker_addr,
        "outbox": tmp_path / f"{device}.db",
        "rate_hz": 10.0,
        "seed": 1,
        "resend_after_s": 30.0,
        "reconnect_min_s": 0.1,
        "reconnect_max_s": 0.4,
        "keepalive_s": 5,
        "progress_every_s": 0,
        "sync": "normal",
    }
    values.update(overrides)
    return AgentSettings(**values)


@contextlib.asynccontextmanager
async def gateway(
    pki: Pki, broker: MosquittoProcess, topic: str, *, identifier: str | None = None, persistent: bool = False
) -> AsyncIterator[aiomqtt.Client]:
    """An MQTT 5 client with the gateway's certificate, subscribed to `topic`."""
    props = None
    if persistent:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 300
    client = aiomqtt.Client(
        "localhost",
        broker.port,
        identifier=identifier or f"gw-test-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=client_context(pki, pki.identity("gateway")),
        clean_start=not persistent,
        properties=props,
    )
    async with client:
        await client.subscribe(topic, qos=1)
        yield client


async def receive(
    client: aiomqtt.Client, keys: KeyRegistry, *, until: Callable[[list[Got]], bool], within_s: float = 10.0
) -> list[Got]:
    """Collect verified uplinks until `until(collected)` holds."""
    got: list[Got] = []
    async with asyncio.timeout(within_s):
        async for m in client.messages:
            assert isinstance(m.payload, bytes)
            message = verify_message(m.topic.value, m.payload, keys, SENDING_ROLES)
            got.append(Got(m.topic.value, message, m.retain, m.payload))
            if until(got):
                return got
    raise AssertionError("unreachable")


async def send_receipt(client: aiomqtt.Client, signer: KeySigner, device: str, seqs: list[int], seq: int = 1) -> None:
    message = Message(signer.kid, seq, int(time.time() * 1000), "cmd", receipt_body(seqs))
    await client.publish(str(Topic.down(device, "cmd")), seal(message, signer), qos=1)


async def eventually(predicate: Callable[[], bool], within_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(agent: Agent, *, install_signals: bool = False) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(agent.run(install_signals=install_signals), name="agent-under-test")
    try:
        yield task
    finally:
        if not task.done():
            agent.stop()
            async with asyncio.timeout(10):
                await task
        agent.close()


@pytest.fixture
def keys(pki: Pki) -> KeyRegistry:
    return KeyRegistry(pki)


@pytest.fixture
def gw_signer(pki: Pki) -> KeySigner:
    key = serialization.load_pem_private_key(pki.identity("gateway").key.read_bytes(), password=None)
    return KeySigner("gateway", key)  # type: ignore[arg-type]


async def test_signed_telemetry_arrives_and_receipts_empty_the_outbox(
    pki: Pki, issue: Any, broker: MosquittoProcess, tmp_path: Path, keys: KeyRegistry, gw_signer: KeySigner
) -> None:
    device = fresh_device(issue)
    agent = Agent(settings_for(pki, device, broker, tmp_path))
    async with gateway(pki, broker, f"bl/v1/{device}/up/#") as gw, running(agent):
        got = await receive(gw, keys, until=lambda g: sum(x.message.kind == "telemetry" for x in g) >= 10)
        kinds = {x.message.kind for x in got}
        assert kinds == {"status", "telemetry"}
        online = next(x.message for x in got if x.message.kind == "status")
        assert online.body == {"state": "online"}
        for x in got:
            assert x.message.sender == device
            assert x.topic == str(Topic.up(device, x.message.kind))
        seqs = [x.message.seq for x in got]
        assert len(set(seqs)) == len(seqs)
        assert all(agent.outbox.seqs().count(s) == 1 for s in seqs)  # sent, but held until receipted

        # Forged and garbage receipts are counted and change nothing.
        forger = load_signer(pki, "dev-a")
        forged = seal(Message("dev-a", 1, 0, "cmd", receipt_body(seqs)), forger)
        await gw.publish(str(Topic.down(device, "cmd")), forged, qos=1)
        await gw.publish(str(Topic.down(device, "cmd")), b"\x00garbage", qos=1)
        await eventually(lambda: agent.link.stats.downlink_rejected.total() == 2, what="rejections")
        assert agent.link.stats.downlink_rejected == {"wrong_role": 1, "malformed": 1}
        assert set(seqs) <= set(agent.outbox.seqs())

        await send_receipt(gw, gw_signer, device, seqs)
        await eventually(lambda: not set(seqs) & set(agent.outbox.seqs()), what="receipted rows to go")
        assert agent.link.stats.receipts == 1
        assert agent.link.stats.confirmed == len(seqs)
        await eventually(lambda: agent.outbox.next_seq > max(seqs) + 3, what="more readings")
        assert agent.outbox.seqs(), "readings not receipted yet must stay in the outbox"


async def test_unreceipted_messages_are_resent_until_receipted(
    pki: Pki, issue: Any, broker: MosquittoProcess, tmp_path: Path, keys: KeyRegistry, gw_signer: KeySigner
) -> None:
    device = fresh_device(issue)
    agent = Agent(settings_for(pki, device, broker, tmp_path, rate_hz=5.0, resend_after_s=0.5))
    async with gateway(pki, broker, f"bl/v1/{device}/up/#") as gw, running(agent):
        got = await receive(gw, keys, until=lambda g: len(g) > len({x.message.seq for x in g}) + 3)
        seen = [x.message.seq for x in got]
        repeated = {s for s in seen if seen.count(s) > 1}
        assert repeated, "nothing was re-sent"
        first = got[0].message.seq
        assert first in repeated, "the oldest unreceipted message is re-sent"
        # Identical bytes: a resend is the same signed message, so the gateway de-duplicates it.
        copies = {x.data for x in got if x.message.seq == first}
        assert len(copies) == 1

        receipted = sorted(set(seen))
        await send_receipt(gw, gw_signer, device, receipted)
        await eventually(lambda: not set(receipted) & set(agent.outbox.seqs()), what="receipt applied")
        late = await receive(gw, keys, until=lambda g: len({x.message.seq for x in g} - set(receipted)) >= 8)
        # Messages already on the wire when the receipt landed may arrive once more, no later.
        after = [x.message.seq for x in late[8:]]
        assert not set(after) & set(receipted)


async def test_panic_overtakes_the_telemetry_backlog_after_a_broker_outage(
    pki: Pki, issue: Any, broker: MosquittoProcess, tmp_path: Path, keys: KeyRegistry
) -> None:
    device = fresh_device(issue)
    agent = Agent(settings_for(pki, device, broker, tmp_path, rate_hz=20.0))
    gw_id = f"gw-persist-{uuid.uuid4().hex[:8]}"
    topic = f"bl/v1/{device}/up/#"
    async with running(agent, install_signals=True):
        async with gateway(pki, broker, topic, identifier=gw_id, persistent=True) as gw:
            await receive(gw, keys, until=lambda g: sum(x.message.kind == "telemetry" for x in g) >= 5)
            broker.stop()  # SIGTERM: Mosquitto saves the gateway's persistent session
            with contextlib.suppress(aiomqtt.MqttError):
                async for _ in gw.messages:
                    pass
        outage_ms = int(time.time() * 1000)
        await eventually(lambda: not agent.link.connected.is_set(), what="agent to notice the outage")
        backlog_from = agent.outbox.next_seq
        await eventually(lambda: agent.outbox.next_seq >= backlog_from + 15, what="a telemetry backlog")
        os.kill(os.getpid(), signal.SIGUSR1)  # the panic button
        await eventually(lambda: bool(agent.outbox.seqs(kind="event")), what="the panic event")
        (event_seq,) = agent.outbox.seqs(kind="event")
        assert event_seq > backlog_from + 10

        broker.start()
        await eventually(lambda: agent.link.stats.connects >= 2, what="agent to reconnect")
        async with gateway(pki, broker, topic, identifier=gw_id, persistent=True) as gw:
            got = await receive(
                gw,
                keys,
                until=lambda g: (
                    any(x.message.kind == "telemetry" and x.message.ts >= outage_ms for x in g)
                    and any(x.message.kind == "event" for x in g)
                ),
            )
    after_outage = [x.message for x in got if x.message.ts >= outage_ms]
    first = after_outage[0]
    assert (first.kind, first.body["type"], first.seq) == ("event", "panic", event_seq)
    assert {"lat", "lon"} <= set(first.body), "the panic carries the last GPS position"
    backlog = [m.seq for m in after_outage if m.kind == "telemetry"]
    assert backlog
    assert min(backlog) < event_seq, "the event overtook older telemetry"


async def test_retained_online_status_and_signed_last_will(
    pki: Pki, issue: Any, broker: MosquittoProcess, tmp_path: Path, keys: KeyRegistry
) -> None:
    device = fresh_device(issue)
    agent = Agent(settings_for(pki, device, broker, tmp_path, rate_hz=2.0))
    status = str(Topic.up(device, "status"))

    def is_status(state: str, above: int = 0) -> Callable[[list[Got]], bool]:
        return lambda g: any(x.message.body.get("state") == state and x.message.seq > above for x in g)

    async with running(agent):
        await eventually(lambda: agent.link.stats.published >= 2, what="online status to be published")
        async with gateway(pki, broker, status) as gw:
            (retained,) = await receive(gw, keys, until=is_status("online"))
            assert retained.retain
            assert retained.message.body == {"state": "online"}
            will = agent.outbox.held_will()
            assert will is not None
            will_seq, will_bytes = will
            assert will_seq > retained.message.seq, "by seq, the will is newer than its connection's online"

            agent.link.sever()  # the connection dies without DISCONNECT
            got = await receive(gw, keys, until=is_status("offline"))
            offline = next(x.message for x in got if x.message.body.get("state") == "offline")
            assert offline.body == WILL_BODY
            assert offline.seq == will_seq
            assert seal_matches(will_bytes, offline)

            # The agent comes back, says online again, and re-sends the will as an ordinary message.
            (back,) = [
                x.message
                for x in await receive(gw, keys, until=is_status("online", above=will_seq))
                if x.message.body.get("state") == "online" and x.message.seq > will_seq
            ]
            assert agent.link.stats.connects == 2
            assert will_seq in agent.outbox.seqs()  # until the gateway's receipt

            second = agent.outbox.held_will()
            assert second is not None
            assert second[0] > back.seq > will_seq
            agent.stop()
            await receive(gw, keys, until=lambda g: any(x.message.seq == second[0] for x in g))
            # The subscriber can see the will before the agent has processed its PUBACK.
            await eventually(lambda: agent.outbox.held_will() is None, what="the published will to be released")
        async with gateway(pki, broker, status) as gw:
            (retained,) = await receive(gw, keys, until=is_status("offline"))
            assert retained.retain
            assert retained.message.seq == second[0]


async def test_cancelling_the_agent_lets_the_broker_publish_the_will(
    pki: Pki, issue: Any, broker: MosquittoProcess, tmp_path: Path, keys: KeyRegistry
) -> None:
    device = fresh_device(issue)
    agent = Agent(settings_for(pki, device, broker, tmp_path, rate_hz=2.0))
    async with gateway(pki, broker, str(Topic.up(device, "status"))) as gw:
        task = asyncio.create_task(agent.run(), name="agent-to-cancel")
        try:
            await receive(gw, keys, until=lambda g: any(x.message.body.get("state") == "online" for x in g))
            will = agent.outbox.held_will()
            assert will is not None
            task.cancel()  # not a graceful stop: no offline status of our own, no DISCONNECT
            with contextlib.suppress(asyncio.CancelledError):
                await task
            got = await receive(gw, keys, until=lambda g: any(x.message.body == WILL_BODY for x in g), within_s=5)
            assert got[-1].message.seq == will[0]
        finally:
            agent.close()


def seal_matches(data: bytes, message: Message) -> bool:
    return open_envelope(data).payload == message.payload()


async def test_refused_publishes_are_counted_and_kept(
    pki: Pki, issue: Any, broker: MosquittoProcess, tmp_path: Path
) -> None:
    """A live revocation (ACL `deny #` on SIGHUP) makes the broker answer PUBACK 135:
    counted, logged, and the messages stay in the outbox."""
    device = fresh_device(issue)
    agent = Agent(settings_for(pki, device, broker, tmp_path, rate_hz=10.0, resend_after_s=0.3))
    async with running(agent):
        await eventually(lambda: agent.link.stats.published >= 3, what="some publishes")
        pki.revoke(device)
        broker.reload()
        await eventually(lambda: agent.link.stats.publish_failures["Not authorized"] >= 5, what="refusals")
        stuck = agent.outbox.seqs()
        assert len(stuck) >= 5
        assert agent.link.connected.is_set()


async def test_cli_runs_an_agent_that_panics_on_sigusr1_and_says_offline_on_sigterm(
    pki: Pki, issue: Any, broker: MosquittoProcess, tmp_path: Path, keys: KeyRegistry
) -> None:
    device = fresh_device(issue)
    args = ["--pki", str(pki.root), "--id", device, "--broker", broker.broker_addr]
    args += ["--outbox", str(tmp_path / "cli.db"), "--rate", "5", "--seed", "3"]
    async with gateway(pki, broker, f"bl/v1/{device}/up/#") as gw:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bluelight",
            "agent",
            "run",
            *args,
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            await receive(gw, keys, until=lambda g: sum(x.message.kind == "telemetry" for x in g) >= 3)
            proc.send_signal(signal.SIGUSR1)
            got = await receive(gw, keys, until=lambda g: any(x.message.kind == "event" for x in g))
            proc.send_signal(signal.SIGTERM)
            await receive(gw, keys, until=lambda g: any(x.message.body.get("state") == "offline" for x in g))
            async with asyncio.timeout(10):
                output = (await proc.communicate())[0].decode()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, output
    assert f"{device} connected to" in output
    assert "Traceback" not in output
    event = next(x.message for x in got if x.message.kind == "event")
    assert event.body["type"] == "panic"
    assert "lat" in event.body


def test_cli_bad_input_is_one_line(pki: Pki, tmp_path: Path) -> None:
    for args, hint in (
        (["--pki", str(pki.root), "--id", "dev-a", "--broker", "nope"], "HOST:PORT"),
        (["--pki", str(pki.root), "--id", "nobody", "--broker", "localhost:8883"], "bluelight pki issue"),
        (["--pki", str(pki.root), "--id", "dev-a"], "--broker"),
        (["--pki", str(pki.root), "--id", "dev-a", "--broker", "localhost:8883", "--rate", "0"], "rate_hz"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "bluelight", "agent", "run", *args, "--outbox", str(tmp_path / "x.db")],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode != 0
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, result.stderr
        assert hint in lines[0]


async def test_a_signed_alert_gets_one_delivery_ack_and_the_officers_answer(
    pki: Pki, issue: Any, broker: MosquittoProcess, tmp_path: Path, keys: KeyRegistry, gw_signer: KeySigner
) -> None:
    device = fresh_device(issue)
    agent = Agent(settings_for(pki, device, broker, tmp_path))
    shown: list[Message] = []
    agent.on_alert = shown.append  # what the officer app does: show it
    body = {"alert_id": "inc-1-a1", "incident_id": "inc-1", "action": "Attend", "lat": 51.5, "lon": -0.12,
            "reasons": ["nearest"], "expires_ts": int(time.time() * 1000) + 60_000}
    alert = seal(Message("gateway", 7, int(time.time() * 1000), "alert", body), gw_signer)
    other = serialization.load_pem_private_key(pki.identity("dev-a").key.read_bytes(), password=None)
    forger = KeySigner("gateway", other)  # type: ignore[arg-type]  # someone else's key, the gateway's kid
    forged = seal(Message("gateway", 8, int(time.time() * 1000), "alert", body), forger)
    async with gateway(pki, broker, f"bl/v1/{device}/up/ack") as gw, running(agent):
        await eventually(agent.link.connected.is_set, what="the agent online")
        for data in (alert, alert, forged):  # a redelivery and a forgery
            await gw.publish(str(Topic.down(device, "alert")), data, qos=1)
        [received] = await receive(gw, keys, until=lambda g: len(g) >= 1)
        assert received.message.body == {"alert_id": "inc-1-a1", "answer": "received"}
        await eventually(lambda: agent.link.stats.downlink_rejected.total() == 1, what="the forgery rejected")
        assert [m.body["alert_id"] for m in shown] == ["inc-1-a1"]  # shown once
        agent.answer("inc-1-a1", "accepted")
        [answer] = await receive(gw, keys, until=lambda g: len(g) >= 1)
        assert answer.message.body == {"alert_id": "inc-1-a1", "answer": "accepted"}
