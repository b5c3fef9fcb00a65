"""The ingest shell: MQTT in, `IngestCore` decides, the store commits, receipts go out.

    bulk:   broker --$share/bl-gateway/bl/v1/+/up/{telemetry,status}--> inbox -> batch
              --verify--> commit --> PUBACKs
    urgent: broker --$share/bl-gateway/bl/v1/+/up/{event,ack}--> inbox -> batch
              --verify, ahead of bulk--> commit --> PUBACKs;  receipts, alerts --> broker

Two MQTT connections with their own persistent sessions, so the broker keeps two
queues: alarms and officers' answers never wait behind a telemetry backlog, and the
gateway's own publishes (receipts, alerts) get their PUBACKs on a connection whose
reads are not paused by that backlog. On the bulk lane three stages overlap, batches
keeping their order: the event loop reads the next batch while the verify stage checks
the previous one and the database thread commits the one before. An urgent batch is
verified ahead of the bulk batches already queued (`_serve`) and committed right after
the bulk commit in progress. Verification (about 100 us a message, most of the CPU)
runs in `verify_workers` processes, each owning the senders `route` gives it, so each
sender's replay window and clock-skew estimate live in exactly one place while
signature checks use the other cores; `verify_workers = 0` verifies on a thread of this
process instead.

Flow control (nothing is dropped): the inbox is bounded (`queue_bound`). The socket
is read one MQTT packet at a time through `_ReaderGate`, which looks at the inbox before
each packet and stops reading when it is full, so TCP flow control pushes back on the
broker, which keeps the messages in this persistent session's queue (up to its
`max_queued_messages`); reading resumes when the inbox is half empty. Receiving starts
before the subscription is confirmed, because a persistent session's queued messages
arrive ahead of the SUBACK. (The broker's own in-flight limit cannot be relied on for
this: Mosquitto 2.0.11 honours MQTT 5 Receive Maximum and `max_inflight_messages` only
until the first PUBACK, then sends its whole queue, see mosquitto#2301; measured here.)
Messages are acknowledged only after the batch that holds them is committed (paho's
manual acks), so a gateway that stops or dies loses nothing the broker gave it:
unacknowledged messages are redelivered and the store's unique key turns them into
`replayed`. Should a message still not fit the inbox (it cannot, by construction) it
is counted as `overflow` and logged, and for QoS 1 the gateway reconnects so that the
broker redelivers it.

MQTT version: "3.1.1" by default. paho-mqtt 2.2 parses the MQTT 5 properties of every
incoming PUBLISH in pure Python (~85 us a message measured here, 4-5x the whole v3.1.1
receive path), which alone would cost a third of the 5,000 msg/s budget. Shared
subscriptions work with 3.1.1 clients on Mosquitto, EMQX, HiveMQ and VerneMQ alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import multiprocessing
import random
import signal
import socket
import sqlite3
import ssl
import threading
import time
import zlib
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar, cast

import aiomqtt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from certs.registry import KeyRegistry
from edge_agent.errors import BluelightError
from edge_agent.wire.envelope import Message, Signer, seal
from edge_agent.wire.errors import Rejected
from edge_agent.wire.model import receipt_body
from edge_agent.wire.topics import PREFIX, UP_FILTER, Topic, shared
from gateway.core import Accepted, IngestCore, IngestCounts, ReceiptBook, Rejection
from gateway.settings import GatewaySettings
from gateway.store import BatchResult, Store

log = logging.getLogger(__name__)

T = TypeVar("T")

RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0
#: The gateway's own sequence numbers are reserved in the store this many at a time.
SEQ_BLOCK = 1000
#: Batches between two stages; a full stage pauses the one before it (back-pressure).
STAGE_DEPTH = 2
#: After reading the socket, wait this long before reading again (see _ReaderGate).
READ_NAP_S = 0.004
#: MQTT packets read per wake-up at most (then the reader naps or yields to the loop).
READ_PACKETS = 1024
#: How often owed receipts are looked at (besides right after each commit).
RECEIPT_TICK_S = 0.05
#: Rejections logged one by one per reason per report interval; the rest are counted.
LOG_REJECTIONS = 5
#: The gateway's own QoS 1 publishes (receipts, alerts) in flight at once. paho's
#: default of 20 let one burst of receipts (up to one per device per
#: `receipt_interval_ms`) queue an alert behind it inside paho for seconds under load.
#: Mosquitto's `max_inflight_messages` (the Receive Maximum it gives MQTT 5 clients) is
#: 1000 in `bluelight.broker`.
DOWNLINK_INFLIGHT = 1000
#: Receipts published at once; the rest of the in-flight window is left for alerts.
RECEIPT_ROUND = DOWNLINK_INFLIGHT // 2  # a multiple of LOOP_SLICE
#: Receipts signed, or stored records fed to the picture, between two yields to the
#: event loop (each slice is a few milliseconds, so an alarm never waits for a burst).
LOOP_SLICE = 50
#: Kinds read on the urgent connection: alarms and officers' answers to alerts drive
#: dispatch, so they must never wait in the broker's queue behind a telemetry backlog.
#: Each batch of them is decided and committed at once, ahead of telemetry.
URGENT_KINDS = ("event", "ack")
#: Kinds read on the bulk connection, in batches of up to `batch_size`.
BULK_KINDS = ("telemetry", "status")
#: Signature checks a worker makes on a bulk batch between looks at its urgent pipe.
URGENT_CHECK = 32
#: Urgent batches up to this size are written to the worker's pipe from the event loop.
DIRECT_SEND = 64


def lane_filters(group: str, kinds: Sequence[str]) -> list[str]:
    """The shared subscriptions of one ingest connection."""
    return [shared(group, f"{PREFIX}/+/up/{kind}") for kind in kinds]


def wall_ms() -> int:
    """UTC milliseconds from the system clock."""
    return time.time_ns() // 1_000_000


def backoff(attempt: int, *, low: float = RECONNECT_MIN_S, high: float = RECONNECT_MAX_S) -> float:
    """Capped exponential backoff with jitter in its upper half."""
    cap: float = min(high, low * (2 ** min(attempt, 16)))
    return cap * random.uniform(0.5, 1.0)  # jitter, not a secret


class IngestError(BluelightError):
    """The ingest connection cannot go on (refused subscription, lost messages)."""


class _Inbox(asyncio.Queue[aiomqtt.Message]):
    """aiomqtt's incoming queue, bounded. It stamps each message's receive time as it
    arrives (`last_recv_ms` is the stamp of the message taken last) and sets `full_batch`
    once a batch's worth is waiting, so the receiver wakes once per batch, not per
    message. A message that does not fit is dropped by aiomqtt (it logs a warning);
    `on_overflow` reports it first."""

    def __init__(
        self, maxsize: int, batch_size: int, clock_ms: Callable[[], int], on_overflow: Callable[[aiomqtt.Message], None]
    ) -> None:
        super().__init__(maxsize)
        self.full_batch = asyncio.Event()
        self.last_recv_ms = 0
        self.received = 0
        self._batch_size = batch_size
        self._clock_ms = clock_ms
        self._on_overflow = on_overflow
        self._stamps: deque[int] = deque()

    def put_nowait(self, item: aiomqtt.Message) -> None:
        if self.full():
            self._on_overflow(item)
        super().put_nowait(item)
        if self.qsize() >= self._batch_size:
            self.full_batch.set()

    def _put(self, item: aiomqtt.Message) -> None:
        self.received += 1
        self._stamps.append(self._clock_ms())
        super()._put(item)

    def _get(self) -> aiomqtt.Message:
        self.last_recv_ms = self._stamps.popleft()
        item: aiomqtt.Message = super()._get()
        return item


class _ReaderGate:
    """Stands in for the event loop inside one aiomqtt client, to control reading its
    socket. aiomqtt registers its socket reader through here; the gate registers its own
    instead, which reads one MQTT packet at a time and looks at the inbox before each,
    so the inbox can never overflow: when it is full the gate stops reading (TCP flow
    control then pushes back on the broker) until `resume()`. aiomqtt's reader would
    read everything the socket holds in one go (paho's `loop_read` reads as many packets
    as there are messages in flight, thousands in a burst), which is what once
    overflowed the inbox. After each wake-up the gate naps for `nap_s`, so one wake-up
    reads many messages instead of one (each message is its own TLS record, and waking
    per message costs more than reading it). Everything else goes to the loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        read_packet: Callable[[], bool],
        buffered: Callable[[], bool],
        is_full: Callable[[], bool],
        nap_s: float,
    ) -> None:
        self._loop = loop
        self._read_packet = read_packet
        self._buffered = buffered
        self._is_full = is_full
        self._nap_s = nap_s
        self._fd: int | None = None
        self._nap: asyncio.TimerHandle | None = None
        self.paused = False
        self.pauses = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)

    def add_reader(self, fd: int, callback: Callable[..., object], *args: Any) -> None:
        self._fd = fd
        self.paused = False
        self._loop.add_reader(fd, self._readable)

    def remove_reader(self, fd: int) -> bool:
        self._fd = None
        self.paused = False
        if self._nap is not None:
            self._nap.cancel()
            self._nap = None
        return self._loop.remove_reader(fd)

    def _readable(self) -> None:
        fd = self._fd
        if fd is None:
            return
        self._loop.remove_reader(fd)
        for _ in range(READ_PACKETS):
            if self._is_full():
                self.paused = True
                self.pauses += 1
                return
            if not self._read_packet() or self._fd is None:
                break
        if self._fd is None:
            return
        if self._nap_s > 0:
            self._nap = self._loop.call_later(self._nap_s, self._arm)
        else:
            self._arm()

    def _arm(self) -> None:
        """Wait for the socket again; read at once what TLS has already decrypted (the
        socket does not show that as readable)."""
        self._nap = None
        if self._fd is None or self.paused:
            return
        if self._buffered():
            self._loop.call_soon(self._readable)
        else:
            self._loop.add_reader(self._fd, self._readable)

    def resume(self) -> None:
        if self.paused and self._fd is not None:
            self.paused = False
            if self._nap is None:
                self._arm()


