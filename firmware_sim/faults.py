"""Fault injection: the pieces the fleet runner uses to break things on purpose.

- `CutProxy`: a loopback TCP relay between devices and the broker that can be cut
  (every connection dropped, new ones refused) and restored: link flapping and outages
  per device, and a broker outage for every device at once. TLS passes through untouched.
- `ForgeableSigner`: a device's signer that can switch to a fresh key its certificate
  does not hold (a forged device: the gateway must reject it as `bad_signature`).
- `Capture` and `publish_raw`: a replay attacker records a device's signed messages as
  they are committed and later re-publishes the exact bytes on the device's topic; a
  malformed-payload sender publishes garbage (`garbage_payloads`) on its own topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import aiomqtt
import cbor2
from aiomqtt import MqttError, ProtocolVersion
from cryptography.hazmat.primitives.asymmetric import ec

from certs.pki import Pki
from certs.tls import client_context
from edge_agent.agent import Agent
from edge_agent.wire.envelope import MAX_ENVELOPE_BYTES, KeySigner, Signer
from edge_agent.wire.topics import Topic

log = logging.getLogger(__name__)

#: Bytes buffered towards one side of a relayed connection before reading the other pauses.
_HIGH_WATER = 256 * 1024


class _Half(asyncio.Protocol):
    """One side of a relayed connection; writes what it reads to its peer."""

    def __init__(self, proxy: CutProxy, *, client: bool) -> None:
        self.proxy = proxy
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's do not subclass asyncio.Transport, so no isinstance.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=_HIGH_WATER)
        self.proxy._transports.add(transport)
        if self.client:
            self.proxy._connect_upstream(self)

    def data_received(self, data: bytes) -> None:
        peer = self.peer.transport if self.peer is not None else None
        if peer is None:
            self.early.append(data)
        else:
            peer.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.proxy._transports.discard(self.transport)
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.abort()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class CutProxy:
    """A TCP relay on 127.0.0.1 to `host:port` that can be cut and restored.

    While cut, every relayed connection is dropped and the port stops listening, so a
    device's reconnect attempts are refused at once (as when its link is down) and it
    backs off; `restore()` listens again on the same port, so devices keep their broker
    address."""

    def __init__(self, host: str, port: int, *, name: str = "proxy") -> None:
        self.host, self.target_port, self.name = host, port, name
        self.port = 0
        self.up = True
        self.accepted = 0
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.Transport] = set()
        self._pending: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"localhost:{self.port}"

    async def open(self) -> CutProxy:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, "127.0.0.1", self.port, backlog=1024)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        self._abort_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> CutProxy:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def cut(self) -> None:
        """Drop every relayed connection and refuse new ones until `restore()`."""
        if not self.up:
            return
        self.cuts += 1
        self.up = False
        if self._server is not None:
            self._server.close()
            self._server = None
        self._abort_all()

    async def restore(self) -> None:
        """Listen again (on the same port)."""
        if self.up:
            return
        for attempt in range(50):
            try:
                await self.open()
                break
            except OSError as exc:
                if attempt == 49:
                    raise
                log.debug("%s: port %d not free yet (%s); retrying", self.name, self.port, exc)
                await asyncio.sleep(0.1)
        self.up = True

    @property
    def connections(self) -> int:
        return len(self._transports) // 2

    def _abort_all(self) -> None:
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()

    def _accept(self) -> _Half:
        return _Half(self, client=True)

    def _connect_upstream(self, down: _Half) -> None:
        transport = down.transport
        if transport is None or transport.is_closing():
            return
        if not self.up:
            transport.abort()
            return
        self.accepted += 1
        transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._upstream(down), name=f"{self.name}-upstream")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _upstream(self, down: _Half) -> None:
        loop = asyncio.get_running_loop()
        up = _Half(self, client=False)
        try:
            await loop.create_connection(lambda: up, self.host, self.target_port)
        except OSError as exc:
            log.debug("%s: upstream %s:%d refused: %s", self.name, self.host, self.target_port, exc)
            if down.transport is not None:
                down.transport.abort()
            return
        if down.transport is None or down.transport.is_closing() or not self.up:
            if up.transport is not None:
                up.transport.abort()
            return
        up.peer, down.peer = down, up
        assert up.transport is not None
        for chunk in down.early:
            up.transport.write(chunk)
        for chunk in up.early:
            down.transport.write(chunk)
        down.early.clear()
        up.early.clear()
        down.transport.resume_reading()


class ForgeableSigner:
    """Signs as the device until `forge()`; from then on with a fresh key that does not
    match the device's certificate (same key id), as a cloned or tampered device would."""

    def __init__(self, real: Signer) -> None:
        self.real = real
        self.forged: KeySigner | None = None

    @property
    def kid(self) -> str:
        return self.real.kid

    @property
    def alg(self) -> int:
        return (self.forged or self.real).alg

    def sign_bytes(self, data: bytes) -> bytes:
        return (self.forged or self.real).sign_bytes(data)

    def forge(self) -> None:
        self.forged = KeySigner(self.real.kid, ec.generate_private_key(ec.SECP256R1()))


