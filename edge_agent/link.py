"""The agent's MQTT link: mutual TLS, MQTT 5, a persistent session, QoS 1, a signed
retained presence with a signed last will, and end-to-end receipts.

One connection at a time (`edge_agent.mqtt.client.MqttConnection`, the agent's own
MQTT 5 client over the sans-IO codec in `edge_agent.mqtt.codec`):

1. Before connecting: the presence rows of the previous connection (its will) are
   released into the outbox as ordinary messages; then a signed online status and a
   signed offline status are prepared, in that order, so the will has the higher seq.
   The offline status is this connection's will (retained, QoS 1). Failed attempts
   reuse the pair.
2. On connect: every unconfirmed message becomes due again (alarms first), the link
   subscribes to its own `down/#` at QoS 1, and the prepared online status is released
   to go out retained through the outbox (it has a seq and gets a receipt).
3. While connected: each appended row is published at once (with up to `inflight`
   PUBACKs outstanding; PUBACKs are counted as they are read), and a sender task
   publishes what that leaves (backlog, full window, re-sends falling due, PUBACKs
   overdue past `publish_timeout_s` counted as failures); each downlink is verified
   against the gateway's certificate as it is read, receipted seqs are deleted from the
   outbox, and only then is the downlink acknowledged to the broker. A PUBACK never
   deletes anything; a PUBACK with a failure reason code (e.g. 135 not authorized) is
   counted and logged and the message stays for a resend. Rejected downlinks are
   counted by reason and never stop the link.
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
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from certs.registry import KeyRegistry
from edge_agent.drivers import Clock
from edge_agent.mqtt.client import ConnectOptions, MqttConnection, MqttError, Will, reason_name
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
#: A downlink is verified against certificates and a CRL looked at no longer ago than this.
_KEYS_MAX_AGE_S = 1.0


def verify_downlink(topic: str, data: bytes, recipient: str, keys: KeyLookup) -> Message:
    """Verify a gateway-signed message on `bl/v1/<recipient>/down/<kind>`."""
    parsed = Topic.parse(topic)
    if parsed.direction != "down" or parsed.sender != recipient:
        raise TopicMismatch(f"{topic!r} is not a downlink for {recipient!r}")
    return verify_message(topic, data, keys, GATEWAY_ROLES)


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
        self._client: MqttConnection | None = None
        #: The connection the sender publishes on, while a session is up.
        self._sending: MqttConnection | None = None
        #: PUBACKs outstanding at most: `inflight`, or less if the broker says so.
        self._window = settings.inflight
        #: Publishes awaiting their PUBACK: mid -> (seq, kind, monotonic deadline), in send order.
        self._outstanding: dict[int, tuple[int, str, float]] = {}
        self._topics = {kind: str(Topic.up(self.id, kind)).encode() for kind in ("event", "ack", "status", "telemetry")}
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
            self._client.abort()

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
            connected_at: float | None = None
            try:
                client = await MqttConnection.open(
                    host, port, self._tls, self._connect_options(presence.will_data),
                    on_puback=self._on_ack, on_message=self.handle_downlink,
                )
                connected_at = time.monotonic()
                self._client = client
                self.stats.connects += 1
                self.connected.set()
                log.info("%s connected to %s:%d", self.id, host, port)
                try:
                    await self._session(client, presence)
                except asyncio.CancelledError:
                    client.abort()
                    raise
                await client.disconnect()
            except* MqttError as group:
                reason = "; ".join(str(e) for e in group.exceptions)
                if connected_at is None:
                    log.info("%s cannot connect to %s:%d: %s", self.id, host, port, reason)
                else:
                    log.warning("%s disconnected from %s:%d: %s", self.id, host, port, reason)
            finally:
                self._client = None
                self.connected.clear()
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

    def _connect_options(self, will_payload: bytes) -> ConnectOptions:
        """A persistent session (clean start off) whose will is the held offline status."""
        return ConnectOptions(
            client_id=self.id,
            keepalive_s=self.settings.keepalive_s,
            clean_start=False,
            session_expiry_s=self.settings.session_expiry_s,
            will=Will(str(Topic.up(self.id, "status")), will_payload, qos=1, retain=True),
        )

    async def _session(self, client: MqttConnection, presence: _Presence) -> None:
        """One connection's life: runs until the connection fails (raises) or stop."""
        self._outstanding.clear()
        self._window = min(self.settings.inflight, client.receive_maximum)
        resent = self.outbox.reset_sent()
        if resent:
            log.info("%s re-sending %d unconfirmed messages", self.id, resent)
        granted = await client.subscribe(down_filter(self.id), qos=1)
        refused = [rc for rc in granted if rc >= 0x80]
        if refused:
            log.warning(
                "%s: broker refused the downlink subscription (%s): receipts cannot arrive",
                self.id, reason_name(refused[0]),
            )
        self.outbox.release(presence.online_seq)
        self._wake.set()
        try:
            async with asyncio.TaskGroup() as tg:
                watch = tg.create_task(client.wait_closed(), name=f"{self.id}-connection")
                sender = tg.create_task(self._sender(client), name=f"{self.id}-send")
                await self._stop.wait()
                sender.cancel()
                self._sending = None
                await self._drain()
                await self._publish_will(client, presence)
                watch.cancel()
        finally:
            self._sending = None
            self._outstanding.clear()

    async def _drain(self) -> None:
        """Graceful stop: give outstanding PUBACKs a moment to arrive."""
        deadline = time.monotonic() + _DRAIN_S
        while self._outstanding and time.monotonic() < deadline:  # noqa: ASYNC110 - PUBACKs come in protocol callbacks
            await asyncio.sleep(0.02)

    async def _publish_will(self, client: MqttConnection, presence: _Presence) -> None:
        """Graceful stop: say offline with the will's own signed bytes and seq."""
        seq, data = presence.will_seq, presence.will_data
        rc = await client.publish_acked(self._topics["status"], data, retain=True)
        self.outbox.release_will()
        self.outbox.mark_sent([seq], self._clock.now_ms())
        log.info("%s published offline status (seq %d, %s)", self.id, seq, reason_name(rc))

    # -- sending ------------------------------------------------------------------
    # A message goes out as soon as it is appended (`_on_append` publishes it there and
    # then when the connection is up and the window has room), and its PUBACK is
    # counted as the connection reads it (`_on_ack`): no task and no timer per message. The
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
        rows = self.outbox.due(now, self._window - len(self._outstanding))
        if not rows:
            return 0
        self.outbox.mark_sent([r.seq for r in rows], now)
        deadline = time.monotonic() + self.settings.publish_timeout_s
        topics = self._topics
        for row in rows:
            try:
                mid = client.publish(topics[row.kind], row.data, retain=row.retain)
            except MqttError as exc:
                # The connection is going; wait_closed() says so and the rows are re-sent.
                self.stats.publish_failures[str(exc)] += 1
                log.debug("%s publish of seq %d failed: %s", self.id, row.seq, exc)
                break
            self._outstanding[mid] = (row.seq, row.kind, deadline)
        return len(rows)

    def _on_ack(self, mid: int, reason: int) -> None:
        """A PUBACK, as the connection reads it."""
        entry = self._outstanding.pop(mid, None)
        if entry is None:  # counted overdue already
            return
        if reason >= 0x80:
            seq, kind, _ = entry
            self.stats.publish_failures[reason_name(reason)] += 1
            log.warning("%s: broker refused seq %d on %s: %s (%d)", self.id, seq, self._topics[kind].decode(),
                        reason_name(reason), reason)
        else:
            self.stats.published += 1
        if len(self._outstanding) + 1 >= self._window:
            self._wake.set()  # the window was full: the sender has more to send

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

    async def _sender(self, client: MqttConnection) -> None:
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
    def handle_downlink(self, topic: str, data: bytes) -> None:
        """Verify one downlink; apply receipts; count and log anything rejected. The
        connection acknowledges the downlink to the broker after this returns."""
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
