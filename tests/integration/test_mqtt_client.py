"""The agent's own MQTT 5 connection: against a real Mosquitto (mutual TLS, ACLs), and
against a scripted TLS peer for what a healthy broker will not do on demand (refuse a
CONNACK, go silent, send garbage, disconnect with a reason)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiomqtt
import pytest

from certs.pki import DEFAULT_GATEWAY_ID, Pki
from certs.tls import client_context, server_context
from edge_agent.mqtt.client import ConnectionLost, ConnectOptions, ConnectRefused, MqttConnection
from edge_agent.wire.ids import Role
from edge_agent.wire.topics import Topic
from tests.helpers import MosquittoProcess

pytestmark = pytest.mark.integration


async def test_publishes_are_acknowledged_and_an_acl_refusal_has_its_reason(
    pki: Pki, broker: MosquittoProcess
) -> None:
    acks: list[tuple[int, int]] = []
    conn = await MqttConnection.open(
        "localhost", broker.port, client_context(pki, pki.require_identity("dev-a")), ConnectOptions("dev-a"),
        on_puback=lambda mid, reason: acks.append((mid, reason)),
    )
    try:
        own = conn.publish(str(Topic.up("dev-a", "telemetry")).encode(), b"x" * 300)
        other = conn.publish(str(Topic.up("dev-b", "telemetry")).encode(), b"y")  # not ours to write
        big = conn.publish(str(Topic.up("dev-a", "telemetry")).encode(), b"z" * 20_000)
        deadline = time.monotonic() + 5
        while len(acks) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        reasons = dict(acks)
        assert sorted(reasons) == sorted([own, other, big])
        assert reasons[other] == 0x87  # not authorized
        assert {reasons[own], reasons[big]} <= {0x00, 0x10}  # success, or success with no subscriber
        assert await conn.publish_acked(str(Topic.up("dev-a", "status")).encode(), b"s", retain=True) < 0x80
    finally:
        await conn.disconnect()
    await conn.wait_closed()  # a clean close raises nothing
    assert not conn.is_open


async def test_a_downlink_is_acknowledged_only_after_its_handler_returns(pki: Pki, broker: MosquittoProcess) -> None:
    down = str(Topic.down("dev-b", "cmd"))
    tls = client_context(pki, pki.require_identity("dev-b"))
    options = ConnectOptions("dev-b", session_expiry_s=300)
    got: list[bytes] = []

    def failing(_topic: str, _payload: bytes) -> None:
        raise RuntimeError("disk full")

    conn = await MqttConnection.open("localhost", broker.port, tls, options, on_message=failing)
    assert await conn.subscribe("bl/v1/dev-b/down/#") == (1,)
    async with _gateway(pki, broker) as gw:
        await gw.publish(down, b"first", qos=1)
        with pytest.raises(RuntimeError, match="disk full"):
            await asyncio.wait_for(conn.wait_closed(), 5)

        # The same session again: the unacknowledged message comes back, and is acknowledged now.
        conn = await MqttConnection.open(
            "localhost", broker.port, tls, options, on_message=lambda topic, payload: got.append(payload)
        )
        await _until(lambda: got == [b"first"], "the redelivery")
        await conn.disconnect()

        await gw.publish(down, b"second", qos=1)
        got.clear()
        conn = await MqttConnection.open(
            "localhost", broker.port, tls, options, on_message=lambda topic, payload: got.append(payload)
        )
        await _until(lambda: got == [b"second"], "the next message")
        await asyncio.sleep(0.3)
        assert got == [b"second"]  # "first" was acknowledged: not delivered a third time
        await conn.disconnect()


async def test_an_idle_connection_is_kept_up_by_pings(pki: Pki, broker: MosquittoProcess) -> None:
    conn = await MqttConnection.open(
        "localhost", broker.port, client_context(pki, pki.require_identity("dev-a")),
        ConnectOptions("dev-a", keepalive_s=2),
    )
    await asyncio.sleep(4.5)  # past 1.5 x keepalive: the broker would have dropped a silent client
    assert conn.is_open
    assert await conn.publish_acked(str(Topic.up("dev-a", "telemetry")).encode(), b"still here") < 0x80
    await conn.disconnect()


async def test_a_certificate_from_another_ca_is_refused(pki: Pki, broker: MosquittoProcess, tmp_path: Path) -> None:
    other = Pki(tmp_path / "other-pki")
    other.init()
    stranger = other.issue(Role.DEVICE, "dev-a")  # the right name, the wrong CA
    tls = ssl.create_default_context(cafile=str(pki.ca_bundle))  # it trusts the broker
    tls.load_cert_chain(str(stranger.chain), str(stranger.key))
    with pytest.raises(ConnectionLost, match=r"cannot connect|closed before CONNACK"):
        await MqttConnection.open("localhost", broker.port, tls, ConnectOptions("dev-a", timeout_s=5))


# -- a scripted TLS peer ------------------------------------------------------------------


@asynccontextmanager
async def _peer(pki: Pki, script: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
                ) -> AsyncIterator[int]:
    """A TLS server with the broker's certificate that runs `script` for each connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context(pki, pki.broker))
    async with server:
        yield server.sockets[0].getsockname()[1]