#: At most this many bytes go out in one coalesced socket write.
COALESCE_BYTES = 64 * 1024


def _needs_nothing_after_send(packet: Any) -> bool:
    """paho acts on a QoS 0 PUBLISH (its on_publish) and a DISCONNECT once they are
    written; every other packet (PUBACK, QoS 1 PUBLISH, SUBSCRIBE, PINGREQ) is just bytes."""
    command = packet["command"] & 0xF0
    return command != mqtt.DISCONNECT and not (command == mqtt.PUBLISH and packet["qos"] == 0)


class _CoalescingPaho(mqtt.Client):
    """paho's client, writing the packets it has queued in one socket write where paho
    writes each on its own: a batch's PUBACKs (4 bytes each) and a round of receipts go
    out as one TLS record and one system call instead of hundreds, on the gateway and on
    the broker that reads them. Packets paho acts on after sending (QoS 0 PUBLISH,
    DISCONNECT) are written as paho writes them; order is kept."""

    def _packet_write(self) -> MQTTErrorCode:
        queue = self._out_packet
        if len(queue) > 1:
            merged: deque[Any] = deque()
            run: list[Any] = []
            size = 0
            for packet in queue:
                if not _needs_nothing_after_send(packet):
                    merged.extend(_joined(run))
                    run, size = [], 0
                    merged.append(packet)
                    continue
                if size >= COALESCE_BYTES:
                    merged.extend(_joined(run))
                    run, size = [], 0
                run.append(packet)
                size += packet["to_process"]
            merged.extend(_joined(run))
            queue.clear()
            queue.extend(merged)
        return super()._packet_write()


