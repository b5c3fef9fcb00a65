"""The agent's MQTT link: mutual TLS, MQTT 5, a persistent session, QoS 1, a signed
retained presence with a signed last will, and end-to-end receipts.

One connection at a time, each an `async with` block (aiomqtt 2.x over paho-mqtt 2):

1. Before connecting: the presence rows of the previous connection (its will) are
   released into the outbox as ordinary messages; then a signed online status and a
   signed offline status are prepared, in that order, so the will has the higher seq.
   The offline status is this connection's will (retained, QoS 1). Failed attempts
   reuse the pair.
2. On connect: every unconfirmed message becomes due again (alarms first), the link
   subscribes to its own `down/#` at QoS 1, and the prepared online status is released
   to go out retained through the outbox (it has a seq and gets a receipt).
3. While connected: each appended row is published at once (with up to `inflight`
   PUBACKs outstanding; PUBACKs are counted in paho's callback), and a sender task
   publishes what that leaves (backlog, full window, re-sends falling due, PUBACKs
   overdue past `publish_timeout_s` counted as failures); a receiver verifies every
   downlink against the gateway's certificate and deletes receipted seqs from the
   outbox. A PUBACK never deletes anything; a PUBACK with a failure reason code (e.g.
   135 not authorized) is counted and logged and the message stays for a resend.
   Rejected downlinks are counted by reason and never stop the link.
4. On connection loss: reconnect after a capped exponential backoff with full jitter.
5. On `request_stop()`: publish the held will (offline) ourselves, then disconnect.
   If the task is cancelled instead, the connection is cut without DISCONNECT so the
   broker publishes the will.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt import MqttCodeError, MqttError, ProtocolVersion
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from certs.registry import KeyRegistry
from edge_agent.drivers import Clock
from edge_agent.outbox import Outbox
from edge_agent.settings import AgentSettings
from edge_agent.wire.envelope import Message
from edge_agent.wire.errors import Rejected, TopicMismatch
from edge_agent.wire.ids import Role
from edge_agent.wire.model import parse_ranges
from edge_agent.wire.topics import Topic, down_filter
from edge_agent.wire.verify import KeyLookup, verify_message

log = logging.getLogger(__name__)

GATEWAY_ROLES = frozenset({Role.GATEWAY})
#: A connection that lasted this long resets the reconnect backoff.
_STABLE_S = 10.0
#: How long a graceful stop waits for outstanding PUBACKs before giving up on them.
_DRAIN_S = 2.0
#: Longest period of paho's housekeeping (keepalive) loop; a quarter of keepalive if shorter.
_MISC_S = 5.0
#: A downlink is verified against certificates and a CRL looked at no longer ago than this.
_KEYS_MAX_AGE_S = 1.0


def verify_downlink(topic: str, data: bytes, recipient: str, keys: KeyLookup) -> Message:
    """Verify a gateway-signed message on `bl/v1/<recipient>/down/<kind>`."""
    parsed = Topic.parse(topic)
    if parsed.direction != "down" or parsed.sender != recipient:
        raise TopicMismatch(f"{topic!r} is not a downlink for {recipient!r}")
    return verify_message(topic, data, keys, GATEWAY_ROLES)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop of this thread, if it runs one (paho connects from an executor thread)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def backoff_delay(attempt: int, low_s: float, high_s: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(high, low * 2**attempt)]."""
    return rng.uniform(0.0, min(high_s, low_s * 2 ** min(attempt, 32)))


@dataclass(frozen=True)
class _Presence:
    """The held online status and will prepared for one connection."""

    online_seq: int
    will_seq: int
    will_data: bytes


@dataclass
class LinkStats:
    """What the link has done since it started."""

    connects: int = 0
    disconnects: int = 0
    published: int = 0
    #: Publishes the broker refused (PUBACK reason code >= 128) or that timed out, by reason.
    publish_failures: Counter[str] = field(default_factory=Counter)
    receipts: int = 0
    confirmed: int = 0
    #: Downlinks that failed verification, by `Rejected.reason`.
    downlink_rejected: Counter[str] = field(default_factory=Counter)
    downlink_ignored: int = 0
    #: Verified alerts handed to `on_alert` (redeliveries included).
    alerts: int = 0


