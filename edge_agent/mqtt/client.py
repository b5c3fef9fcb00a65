"""The agent's MQTT 5 connection: the sans-IO codec under an asyncio protocol.

    conn = await MqttConnection.open(host, port, tls_context, options, on_puback=..., on_message=...)
    mid = conn.publish(topic, payload, retain=False)     # written at once; PUBACK -> on_puback
    await conn.subscribe("bl/v1/van-17/down/#")
    await conn.wait_closed()                              # raises how the connection ended
    await conn.disconnect()                               # DISCONNECT, then TLS close

Only what an agent uses: QoS 1 both ways, one subscription, a will, keepalive. A
publish is written to the transport as it is made (no queue, no task per message) and
its PUBACK is handed to `on_puback` as the packet is read; an incoming QoS 1 PUBLISH
goes to `on_message` and is acknowledged only after that returns, so a receipt is
applied before the broker forgets it. Session state is not kept across connections:
the caller's outbox re-sends whatever was not confirmed. Every way a connection ends
(refused, lost, timed out, the peer's DISCONNECT, a malformed packet, an exception in
`on_message`) ends `wait_closed()` with an `MqttError` (or that exception).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.mqtt.codec import (
    ConnAck,
    Decoder,
    PingResp,
    ProtocolError,
    PubAck,
    Publish,
    SubAck,
    Will,
    encode_connect,
    encode_disconnect,
    encode_pingreq,
    encode_puback,
    encode_publish,
    encode_subscribe,
)

log = logging.getLogger(__name__)

#: MQTT 5 reason codes (§2.4) an agent can meet, by value: what logs and counters say.
REASON_NAMES = {
    0x00: "Success",
    0x04: "Disconnect with will message",
    0x10: "No matching subscribers",
    0x80: "Unspecified error",
    0x81: "Malformed packet",
    0x82: "Protocol error",
    0x83: "Implementation specific error",
    0x84: "Unsupported protocol version",
    0x85: "Client identifier not valid",
    0x86: "Bad user name or password",
    0x87: "Not authorized",
    0x88: "Server unavailable",
    0x89: "Server busy",
    0x8A: "Banned",
    0x8B: "Server shutting down",
    0x8C: "Bad authentication method",
    0x8D: "Keep alive timeout",
    0x8E: "Session taken over",
    0x8F: "Topic filter invalid",
    0x90: "Topic name invalid",
    0x91: "Packet identifier in use",
    0x93: "Receive maximum exceeded",
    0x95: "Packet too large",
    0x96: "Message rate too high",
    0x97: "Quota exceeded",
    0x98: "Administrative action",
    0x99: "Payload format invalid",
    0x9C: "Use another server",
    0x9D: "Server moved",
    0x9F: "Connection rate exceeded",
}

#: A publish id space of 16 bits; 0 is not a packet id.
_MAX_PACKET_ID = 0xFFFF


def reason_name(code: int) -> str:
    """The reason code's name from the MQTT 5 specification, e.g. 135 -> 'Not authorized'."""
    return REASON_NAMES.get(code, f"Reason code {code}")


class MqttError(Exception):
    """The MQTT connection failed or ended; the message says how."""


class ConnectRefused(MqttError):
    """The broker answered CONNECT with a failure reason code."""

    def __init__(self, reason: int, detail: str | None = None) -> None:
        self.reason = reason
        super().__init__(f"connection refused: {reason_name(reason)} ({reason})" + (f": {detail}" if detail else ""))


class ConnectionLost(MqttError):
    """The connection dropped, timed out, was closed by the broker, or carried bad bytes."""


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    """What a CONNECT says, and how long to wait for the broker."""

    client_id: str
    keepalive_s: int = 30
    clean_start: bool = False
    session_expiry_s: int = 0
    will: Will | None = None
    #: Connect (TCP + TLS + CONNACK) and SUBACK / PUBACK waits.
    timeout_s: float = 10.0