async def _read_connect(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readexactly(2)
    assert head[0] == 0x10
    length, shift, byte = 0, 0, head[1]
    while True:
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        byte = (await reader.readexactly(1))[0]
    return await reader.readexactly(length)


def _script(*replies: bytes) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """Read the CONNECT, send `replies` (one write each), then answer nothing until the
    client goes."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_connect(reader)
        for reply in replies:
            writer.write(reply)
            await writer.drain()
            await asyncio.sleep(0.05)
        with contextlib.suppress(ConnectionError):
            while await reader.read(4096):
                pass

    return script


CONNACK_OK = b"\x20\x03\x00\x00\x00"


@pytest.mark.parametrize(
    ("replies", "error", "match"),
    [
        ((b"\x20\x03\x00\x87\x00",), ConnectRefused, r"Not authorized \(135\)"),
        ((b"\x20\x03\x00\x85\x00",), ConnectRefused, r"Client identifier not valid"),
        ((), ConnectionLost, "no CONNACK"),
    ],
)
async def test_connect_failures_say_what_happened(
    pki: Pki, replies: tuple[bytes, ...], error: type[Exception], match: str
) -> None:
    async with _peer(pki, _script(*replies)) as port:
        with pytest.raises(error, match=match):
            await MqttConnection.open(
                "localhost", port, client_context(pki, pki.require_identity("dev-a")),
                ConnectOptions("dev-a", timeout_s=1),
            )


@pytest.mark.parametrize(
    ("replies", "keepalive", "match"),
    [
        ((CONNACK_OK,), 1, "no PINGRESP"),  # the broker went silent
        ((CONNACK_OK, b"\xf5\x00"), 30, "malformed packet"),  # reserved flags on AUTH: not MQTT 5 as we speak it
        ((CONNACK_OK, b"\xe0\x01\x8e"), 30, r"broker disconnected: Session taken over \(142\)"),
    ],
)
async def test_a_connection_that_goes_bad_ends_with_a_reason(
    pki: Pki, replies: tuple[bytes, ...], keepalive: int, match: str
) -> None:
    async with _peer(pki, _script(*replies)) as port:
        conn = await MqttConnection.open(
            "localhost", port, client_context(pki, pki.require_identity("dev-a")),
            ConnectOptions("dev-a", keepalive_s=keepalive, timeout_s=2),
        )
        started = time.monotonic()
        with pytest.raises(ConnectionLost, match=match):
            await asyncio.wait_for(conn.wait_closed(), 5)
        assert time.monotonic() - started < 3 * keepalive
        with pytest.raises(ConnectionLost):
            conn.publish(b"bl/v1/dev-a/up/telemetry", b"after the end")


async def test_a_broker_gone_silent_is_detected_while_publishing(pki: Pki) -> None:
    """Writes alone do not prove the link is alive: a client that keeps publishing but
    hears nothing back pings, and drops the connection when no PINGRESP comes."""
    async with _peer(pki, _script(CONNACK_OK)) as port:
        conn = await MqttConnection.open(
            "localhost", port, client_context(pki, pki.require_identity("dev-a")),
            ConnectOptions("dev-a", keepalive_s=1, timeout_s=2),
        )

        async def keep_publishing() -> None:
            while True:  # until publish() raises: the connection has ended
                conn.publish(b"bl/v1/dev-a/up/telemetry", b"into the void")
                await asyncio.sleep(0.05)

        started = time.monotonic()
        with pytest.raises(ConnectionLost, match="the connection is closed"):
            await asyncio.wait_for(keep_publishing(), 5)
        assert time.monotonic() - started < 3
        with pytest.raises(ConnectionLost, match="no PINGRESP"):
            await conn.wait_closed()


# -- helpers --------------------------------------------------------------------------------


@asynccontextmanager
async def _gateway(pki: Pki, broker: MosquittoProcess) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(
        "localhost", broker.port, identifier="gateway", protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=client_context(pki, pki.require_identity(DEFAULT_GATEWAY_ID)),
    ) as client:
        yield client


async def _until(predicate: Callable[[], bool], what: str, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