def _reraise_swallowed_cancel() -> None:
    """Python 3.11's `asyncio.wait_for` (which aiomqtt awaits connects, disconnects and
    acks with) drops a cancellation that arrives as the awaited future completes, e.g.
    when the broker goes away at the moment the fleet is cancelled (Ctrl-C reaches both).
    The task is still marked as cancelling: honour it instead of reconnecting forever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


#: A success PUBACK carries nothing but its mid: one shared (read-only) reason code and
#: empty property set for all of them (paho builds two of each per PUBACK otherwise).
_PUBACK_OK = ReasonCode(PacketTypes.PUBACK)
_PUBACK_NO_PROPS = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]


class _LeanPaho(paho.Client):
    """paho's client, with the per-message work of an agent made cheaper and nothing else
    changed: a success PUBACK without properties is decoded with shared reason code and
    properties objects (paho builds a `ReasonCode` and a `Properties` twice per PUBACK,
    half the cost of reading one), a QoS 0/1 PUBLISH without properties is framed
    without the debug log's formatting, and log calls below the logger's level return at
    once. Everything else (in-flight window, message states, callbacks, session resend)
    is paho's own code. Packets this does not recognise go to paho's own decoder."""

    def _easy_log(self, level: Any, fmt: str, *args: Any) -> None:
        if self.on_log is None and (self._logger is None or not self._logger.isEnabledFor(paho.LOGGING_LEVEL[level])):
            return
        super()._easy_log(level, fmt, *args)

    def _handle_pubackcomp(self, cmd: Any) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        n = len(packet)
        if (
            cmd != "PUBACK"
            or self._protocol != paho.MQTTv5
            or not 2 <= n <= 4
            or (n >= 3 and packet[2] != 0)
            or (n == 4 and packet[3] != 0)
        ):
            return super()._handle_pubackcomp(cmd)
        mid = packet[0] << 8 | packet[1]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, _PUBACK_OK, _PUBACK_NO_PROPS)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _send_publish(  # noqa: PLR0917 - paho's signature
        self,
        mid: int,
        topic: bytes,
        payload: bytes | bytearray = b"",
        qos: int = 0,
        retain: bool = False,
        dup: bool = False,
        info: paho.MQTTMessageInfo | None = None,
        properties: Properties | None = None,
    ) -> MQTTErrorCode:
        if (
            properties is not None
            or qos > 1
            or self._protocol != paho.MQTTv5
            or self._sock is None
            or type(topic) is not bytes
            or not payload
            or not isinstance(payload, bytes | bytearray)
        ):
            return super()._send_publish(mid, topic, payload, qos, retain, dup, info, properties)
        if self._logger is not None and self._logger.isEnabledFor(logging.DEBUG):
            self._easy_log(paho.MQTT_LOG_DEBUG, "Sending PUBLISH (d%d, q%d, r%d, m%d), '%s', properties=%s, ... "
                           "(%d bytes)", dup, qos, retain, mid, topic, properties, len(payload))
        # fixed header, remaining length, topic, packet id (QoS 1), no properties, payload
        packet = bytearray((paho.PUBLISH | (dup & 0x1) << 3 | qos << 1 | retain,))
        self._pack_remaining_length(packet, 2 + len(topic) + (2 if qos else 0) + 1 + len(payload))
        packet += len(topic).to_bytes(2, "big")
        packet += topic
        if qos:
            packet += mid.to_bytes(2, "big")
        packet += b"\x00"
        packet += payload
        return self._packet_queue(paho.PUBLISH, packet, mid, qos, info)


class _Client(aiomqtt.Client):
    """aiomqtt's client plus what 2.x does not expose: the PUBACK reason code of each
    publish, and cutting the connection without a DISCONNECT (so the will fires).

    It also does less per message than aiomqtt does, which matters when one process runs
    thousands of agents: a publish made on the event loop is written to the socket at
    once (aiomqtt schedules an `add_writer` through `call_soon_threadsafe` and waits for
    the loop's next turn; a writer is still registered for whatever the socket did not
    take), a publish waits for its PUBACK on one future under `asyncio.timeout` (no
    extra task per publish), and paho's housekeeping (keepalive) runs every few seconds
    instead of every second."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if type(self._client) is paho.Client:
            self._client.__class__ = _LeanPaho
        self._acks: dict[int, ReasonCode] = {}
        self._ack_waiters: dict[int, asyncio.Future[None]] = {}
        self._writing = False
        #: A writer for the socket was asked of the event loop (and not removed yet).
        self._writer_registered = False
        #: Called with (mid, reason code) for each PUBACK of a `publish_nowait`.
        self.on_ack: Callable[[int, ReasonCode], bool] | None = None

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason_code: ReasonCode, properties: Properties
    ) -> None:
        if self.on_ack is None or not self.on_ack(mid, reason_code):
            self._acks[mid] = reason_code
            waiter = self._ack_waiters.pop(mid, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if mid in self._pending_publishes:  # aiomqtt's own publish(); it raises and swallows a KeyError otherwise
            super()._on_publish(client, userdata, mid, reason_code, properties)

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # paho asks for a writer whenever it queued a packet. On the event loop, outside
        # paho's callbacks and not from inside this very write, write now.
        if not self._writing and _running_loop() is self._loop:
            in_callback = client._in_callback_mutex  # paho's own guard for its direct writes
            if in_callback.acquire(False):
                in_callback.release()
                self._writing = True
                try:
                    client.loop_write()
                except OSError as exc:
                    if not self._disconnected.done():
                        self._disconnected.set_exception(exc)
                    return
                finally:
                    self._writing = False
                if not client.want_write():
                    return
        self._writer_registered = True
        super()._on_socket_register_write(client, userdata, sock)

    def _on_socket_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # paho unregisters after every write; only a writer that was registered needs removing.
        if self._writer_registered:
            self._writer_registered = False
            super()._on_socket_unregister_write(client, userdata, sock)

    async def _misc_loop(self) -> None:
        # paho's keepalive check; PINGREQ is due only after `keepalive_s` without traffic.
        period = max(1.0, min(_MISC_S, self._client.keepalive / 4))
        while self._client.loop_misc() == paho.MQTT_ERR_SUCCESS:  # noqa: ASYNC110
            await asyncio.sleep(period)

    def publish_nowait(self, topic: str, payload: bytes, *, retain: bool) -> paho.MQTTMessageInfo:
        """Queue (and, on the event loop, write) a QoS 1 publish; its PUBACK goes to `on_ack`."""
        return self._client.publish(topic, payload, 1, retain)

    async def publish_acked(self, topic: str, payload: bytes, *, retain: bool, wait_s: float) -> ReasonCode | None:
        """Publish at QoS 1 and return the PUBACK's reason code (None if paho gave none)."""
        info = self._client.publish(topic, payload, 1, retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise MqttCodeError(info.rc, "Could not publish message")
        if not info.is_published() and info.mid not in self._acks:
            waiter = self._loop.create_future()
            self._ack_waiters[info.mid] = waiter
            try:
                async with asyncio.timeout(wait_s):
                    await waiter
            except TimeoutError:
                raise MqttError("Operation timed out") from None
            finally:
                self._ack_waiters.pop(info.mid, None)
        return self._acks.pop(info.mid, None)

    def sever(self) -> None:
        """Drop the TCP connection without DISCONNECT, as a crash or lost signal would."""
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class Link:
    """Moves the outbox to the broker and receipts back. `await run()` until `request_stop()`."""

    def __init__(
        self,
        settings: AgentSettings,
        outbox: Outbox,
        tls_context: ssl.SSLContext,
        keys: KeyRegistry,
        *,
        clock: Clock,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.id = settings.id
        self.outbox = outbox
        self.keys = keys
        self.stats = LinkStats()
        self.connected = asyncio.Event()
        self._tls = tls_context
        self._clock = clock
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._client: _Client | None = None
        #: The connection the sender publishes on, while a session is up.
        self._sending: _Client | None = None
        #: Publishes awaiting their PUBACK: mid -> (seq, topic, monotonic deadline), in send order.
        self._outstanding: dict[int, tuple[int, str, float]] = {}
        self._topics = {kind: str(Topic.up(self.id, kind)) for kind in ("event", "ack", "status", "telemetry")}
        self._flush_at: asyncio.TimerHandle | None = None
        outbox.on_append = self._on_append
        outbox.on_deferred = self._schedule_flush
        #: Called with each verified alert (the agent answers it).
        self.on_alert: Callable[[Message], None] | None = None

    # -- control ----------------------------------------------------------------
    def request_stop(self) -> None:
        """Publish the offline status, disconnect and make `run()` return."""
        self._stop.set()

    def wake(self) -> None:
        """Look at the outbox now (called after appends)."""
        self._wake.set()

    def _schedule_flush(self) -> None:
        """Deferred outbox bookkeeping is waiting: commit it `bookkeeping_delay_s` from now
        at the latest (an append commits it sooner)."""
        if self._flush_at is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on the event loop (tests driving the link directly)
            self.outbox.flush()
            return
        self._flush_at = loop.call_later(self.outbox.bookkeeping_delay_s, self._flush)

    def _flush(self) -> None:
        self._flush_at = None
        self.outbox.flush()

    def sever(self) -> None:
        """Fault injection: cut the live connection abruptly; the broker publishes our
        will and the link reconnects."""
        if self._client is not None:
            self._client.sever()

    # -- the connection loop ------------------------------------------------------
    async def run(self) -> None:
        """Connect, send, receive receipts; reconnect with backoff; until `request_stop()`
        or cancellation."""
        attempt = 0
        presence: _Presence | None = None
        host, port = self.settings.broker_host, self.settings.broker_port
        while not self._stop.is_set():
            if presence is None:
                released = self.outbox.release_will()
                if released:
                    log.debug("%s: held presence %s released for sending", self.id, released)
                now = self._clock.now_ms()
                online = self.outbox.prepare_online(now)
                presence = _Presence(online, *self.outbox.prepare_will(now))
            client = self._new_client(host, port, presence.will_data)
            connected_at: float | None = None
            try:
                async with client:
                    connected_at = time.monotonic()
                    self._client = client
                    self.stats.connects += 1
                    self.connected.set()
                    log.info("%s connected to %s:%d", self.id, host, port)
                    try:
                        await self._session(client, presence)
                    except asyncio.CancelledError:
                        client.sever()
                        raise
            except* MqttError as group:
                reason = "; ".join(f"{e} ({e.__cause__})" if e.__cause__ else str(e) for e in group.exceptions)
                if connected_at is None:
                    log.info("%s cannot connect to %s:%d: %s", self.id, host, port, reason)
                else:
                    log.warning("%s disconnected from %s:%d: %s", self.id, host, port, reason)
            finally:
                self._client = None
                self.connected.clear()
            _reraise_swallowed_cancel()
            if connected_at is not None:
                self.stats.disconnects += 1
                presence = None
                if time.monotonic() - connected_at >= _STABLE_S:
                    attempt = 0
            if self._stop.is_set():
                break
            delay = backoff_delay(attempt, self.settings.reconnect_min_s, self.settings.reconnect_max_s, self._rng)
            attempt += 1
            log.debug("%s reconnecting in %.2f s", self.id, delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()
        log.info("%s link stopped", self.id)

    def _new_client(self, host: str, port: int, will_payload: bytes) -> _Client:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.settings.session_expiry_s
        client = _Client(
            host,
            port,
            identifier=self.id,
            protocol=ProtocolVersion.V5,
            tls_context=self._tls,
            will=aiomqtt.Will(str(Topic.up(self.id, "status")), will_payload, qos=1, retain=True),
            clean_start=False,
            properties=props,
            keepalive=self.settings.keepalive_s,
            max_inflight_messages=self.settings.inflight,
            max_queued_incoming_messages=10_000,
            timeout=10,
        )
        client.pending_calls_threshold = self.settings.inflight + 16
        client.on_ack = self._on_ack
        return client

    async def _session(self, client: _Client, presence: _Presence) -> None:
        """One connection's life: runs until the connection fails (raises) or stop."""
        self._outstanding.clear()
        resent = self.outbox.reset_sent()
        if resent:
            log.info("%s re-sending %d unconfirmed messages", self.id, resent)
        granted = await client.subscribe(down_filter(self.id), qos=1)
        refused = [rc for rc in granted if isinstance(rc, ReasonCode) and rc.is_failure]
        if refused:
            log.warning(
                "%s: broker refused the downlink subscription (%s): receipts cannot arrive", self.id, refused[0]
            )
        self.outbox.release(presence.online_seq)
        self._wake.set()
        try:
            async with asyncio.TaskGroup() as tg:
                receiver = tg.create_task(self._receiver(client), name=f"{self.id}-receive")
                sender = tg.create_task(self._sender(client), name=f"{self.id}-send")
                await self._stop.wait()
                sender.cancel()
                self._sending = None
                await self._drain()
                await self._publish_will(client, presence)
                receiver.cancel()
        finally:
            self._sending = None
            self._outstanding.clear()

    async def _drain(self) -> None:
        """Graceful stop: give outstanding PUBACKs a moment to arrive."""
        deadline = time.monotonic() + _DRAIN_S
        while self._outstanding and time.monotonic() < deadline:  # noqa: ASYNC110 - PUBACKs come in paho callbacks
            await asyncio.sleep(0.02)

    async def _publish_will(self, client: _Client, presence: _Presence) -> None:
        """Graceful stop: say offline with the will's own signed bytes and seq."""
        seq, data = presence.will_seq, presence.will_data
        rc = await client.publish_acked(self._topics["status"], data, retain=True, wait_s=5.0)
        self.outbox.release_will()
        self.outbox.mark_sent([seq], self._clock.now_ms())
        log.info("%s published offline status (seq %d, %s)", self.id, seq, rc)

    # -- sending ------------------------------------------------------------------
    # A message goes out as soon as it is appended (`_on_append` publishes it there and
    # then when the connection is up and the window has room), and its PUBACK is
    # counted in paho's callback (`_on_ack`): no task and no timer per message. The
    # sender task wakes only for what that leaves: the backlog after a reconnect or a
    # full window, re-sends that fall due, and PUBACKs overdue past publish_timeout_s.

    def _on_append(self) -> None:
        if self._sending is not None:
            self._send_due()
        else:
            self._wake.set()

    def _send_due(self) -> int:
        """Publish what is due now, up to the window; returns how many rows went out."""
        client = self._sending
        if client is None:
            return 0
        now = self._clock.now_ms()
        rows = self.outbox.due(now, self.settings.inflight - len(self._outstanding))
        if not rows:
            return 0
        self.outbox.mark_sent([r.seq for r in rows], now)
        deadline = time.monotonic() + self.settings.publish_timeout_s
        for row in rows:
            topic = self._topics[row.kind]
            info = client.publish_nowait(topic, row.data, retain=row.retain)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                # The connection is going; the receiver sees it and the row is re-sent.
                reason = str(MqttCodeError(info.rc, "Could not publish message"))
                self.stats.publish_failures[reason] += 1
                log.debug("%s publish of seq %d failed: %s", self.id, row.seq, reason)
                continue
            self._outstanding[info.mid] = (row.seq, topic, deadline)
        return len(rows)

    def _on_ack(self, mid: int, rc: ReasonCode) -> bool:
        """A PUBACK (in paho's callback, on the event loop); False if not one of ours."""
        entry = self._outstanding.pop(mid, None)
        if entry is None:
            return False
        seq, topic, _ = entry
        if rc.is_failure:
            self.stats.publish_failures[str(rc)] += 1
            log.warning("%s: broker refused seq %d on %s: %s (%d)", self.id, seq, topic, rc, rc.value)
        else:
            self.stats.published += 1
        if len(self._outstanding) + 1 >= self.settings.inflight:
            self._wake.set()  # the window was full: the sender has more to send
        return True

    def _expire(self) -> float | None:
        """Count PUBACKs overdue as failures (their rows are re-sent); returns the
        monotonic time the next one falls due."""
        now = time.monotonic()
        while self._outstanding:
            mid, (seq, _topic, deadline) = next(iter(self._outstanding.items()))
            if deadline > now:
                return deadline
            del self._outstanding[mid]
            self.stats.publish_failures["Operation timed out"] += 1
            log.debug("%s publish of seq %d failed: no PUBACK within %g s", self.id, seq,
                      self.settings.publish_timeout_s)
        return None

    async def _sender(self, client: _Client) -> None:
        self._sending = client
        while True:
            self._wake.clear()
            next_deadline = self._expire()
            if self._send_due():
                continue
            now = self._clock.now_ms()
            timeout: float | None = None
            resend_at = self.outbox.next_resend_ms()
            if resend_at is not None:
                timeout = max(0.05, (resend_at - now) / 1000.0)
            if next_deadline is not None:
                until = max(0.05, next_deadline - time.monotonic())
                timeout = until if timeout is None else min(timeout, until)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    # -- receiving ----------------------------------------------------------------
    async def _receiver(self, client: _Client) -> None:
        async for message in client.messages:
            payload = message.payload
            data = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
            self.handle_downlink(message.topic.value, data)

    def handle_downlink(self, topic: str, data: bytes) -> None:
        """Verify one downlink; apply receipts; count and log anything rejected."""
        self.keys.refresh(max_age_s=_KEYS_MAX_AGE_S)
        try:
            message = verify_downlink(topic, data, self.id, self.keys)
        except Rejected as exc:
            self.stats.downlink_rejected[exc.reason] += 1
            log.warning("%s rejected a downlink on %s: %s", self.id, topic, exc)
            return
        if message.kind == "cmd" and message.body.get("type") == "receipt":
            ranges = parse_ranges(message.body["ranges"])  # validate_body has checked them
            confirmed = self.outbox.confirm(ranges)
            self.stats.receipts += 1
            self.stats.confirmed += confirmed
            log.debug("%s receipt from %s: %s confirmed %d", self.id, message.sender, ranges, confirmed)
            return
        if message.kind == "alert" and self.on_alert is not None:
            self.stats.alerts += 1
            self.on_alert(message)
            return
        self.stats.downlink_ignored += 1
        log.info(
            "%s: %s %r from %s is not handled by this agent",
            self.id,
            message.kind,
            message.body.get("type"),
            message.sender,
        )