def _joined(run: list[Any]) -> list[Any]:
    """One packet carrying the unsent bytes of `run` (or `run` itself, if it is one)."""
    if len(run) < 2:
        return run
    data = b"".join(bytes(p["packet"][p["pos"] :]) for p in run)
    return [{"command": 0, "mid": 0, "qos": 0, "pos": 0, "to_process": len(data), "packet": data, "info": None}]


class _IngestClient(aiomqtt.Client):
    """aiomqtt's client plus what aiomqtt 2.x lacks for an ingest: manual acknowledgements
    (paho's public API; aiomqtt#345) and reading the socket packet by packet under a gate
    for back-pressure (paho's per-packet reader). Both reach into aiomqtt's paho client
    and loop reference; aiomqtt and paho-mqtt are pinned below their next major versions."""

    def __init__(self, hostname: str, port: int, *, inbox: _Inbox, read_nap_s: float, **kwargs: Any) -> None:
        super().__init__(
            hostname,
            port,
            queue_type=cast("type[asyncio.Queue[aiomqtt.Message]]", lambda maxsize=0: inbox),
            max_queued_incoming_messages=inbox.maxsize,
            **kwargs,
        )
        self.inbox = inbox
        self.gate = _ReaderGate(
            self._loop, read_packet=self._read_packet, buffered=self._buffered, is_full=inbox.full, nap_s=read_nap_s
        )
        self._loop = cast("asyncio.AbstractEventLoop", self.gate)
        if type(self._client) is mqtt.Client:
            self._client.__class__ = _CoalescingPaho
        self._client.manual_ack_set(True)
        self.pending_calls_threshold = 10_000  # receipts are published in bursts on purpose

    def _read_packet(self) -> bool:
        """Read at most one MQTT packet; False when the socket has no more for now or the
        connection broke (then, as aiomqtt's own reader does, the client disconnects)."""
        paho = self._client
        try:
            rc = paho._packet_read()
            if rc == mqtt.MQTT_ERR_AGAIN:
                return False
            if rc != mqtt.MQTT_ERR_SUCCESS:
                paho._loop_rc_handle(rc)
                return False
        except OSError as exc:
            if not self._disconnected.done():
                self._disconnected.set_exception(exc)
            return False
        return True

    def _buffered(self) -> bool:
        sock = self._client.socket()
        return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0

    def no_delay(self) -> None:
        """Send each packet at once (TCP_NODELAY): an alert or a PUBACK is one small
        packet, and Nagle's algorithm would hold it for the previous segment's ACK."""
        sock = self._client.socket()
        if isinstance(sock, socket.socket):  # an ssl.SSLSocket is one
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def ack(self, mid: int, qos: int) -> None:
        """Send the PUBACK for a message received at QoS 1 (no-op for QoS 0)."""
        if qos:
            self._client.ack(mid, qos)


@dataclass
class Decided:
    """What the verify stage made of one batch (sent back from a worker process)."""

    records: list[Accepted] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)
    examples: list[Rejection] = field(default_factory=list)
    replayed: list[tuple[str, int]] = field(default_factory=list)
    roles: dict[str, str] = field(default_factory=dict)
    skew: dict[str, int | None] = field(default_factory=dict)
    late: int = 0
    gaps: int = 0
    crl_reloaded: bool = False

    def merge(self, other: Decided) -> Decided:
        self.records += other.records
        self.rejected.update(other.rejected)
        self.examples += other.examples
        self.replayed += other.replayed
        self.roles.update(other.roles)
        self.skew.update(other.skew)
        self.late += other.late
        self.gaps += other.gaps
        self.crl_reloaded |= other.crl_reloaded
        return self


class Decider:
    """An `IngestCore` with its own key registry, for the senders routed to it. Lives on
    the verify thread or in a verify worker process; never shared between threads."""

    def __init__(self, settings: GatewaySettings, seeds: Mapping[str, int]) -> None:
        self.registry = KeyRegistry(settings.pki)
        self.core = IngestCore(
            self.registry,
            window=settings.replay_window,
            skew_bound_ms=settings.skew_bound_ms,
            skew_window_ms=settings.skew_window_s * 1000,
        )
        for device, last_seq in seeds.items():
            self.core.seed(device, last_seq)
        self._roles: dict[str, str | None] = {}

    def decide(self, raw: Sequence[tuple[str, bytes, int]]) -> Decided:
        """Verify and classify messages `(topic, payload, recv_ms)`. The CRL is re-read
        first if its file changed (one stat call), so a revocation applies from the next
        batch on."""
        out = Decided(crl_reloaded=self.registry.refresh())
        ingest = self.core.ingest
        records = out.records
        for topic, payload, recv_ms in raw:
            result = ingest(topic, payload, recv_ms)
            if isinstance(result, Accepted):
                records.append(result)
                if result.late:
                    out.late += 1
                if result.gap is not None:
                    out.gaps += 1
                continue
            out.rejected[result.reason] += 1
            if len(out.examples) < LOG_REJECTIONS:
                out.examples.append(result)
            if result.sender is not None and result.seq is not None:
                out.replayed.append((result.sender, result.seq))
        for device in {r.device_id for r in records}:
            if device not in self._roles:
                try:
                    self._roles[device] = self.registry.lookup(device).role.value
                except Rejected:
                    self._roles[device] = None
            role = self._roles[device]
            if role is not None:
                out.roles[device] = role
            out.skew[device] = self.core.skew_ms(device)
        return out