class MqttConnection(asyncio.Protocol):
    """One MQTT 5 connection over a TLS transport. Build it with `open()`."""

    def __init__(
        self,
        options: ConnectOptions,
        *,
        on_puback: Callable[[int, int], object] | None = None,
        on_message: Callable[[str, bytes], object] | None = None,
    ) -> None:
        self.options = options
        self.on_puback = on_puback
        self.on_message = on_message
        self._loop = asyncio.get_running_loop()
        self._decoder = Decoder()
        self._transport: asyncio.Transport | None = None
        self._connack: asyncio.Future[ConnAck] = self._loop.create_future()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        #: Set when the transport has gone (after `disconnect()` too).
        self._gone: asyncio.Future[None] = self._loop.create_future()
        #: Packet ids in use: a QoS 1 publish until its PUBACK, a SUBSCRIBE until its SUBACK.
        self._in_use: set[int] = set()
        self._waiters: dict[int, asyncio.Future[PubAck | SubAck]] = {}
        self._next_id = 0
        self._keepalive_s = options.keepalive_s
        self._keepalive: asyncio.TimerHandle | None = None
        self._last_write = 0.0
        self._last_read = 0.0
        self._ping_sent_at: float | None = None
        #: What the broker allows in flight at once (CONNACK's receive maximum).
        self.receive_maximum = 65535

    # -- opening and closing ------------------------------------------------------
    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        tls: ssl.SSLContext,
        options: ConnectOptions,
        *,
        on_puback: Callable[[int, int], object] | None = None,
        on_message: Callable[[str, bytes], object] | None = None,
    ) -> MqttConnection:
        """Connect over TLS, send CONNECT and wait for a successful CONNACK."""
        conn = cls(options, on_puback=on_puback, on_message=on_message)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(options.timeout_s):
                await loop.create_connection(lambda: conn, host, port, ssl=tls, server_hostname=host)
                connack = await conn._connack
        except TimeoutError:
            conn.abort()
            raise ConnectionLost(f"no CONNACK from {host}:{port} within {options.timeout_s:g} s") from None
        except (OSError, EOFError) as exc:  # ssl.SSLError is an OSError
            conn.abort()
            raise ConnectionLost(f"cannot connect to {host}:{port}: {exc}") from exc
        except BaseException:
            conn.abort()
            raise
        if connack.reason >= 0x80:
            conn.abort()
            raise ConnectRefused(connack.reason, connack.reason_string)
        conn.receive_maximum = connack.receive_maximum
        if connack.server_keepalive_s is not None:
            conn._keepalive_s = connack.server_keepalive_s
        conn._arm_keepalive()
        return conn

    async def wait_closed(self) -> None:
        """Until the connection ends; raises `MqttError` (or what `on_message` raised)
        unless it was closed by `disconnect()`."""
        await asyncio.shield(self._closed)

    @property
    def is_open(self) -> bool:
        return not self._closed.done()

    async def disconnect(self, reason: int = 0) -> None:
        """Send DISCONNECT (reason 0: the broker discards the will) and close the TLS
        connection, waiting a moment for it to go."""
        if self._closed.done() or self._transport is None:
            return
        self._write(encode_disconnect(reason))
        self._finish(None)
        self._transport.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.options.timeout_s):
                await self._gone

    def abort(self) -> None:
        """Cut the connection without DISCONNECT, as a crash or lost signal would: the
        broker publishes the will."""
        self.abort_with(ConnectionLost("connection cut"))

    # -- publishing and subscribing ----------------------------------------------
    def publish(self, topic: bytes, payload: bytes, *, retain: bool = False) -> int:
        """Write a QoS 1 PUBLISH now; returns its packet id (its PUBACK goes to `on_puback`)."""
        mid = self._take_id()
        self._write(encode_publish(topic, payload, mid, qos=1, retain=retain))
        return mid

    async def publish_acked(self, topic: bytes, payload: bytes, *, retain: bool = False) -> int:
        """Publish at QoS 1 and return the PUBACK's reason code."""
        mid = self.publish(topic, payload, retain=retain)
        ack = await self._answer(mid)
        assert isinstance(ack, PubAck)
        return ack.reason

    async def subscribe(self, topic_filter: str, qos: int = 1) -> tuple[int, ...]:
        """Subscribe to one filter; returns the SUBACK's reason codes (granted QoS or failure)."""
        mid = self._take_id()
        self._write(encode_subscribe(mid, topic_filter, qos))
        ack = await self._answer(mid)
        assert isinstance(ack, SubAck)
        return ack.reasons

    async def _answer(self, mid: int) -> PubAck | SubAck:
        waiter: asyncio.Future[PubAck | SubAck] = self._loop.create_future()
        self._waiters[mid] = waiter
        try:
            async with asyncio.timeout(self.options.timeout_s):
                done, _ = await asyncio.wait((waiter, self._closed), return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise ConnectionLost(f"no answer to packet {mid} within {self.options.timeout_s:g} s") from None
        finally:
            self._waiters.pop(mid, None)
        if waiter in done:
            return waiter.result()
        self._closed.result()  # raises how it ended
        raise ConnectionLost("connection closed")

    def _take_id(self) -> int:
        if self._closed.done():
            raise ConnectionLost("the connection is closed")
        in_use = self._in_use
        if len(in_use) >= _MAX_PACKET_ID:
            raise MqttError("every packet id is waiting for an acknowledgement")
        mid = self._next_id
        while True:
            mid = mid % _MAX_PACKET_ID + 1
            if mid not in in_use:
                break
        self._next_id = mid
        in_use.add(mid)
        return mid

    def _write(self, packet: bytes) -> None:
        transport = self._transport
        if transport is None or self._closed.done():
            raise ConnectionLost("the connection is closed")
        transport.write(packet)
        self._last_write = self._loop.time()

    # -- keepalive ------------------------------------------------------------------
    def _arm_keepalive(self) -> None:
        if self._keepalive_s > 0 and not self._closed.done():
            self._keepalive = self._loop.call_later(self._keepalive_s / 2, self._tick)

    def _tick(self) -> None:
        """Every half keepalive: a PINGREQ if nothing was written, or nothing read, for
        that long (a device that keeps publishing into a dead link hears nothing back);
        the connection is lost if the previous PINGREQ got no PINGRESP."""
        now = self._loop.time()
        half = self._keepalive_s / 2
        if self._ping_sent_at is not None:
            if now - self._ping_sent_at >= half:
                self.abort_with(ConnectionLost(f"no PINGRESP within {half:g} s"))
                return
        elif now - self._last_write >= half or now - self._last_read >= half:
            self._ping_sent_at = now
            self._write(encode_pingreq())
        self._arm_keepalive()

    def abort_with(self, error: BaseException) -> None:
        """End the connection with `error` (what `wait_closed()` raises)."""
        self._finish(error)
        if self._transport is not None:
            self._transport.abort()

    # -- asyncio.Protocol -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's TLS transport is not a subclass
        o = self.options
        self._write(
            encode_connect(
                o.client_id,
                keepalive_s=o.keepalive_s,
                clean_start=o.clean_start,
                session_expiry_s=o.session_expiry_s,
                will=o.will,
            )
        )

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        try:
            packets = self._decoder.feed(data)
        except ProtocolError as exc:
            self.abort_with(ConnectionLost(f"malformed packet from the broker: {exc}"))
            return
        for packet in packets:
            if isinstance(packet, PubAck):
                self._on_puback(packet)
            elif isinstance(packet, Publish):
                if not self._on_publish(packet):
                    return
            elif isinstance(packet, PingResp):
                self._ping_sent_at = None
            elif isinstance(packet, SubAck):
                self._answered(packet.packet_id, packet)
            elif isinstance(packet, ConnAck):
                if not self._connack.done():
                    self._connack.set_result(packet)
            else:
                detail = f": {packet.reason_string}" if packet.reason_string else ""
                self.abort_with(ConnectionLost(f"broker disconnected: {reason_name(packet.reason)} "
                                               f"({packet.reason}){detail}"))
                return

    def _on_puback(self, ack: PubAck) -> None:
        mid = ack.packet_id
        if mid in self._waiters:
            self._answered(mid, ack)
            return
        self._in_use.discard(mid)
        if self.on_puback is not None:
            self.on_puback(mid, ack.reason)

    def _answered(self, mid: int, ack: PubAck | SubAck) -> None:
        self._in_use.discard(mid)
        waiter = self._waiters.get(mid)
        if waiter is not None and not waiter.done():
            waiter.set_result(ack)

    def _on_publish(self, message: Publish) -> bool:
        """Hand an incoming message over, then acknowledge it; False if the handler
        failed (the connection is ended with its exception, unacknowledged)."""
        if self.on_message is not None:
            try:
                self.on_message(message.topic, message.payload)
            except Exception as exc:
                self.abort_with(exc)
                return False
        if message.packet_id is not None:
            self._write(encode_puback(message.packet_id))
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._gone.done():
            self._gone.set_result(None)
        if not self._connack.done():
            self._finish(ConnectionLost(f"closed before CONNACK: {exc or 'by the broker'}"))
        else:
            self._finish(ConnectionLost(f"connection lost: {exc}" if exc else "connection closed by the broker"))

    def _finish(self, error: BaseException | None) -> None:
        if self._closed.done():
            return
        if self._keepalive is not None:
            self._keepalive.cancel()
        if not self._connack.done():
            self._connack.set_exception(error or ConnectionLost("closed before CONNACK"))
            self._connack.exception()  # retrieved here; open() raises it again
        if error is None:
            self._closed.set_result(None)
        else:
            self._closed.set_exception(error)
            self._closed.exception()  # retrieved here; wait_closed() raises it again


__all__ = [
    "REASON_NAMES",
    "ConnectOptions",
    "ConnectRefused",
    "ConnectionLost",
    "MqttConnection",
    "MqttError",
    "Will",
    "reason_name",
]