@dataclass
class Captured:
    """One signed message as the device committed it."""

    seq: int
    kind: str
    data: bytes


@dataclass
class Capture:
    """Records the first `count` telemetry messages a device commits (exact bytes), by
    reading each back from its outbox right after its commit: what an attacker on the
    path would have copied."""

    agent: Agent
    count: int
    rows: list[Captured] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._chained = self.agent.outbox.on_append
        self._capturing = True
        self.agent.outbox.on_append = self._on_append

    def _on_append(self) -> None:
        if self._capturing and len(self.rows) < self.count:
            seq = self.agent.outbox.next_seq - 1
            committed = self.agent.outbox.message(seq)
            if committed is not None and committed[0] == "telemetry":
                self.rows.append(Captured(seq, *committed))
            if len(self.rows) >= self.count:
                self.close()
        if self._chained is not None:
            self._chained()

    @property
    def done(self) -> bool:
        return len(self.rows) >= self.count

    def close(self) -> None:
        if self._capturing:
            self._capturing = False
            self.agent.outbox.on_append = self._chained


def garbage_payloads(count: int, rng: random.Random, sample: bytes | None = None) -> list[tuple[str, bytes]]:
    """`count` payloads that are not valid envelopes, one of them too large, with the
    rejection reason the gateway must give each."""
    makers: list[Callable[[], bytes]] = [
        lambda: rng.randbytes(rng.randint(1, 200)),
        lambda: b"",
        lambda: cbor2.dumps({"lat": 51.5, "lon": -0.12}),
        lambda: cbor2.dumps(cbor2.CBORTag(18, [b"", {}, b"not cbor \xff", b"sig"])),
        lambda: (sample or b"\xd2\x84")[: max(1, len(sample or b"") // 2)],
        lambda: b'{"lat": 51.5, "lon": -0.12}',
    ]
    out: list[tuple[str, bytes]] = [("too_large", rng.randbytes(MAX_ENVELOPE_BYTES + 100))]
    out += [("malformed", makers[i % len(makers)]()) for i in range(count - 1)]
    return out[:count]


async def publish_raw(
    pki: Pki,
    *,
    identity: str,
    host: str,
    port: int,
    client_id: str,
    messages: list[tuple[str, bytes]],
    timeout_s: float = 15.0,
) -> int:
    """Connect as `identity` (its certificate) with `client_id` and publish each
    (topic, payload) at QoS 1; return how many the broker acknowledged."""
    ctx = client_context(pki, pki.require_identity(identity))
    acked = 0
    try:
        async with asyncio.timeout(timeout_s):
            async with aiomqtt.Client(
                host, port, identifier=client_id, protocol=ProtocolVersion.V5, tls_context=ctx, timeout=10
            ) as client:
                for topic, payload in messages:
                    await client.publish(topic, payload, qos=1)
                    acked += 1
    except (MqttError, TimeoutError, OSError) as exc:
        log.warning("%s (%s): raw publish stopped after %d of %d: %s", identity, client_id, acked, len(messages), exc)
    return acked


def uplink(identity: str, kind: str) -> str:
    return str(Topic.up(identity, kind))


async def close_quietly(proxies: list[CutProxy]) -> None:
    for proxy in proxies:
        with contextlib.suppress(OSError):
            await proxy.close()


__all__ = [
    "Capture", "Captured", "CutProxy", "ForgeableSigner", "close_quietly", "garbage_payloads", "publish_raw", "uplink",
]