def route(topic: str, workers: int) -> int:
    """Which verify worker owns the sender of `topic` (stable, so each sender's replay
    window and skew estimate live in exactly one place)."""
    parts = topic.split("/", 3)
    return zlib.crc32(parts[2].encode()) % workers if len(parts) > 3 else 0


def _serve(bulk: Connection, urgent: Connection, settings: GatewaySettings, seeds: dict[str, int]) -> None:
    """A verify worker: batches in, `Decided` out, in order per pipe, until told to stop
    (None). A batch on the `urgent` pipe is decided before the rest of a bulk batch:
    bulk batches are decided `URGENT_CHECK` messages at a time, looking at `urgent` in
    between, so an alarm waits for at most that many signature checks, not a batch's."""
    decider = Decider(settings, seeds)
    bulk.send("ready")

    def answer_urgent() -> bool:
        raw = urgent.recv()
        if raw is None:
            return False
        urgent.send(decider.decide(raw))
        return True

    while True:
        try:
            ready = wait([urgent, bulk])
            if urgent in ready:
                if not answer_urgent():
                    return
                continue
            raw = bulk.recv()
            if raw is None:
                return
            out = Decided()
            for i in range(0, len(raw), URGENT_CHECK):
                while urgent.poll():
                    if not answer_urgent():
                        return
                out.merge(decider.decide(raw[i : i + URGENT_CHECK]))
            bulk.send(out)
        except EOFError:
            return


def _verify_process(bulk: Connection, urgent: Connection, settings: GatewaySettings, seeds: dict[str, int]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the gateway process stops its workers
    _serve(bulk, urgent, settings, seeds)


class _Channel:
    """One pipe to a worker: batches go down in order (on a sender thread, as a big
    batch can fill the pipe; a small urgent one from the loop) and results come back in
    order (on a reader thread; urgent ones on the loop)."""

    def __init__(self, conn: Connection, name: str, *, urgent: bool) -> None:
        self.conn = conn
        self.name = name
        self.urgent = urgent
        self.sender = ThreadPoolExecutor(1, thread_name_prefix=f"{name}-send")
        self.pending: deque[asyncio.Future[Decided]] = deque()
        self.reader: threading.Thread | None = None


class _Verifier:
    """Verifies in `n` worker processes, each owning the senders `route` gives it, so
    signature checks use other cores; `n = 0` runs one worker on a thread of this
    process instead. Each worker has two pipes, bulk and urgent (`_serve`), so an alarm
    overtakes the telemetry batches already handed to its worker. A worker can be given
    the next batch while it still works on one."""

    def __init__(self, settings: GatewaySettings, seeds: Mapping[str, int], n: int) -> None:
        self._n = max(n, 1)
        self._workers: list[BaseProcess | threading.Thread] = []
        self._channels: dict[bool, list[_Channel]] = {False: [], True: []}
        self._thread_ends: list[Connection] = []  # a thread worker's ends, closed after it
        ctx = multiprocessing.get_context("spawn")
        for i in range(self._n):
            pipes = [ctx.Pipe() for _ in range(2)]
            mine = {device: seq for device, seq in seeds.items() if route(f"bl/v1/{device}/up", self._n) == i}
            args = (pipes[0][1], pipes[1][1], settings, mine)
            worker: BaseProcess | threading.Thread
            if n:
                worker = ctx.Process(target=_verify_process, args=args, name=f"bl-verify-{i}", daemon=True)
            else:
                worker = threading.Thread(target=_serve, args=args, name="bl-gateway-verify", daemon=True)
            worker.start()
            for _parent, child in pipes:
                if n:
                    child.close()
                else:
                    self._thread_ends.append(child)
            self._workers.append(worker)
            for urgent, (parent, _child) in zip((False, True), pipes, strict=True):
                name = f"bl-verify-{'urgent' if urgent else 'bulk'}-{i}"
                self._channels[urgent].append(_Channel(parent, name, urgent=urgent))
        self._failed: IngestError | None = None
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Wait until every worker has loaded its keys, then start reading results."""
        loop = self._loop = asyncio.get_running_loop()
        bulk = self._channels[False]
        await asyncio.gather(*(loop.run_in_executor(bulk[i].sender, self._hello, i) for i in range(self._n)))
        for i, channel in enumerate(self._channels[False]):
            channel.reader = threading.Thread(
                target=self._read, args=(i, channel, loop), name=f"{channel.name}-recv", daemon=True
            )
            channel.reader.start()
        for i, channel in enumerate(self._channels[True]):
            # Small results, read on the loop: no thread has to win the GIL back first.
            loop.add_reader(channel.conn.fileno(), self._read_ready, i, channel)

    def _exit_code(self, i: int) -> int | None:
        worker = self._workers[i]
        return worker.exitcode if isinstance(worker, BaseProcess) else None

    def _hello(self, i: int) -> None:
        try:
            self._channels[False][i].conn.recv()
        except EOFError:
            self._workers[i].join(1)
            raise IngestError(f"verify worker {i} did not start (exit code {self._exit_code(i)})") from None

    def _read(self, i: int, channel: _Channel, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                result = channel.conn.recv()
            except (EOFError, OSError):
                if not self._closing:
                    self._workers[i].join(1)
                    loop.call_soon_threadsafe(self._fail, i)
                return
            loop.call_soon_threadsafe(self._resolve, channel, result)

    def _read_ready(self, i: int, channel: _Channel) -> None:
        try:
            while channel.conn.poll():
                self._resolve(channel, channel.conn.recv())
        except (EOFError, OSError):
            assert self._loop is not None
            self._loop.remove_reader(channel.conn.fileno())
            if not self._closing:
                self._fail(i)

    @staticmethod
    def _resolve(channel: _Channel, result: Decided) -> None:
        future = channel.pending.popleft()
        if not future.done():
            future.set_result(result)

    def _fail(self, i: int) -> None:
        self._failed = IngestError(f"verify worker {i} exited (code {self._exit_code(i)})")
        for channels in self._channels.values():
            for channel in channels:
                while channel.pending:
                    future = channel.pending.popleft()
                    if not future.done():
                        future.set_exception(self._failed)

    def submit(self, raw: list[tuple[str, bytes, int]], *, urgent: bool = False) -> Awaitable[Decided]:
        """Queue a batch; batches are decided in the order submitted, an urgent one
        ahead of bulk ones."""
        if self._failed is not None:
            raise self._failed
        assert self._loop is not None, "start() first"
        channels = self._channels[urgent]
        if self._n == 1:
            return self._send(0, channels[0], raw)
        parts: dict[int, list[tuple[str, bytes, int]]] = {}
        for item in raw:
            parts.setdefault(route(item[0], self._n), []).append(item)
        return self._merge([self._send(i, channels[i], part) for i, part in parts.items()])

    def _send(self, i: int, channel: _Channel, raw: list[tuple[str, bytes, int]]) -> asyncio.Future[Decided]:
        assert self._loop is not None
        future: asyncio.Future[Decided] = self._loop.create_future()
        channel.pending.append(future)
        if channel.urgent and len(raw) <= DIRECT_SEND:
            # An urgent pipe carries nothing else, so a small batch never blocks here.
            try:
                channel.conn.send(raw)
            except OSError:
                if not self._closing:
                    self._fail(i)
            return future
        sent = self._loop.run_in_executor(channel.sender, channel.conn.send, raw)
        sent.add_done_callback(functools.partial(self._sent, i))
        return future

    def _sent(self, i: int, sent: asyncio.Future[None]) -> None:
        if not sent.cancelled() and sent.exception() is not None and not self._closing:
            self._fail(i)

    @staticmethod
    async def _merge(parts: list[asyncio.Future[Decided]]) -> Decided:
        return functools.reduce(Decided.merge, await asyncio.gather(*parts), Decided())

    def close(self) -> None:
        self._closing = True
        if self._loop is not None and not self._loop.is_closed():
            for channel in self._channels[True]:
                self._loop.remove_reader(channel.conn.fileno())
        for channels in self._channels.values():
            for channel in channels:
                with contextlib.suppress(OSError, RuntimeError):
                    channel.sender.submit(channel.conn.send, None).result(timeout=5)
                channel.sender.shutdown(wait=True)
        for worker in self._workers:
            worker.join(5)
            if isinstance(worker, BaseProcess) and worker.is_alive():
                worker.terminate()
                worker.join(5)
        for end in self._thread_ends:
            end.close()
        for channels in self._channels.values():
            for channel in channels:
                if channel.reader is not None:
                    channel.reader.join(5)
                channel.conn.close()


class _Lane:
    """One of the ingest's two MQTT connections (`bulk` or `urgent`): its session, what
    it subscribes to, and its client while connected."""

    def __init__(self, name: str, client_id: str, filters: list[str], *, batches: bool) -> None:
        self.name = name
        self.client_id = client_id
        self.filters = filters
        #: Wait up to `batch_latency_ms` for a batch to fill (telemetry), or not (alarms).
        self.batches = batches
        #: Batches received, waiting for the lane's pipeline.
        self.received: asyncio.Queue[_Batch] = asyncio.Queue(STAGE_DEPTH)
        self.client: _IngestClient | None = None
        #: The broker granted this connection's subscriptions.
        self.subscribed = False
        #: A QoS 1 message did not fit the inbox (cannot happen, see `_ReaderGate`).
        self.lost_qos1 = False


@dataclass
class _Batch:
    """Messages received on one connection; decided; committed; then acknowledged on
    that connection."""

    lane: _Lane
    client: _IngestClient
    acks: list[tuple[int, int]] = field(default_factory=list)
    raw: list[tuple[str, bytes, int]] = field(default_factory=list)
    decided: Decided = field(default_factory=Decided)


def _connect_properties(settings: GatewaySettings) -> Properties:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = settings.session_expiry_s
    props.ReceiveMaximum = settings.queue_bound
    return props


class Ingest:
    """Runs the two MQTT subscriptions, the verify and write stages and the receipt
    sender until cancelled.

    Two connections, two persistent sessions, so two broker queues: `bulk` reads
    telemetry and status in batches through the staged pipeline; `urgent` reads alarms
    and officers' answers (`URGENT_KINDS`) and takes each batch of them through verify
    (ahead of telemetry, `_serve`) and commit at once. `urgent` also publishes every
    downlink (receipts, alerts): its PUBACKs come back on a connection that is never
    paused behind a backlog."""

    def __init__(
        self,
        settings: GatewaySettings,
        store: Store,
        *,
        tls_context: ssl.SSLContext,
        signer: Signer,
        clock_ms: Callable[[], int] = wall_ms,
        on_stored: Callable[[Sequence[Accepted]], None] | None = None,
    ) -> None:
        """`on_stored` is called on the event loop with each batch's accepted records
        once they are committed (the situational picture's feed)."""
        if signer.kid != settings.gateway_id:
            raise IngestError(f"receipts must be signed by {settings.gateway_id!r}, not {signer.kid!r}")
        self.settings = settings
        self.store = store
        self.counts = IngestCounts()
        self.receipts = ReceiptBook(settings.receipt_interval_ms)
        #: Set while both connections are up and subscribed.
        self.connected = asyncio.Event()
        self._tls = tls_context
        self._signer = signer
        self._clock_ms = clock_ms
        self.on_stored = on_stored
        gw, group = settings.gateway_id, settings.share_group
        self._bulk = _Lane("bulk", f"{gw}-ingest", lane_filters(group, BULK_KINDS), batches=True)
        self._urgent = _Lane("urgent", f"{gw}-urgent", lane_filters(group, URGENT_KINDS), batches=False)
        self._verifying: asyncio.Queue[tuple[_Batch, Awaitable[Decided]]] = asyncio.Queue(STAGE_DEPTH)
        self._decided: asyncio.Queue[_Batch] = asyncio.Queue(STAGE_DEPTH)
        self._verifier_ready = asyncio.Event()
        self._receipts_ready = asyncio.Event()
        self._db_thread: ThreadPoolExecutor | None = None
        self._seq_next = 0
        self._seq_end = 0
        self._spare_seqs: asyncio.Future[tuple[int, int]] | None = None
        self._logged: Counter[str] = Counter()
        self.committed = 0
        self.overflow = 0
        self.receipts_sent = 0
        self.receipts_failed = 0
        self.rate = 0.0

    # -- public ---------------------------------------------------------------
    async def run(self) -> None:
        """Ingest until cancelled. Messages not yet committed when it stops were not
        acknowledged, so the broker delivers them again on the next start."""
        s = self.settings
        self._db_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bl-gateway-db")
        verifier: _Verifier | None = None
        try:
            seeds = await self._on(self._db_thread, self.store.last_seqs)
            verifier = _Verifier(s, seeds, s.verify_workers)
            async with asyncio.TaskGroup() as tg:
                for lane in (self._bulk, self._urgent):
                    tg.create_task(self._connection_loop(lane), name=f"ingest-mqtt-{lane.name}")
                tg.create_task(self._dispatch_loop(verifier), name="ingest-dispatch")
                tg.create_task(self._verify_loop(), name="ingest-verify")
                tg.create_task(self._write_loop(), name="ingest-write")
                tg.create_task(self._urgent_loop(verifier), name="ingest-urgent")
                tg.create_task(self._receipt_loop(), name="ingest-receipts")
                tg.create_task(self._report_loop(), name="ingest-report")
        finally:
            if self._spare_seqs is not None:
                self._spare_seqs.cancel()
            if verifier is not None:
                verifier.close()
            self._db_thread.shutdown(wait=True)

    def live(self) -> dict[str, Any]:
        """This process's figures, for `/api/v1/stats`."""
        bulk, urgent = self._bulk.client, self._urgent.client
        return {
            "connected": self.connected.is_set(),
            "mqtt_protocol": self.settings.mqtt_protocol,
            "verify_workers": self.settings.verify_workers,
            "inbox": bulk.inbox.qsize() if bulk is not None else 0,
            "urgent_inbox": urgent.inbox.qsize() if urgent is not None else 0,
            "queue_bound": self.settings.queue_bound,
            "batches_waiting": self._bulk.received.qsize() + self._verifying.qsize() + self._decided.qsize(),
            "accepted_per_s": round(self.rate, 1),
            "overflow": self.overflow,
            "read_pauses": bulk.gate.pauses if bulk is not None else 0,
            "receipts_sent": self.receipts_sent,
            "receipts_failed": self.receipts_failed,
            "receipts_owed": self.receipts.pending,
        }

    # -- stage 1: MQTT (event loop) -------------------------------------------
    def _new_client(self, lane: _Lane) -> _IngestClient:
        s = self.settings
        v5 = s.mqtt_protocol == "5"
        return _IngestClient(
            s.broker_host,
            s.broker_port,
            inbox=_Inbox(s.queue_bound, s.batch_size, self._clock_ms, functools.partial(self._overflowed, lane)),
            read_nap_s=READ_NAP_S if lane.batches else 0.0,
            identifier=lane.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            clean_start=False if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            clean_session=None if v5 else False,
            properties=_connect_properties(s) if v5 else None,
            tls_context=self._tls,
            keepalive=30,
            max_inflight_messages=DOWNLINK_INFLIGHT,
        )

    def _overflowed(self, lane: _Lane, message: aiomqtt.Message) -> None:
        self.overflow += 1
        if message.qos:
            lane.lost_qos1 = True
        log.error("inbox full: dropped a QoS %d message on %s", message.qos, message.topic)

    def _update_connected(self) -> None:
        if self._bulk.subscribed and self._urgent.subscribed:
            self.connected.set()
        else:
            self.connected.clear()

    async def _connection_loop(self, lane: _Lane) -> None:
        s = self.settings
        attempt = 0
        while True:
            client = self._new_client(lane)
            lane.lost_qos1 = False
            try:
                async with client, asyncio.TaskGroup() as tg:
                    # Receive before the SUBACK: a persistent session's queued messages
                    # arrive ahead of it, and must be drained for the SUBACK to be read.
                    lane.client = client
                    client.no_delay()
                    tg.create_task(self._receive(lane, client), name=f"ingest-receive-{lane.name}")
                    granted = await client.subscribe([(f, 1) for f in lane.filters])
                    if any(getattr(code, "value", code) >= 0x80 for code in granted):
                        raise IngestError(f"the broker refused the subscription to {lane.filters}: {granted}")
                    if lane is self._bulk:
                        # Sessions of gateways before the urgent lane read every uplink
                        # here; from now on alarms and answers come on the urgent one only.
                        await client.unsubscribe(shared(s.share_group, UP_FILTER))
                    lane.subscribed = True
                    self._update_connected()
                    attempt = 0
                    log.info("ingest connected (%s lane) to %s as %s (MQTT %s), subscribed to %s",
                             lane.name, s.broker, lane.client_id, s.mqtt_protocol, " ".join(lane.filters))
            except* (aiomqtt.MqttError, IngestError) as group:
                log.warning("ingest %s lane, connection to %s: %s",
                            lane.name, s.broker, "; ".join(map(str, group.exceptions)))
            finally:
                if lane.client is client:
                    lane.client = None
                lane.subscribed = False
                self._update_connected()
            delay = backoff(attempt)
            attempt += 1
            log.info("ingest %s lane reconnecting in %.1fs", lane.name, delay)
            await asyncio.sleep(delay)

    async def _receive(self, lane: _Lane, client: _IngestClient) -> None:
        """Fill batches: up to `batch_size` messages, or on the bulk lane up to
        `batch_latency_ms` after the first; hand them to the lane's pipeline."""
        inbox, gate = client.inbox, client.gate
        low_water = inbox.maxsize // 2
        size = self.settings.batch_size
        latency = self.settings.batch_latency_ms / 1000 if lane.batches else 0.0
        loop = asyncio.get_running_loop()
        async for first in client.messages:
            batch = _Batch(lane, client)
            acks, raw = batch.acks, batch.raw
            # Let the batch fill, waking once rather than per message.
            if latency and inbox.qsize() + 1 < size:
                inbox.full_batch.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(loop.time() + latency):
                        await inbox.full_batch.wait()
            message = first
            while True:
                acks.append((message.mid, message.qos))
                payload = message.payload
                raw.append((message.topic.value, payload if isinstance(payload, bytes) else b"", inbox.last_recv_ms))
                if len(acks) >= size:
                    break
                if gate.paused and inbox.qsize() <= low_water:
                    gate.resume()
                try:
                    message = inbox.get_nowait()
                except asyncio.QueueEmpty:
                    break
            if gate.paused and inbox.qsize() <= low_water:
                gate.resume()
            await lane.received.put(batch)
            if lane.lost_qos1:
                raise IngestError("a QoS 1 message did not fit the inbox; reconnecting so the broker redelivers it")

    # -- stage 2: verify (worker processes) ----------------------------------
    async def _on(self, executor: ThreadPoolExecutor | None, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, functools.partial(fn, *args))

    async def _dispatch_loop(self, verifier: _Verifier) -> None:
        """Hand bulk batches to the verifier without waiting for earlier ones to come back."""
        await verifier.start()  # meanwhile the subscriptions are made and the inboxes fill
        self._verifier_ready.set()
        while True:
            batch = await self._bulk.received.get()
            decided = verifier.submit(batch.raw)
            batch.raw = []
            await self._verifying.put((batch, decided))

    async def _verify_loop(self) -> None:
        while True:
            batch, pending = await self._verifying.get()
            self._tally(await pending, batch)
            await self._decided.put(batch)

    def _tally(self, decided: Decided, batch: _Batch) -> None:
        batch.decided = decided
        counts = self.counts
        if decided.crl_reloaded:
            log.info("CRL reloaded: revoked senders are rejected from now on")
        counts.accepted += len(decided.records)
        counts.late += decided.late
        counts.gaps += decided.gaps
        for reason, n in decided.rejected.items():
            counts.rejected[reason] = counts.rejected.get(reason, 0) + n
        for rejection in decided.examples:
            self._log_rejection(rejection)

    def _log_rejection(self, rejection: Rejection) -> None:
        self._logged[rejection.reason] += 1
        if self._logged[rejection.reason] <= LOG_REJECTIONS:
            log.warning("rejected %s on %s: %s", rejection.reason, rejection.topic[:200], rejection.detail[:200])

    # -- stage 3: store (database thread) -------------------------------------
    async def _write_loop(self) -> None:
        while True:
            await self._store_batch(await self._decided.get())

    async def _urgent_loop(self, verifier: _Verifier) -> None:
        """The urgent lane's pipeline: each batch verified (ahead of telemetry) and
        committed before the next is taken."""
        await self._verifier_ready.wait()
        while True:
            batch = await self._urgent.received.get()
            self._tally(await verifier.submit(batch.raw, urgent=True), batch)
            await self._store_batch(batch)

    async def _store_batch(self, batch: _Batch) -> None:
        """Commit, acknowledge, feed the picture and owe receipts."""
        result = await self._commit(batch)
        self.committed += result.inserted
        self._ack(batch)
        records = batch.decided.records
        if self.on_stored is not None:
            for i in range(0, len(records), LOOP_SLICE):
                if i:
                    await asyncio.sleep(0)  # an alarm waiting on the loop goes first
                self.on_stored(records[i : i + LOOP_SLICE])
        for device, seqs in result.receipts.items():
            self.receipts.add(device, seqs)
        if result.receipts:
            self._receipts_ready.set()

    async def _commit(self, batch: _Batch) -> BatchResult:
        d = batch.decided
        write = functools.partial(
            self.store.write_batch,
            d.records,
            rejected=d.rejected,
            replayed=d.replayed,
            roles=d.roles,
            skew=d.skew,
            counters={"late": d.late, "gaps": d.gaps},
        )
        delay = 0.1
        while True:
            try:
                return await self._on(self._db_thread, write)
            except sqlite3.OperationalError:
                log.exception("store write failed; retrying in %.1fs (the messages stay unacknowledged)", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    @staticmethod
    def _ack(batch: _Batch) -> None:
        """Acknowledge a committed batch on the connection it came in on. If that
        connection is gone, the broker redelivers and the store de-duplicates."""
        if batch.client is not batch.lane.client:
            return
        ack = batch.client.ack
        for mid, qos in batch.acks:
            ack(mid, qos)

    # -- downlinks: receipts and alerts (event loop, urgent lane) -------------
    async def _receipt_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECEIPT_TICK_S):
                    await self._receipts_ready.wait()
            self._receipts_ready.clear()
            client = self._urgent.client
            if client is None:
                continue
            due = self.receipts.due(self._clock_ms())
            if due:
                await self._send_receipts(client, due)

    async def _take_seqs(self, n: int) -> int:
        """The first of `n` of the gateway's sequence numbers. They are reserved in the
        store a block at a time, the next block in the background once half of this one
        is used, so a downlink seldom waits behind a commit for its number."""
        if self._seq_next + n > self._seq_end:
            spare, self._spare_seqs = self._spare_seqs, None
            first, end = await spare if spare is not None else (0, 0)
            if end - first < n:
                first, end = await self._reserve_seqs(max(SEQ_BLOCK, n))
            self._seq_next, self._seq_end = first, end
        first = self._seq_next
        self._seq_next += n
        if self._spare_seqs is None and self._seq_end - self._seq_next < SEQ_BLOCK // 2:
            self._spare_seqs = asyncio.ensure_future(self._reserve_seqs(SEQ_BLOCK))
        return first

    async def _reserve_seqs(self, n: int) -> tuple[int, int]:
        first = await self._on(self._db_thread, self.store.reserve_seqs, self.settings.gateway_id, n)
        return first, first + n

    async def _seal_down(self, items: Sequence[tuple[str, str, Mapping[str, Any]]]) -> list[tuple[str, bytes]]:
        """Sign `(device, kind, body)` downlinks with the gateway's next sequence numbers;
        returns `(topic, envelope)` pairs."""
        seq = await self._take_seqs(len(items))
        now = self._clock_ms()
        gateway_id = self.settings.gateway_id
        return [
            (str(Topic.down(device, kind)), seal(Message(gateway_id, seq + i, now, kind, body), self._signer))
            for i, (device, kind, body) in enumerate(items)
        ]

    async def publish_down(self, device: str, kind: str, body: Mapping[str, Any]) -> bool:
        """Sign one downlink (e.g. an alert) and publish it at QoS 1 on the device's
        `down/<kind>`; True once the broker has it. False when the ingest has no broker
        connection or the publish failed: the caller keeps it and tries again."""
        client = self._urgent.client
        if client is None:
            return False
        [(topic, data)] = await self._seal_down([(device, kind, body)])
        try:
            await client.publish(topic, data, qos=1)
        except aiomqtt.MqttError as exc:
            log.warning("%s to %s not sent: %s", kind, device, exc)
            return False
        return True

    async def _send_receipts(self, client: aiomqtt.Client, due: list[tuple[str, list[int]]]) -> None:
        """Publish owed receipts, `RECEIPT_ROUND` at a time: paho numbers its publishes
        with 16-bit ids and does not skip ids still in use, so the gateway never has more
        than a round outstanding (a burst of thousands once made ids collide and the
        client stop sending for good)."""
        for i in range(0, len(due), RECEIPT_ROUND):
            sends = []
            for j in range(i, min(i + RECEIPT_ROUND, len(due)), LOOP_SLICE):
                items = [(device, "cmd", receipt_body(seqs)) for device, seqs in due[j : j + LOOP_SLICE]]
                sends += [client.publish(topic, data, qos=1) for topic, data in await self._seal_down(items)]
                await asyncio.sleep(0)  # an alarm waiting on the loop goes first
            for outcome in await asyncio.gather(*sends, return_exceptions=True):
                if isinstance(outcome, aiomqtt.MqttError):
                    self.receipts_failed += 1
                    log.debug("receipt not sent: %s", outcome)
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
                    self.receipts_sent += 1

    # -- housekeeping ---------------------------------------------------------
    async def _report_loop(self) -> None:
        interval = self.settings.report_interval_s
        counts = self.counts
        last_accepted, last_rejected = counts.accepted, dict(counts.rejected)
        loop = asyncio.get_running_loop()
        last_t = loop.time()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            accepted, rejected_now = counts.accepted, dict(counts.rejected)
            self.rate = (accepted - last_accepted) / (now - last_t)
            new = {reason: n - last_rejected.get(reason, 0) for reason, n in rejected_now.items()}
            if accepted != last_accepted or any(new.values()):
                log.info(
                    "ingest: %.0f accepted/s (%d since start), rejected: %s; inbox %d/%d, receipts sent %d",
                    self.rate, accepted, " ".join(f"{r}={n}" for r, n in sorted(new.items()) if n) or "none",
                    self._bulk.client.inbox.qsize() if self._bulk.client is not None else 0, self.settings.queue_bound,
                    self.receipts_sent,
                )
            last_accepted, last_rejected, last_t = accepted, rejected_now, now
            self._logged.clear()
