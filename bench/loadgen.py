"""The ingest benchmark's load generator and harness (the command is `bench/ingest`).

Two runs put the same load on the publisher side: D device identities publish the
same pre-signed COSE_Sign1 telemetry envelopes (ES256, ~270 bytes; MQTT 5, QoS 1,
mutual TLS, one paho client per identity) to a Mosquitto started with Bluelight's
production config (`bluelight.broker`):

- raw:  -> one paho subscriber (gateway identity, `bl/v1/+/up/#`, QoS 1) that only counts;
- real: -> the real gateway (`bluelight gateway run`), which verifies and stores; the
  devices' clients also read and verify their signed `down/cmd` receipts, as agents do.

Publishers drive paho's network loop themselves (one selector over all sockets,
`loop_read`/`loop_write`; measured ~40% less CPU a message than `loop_start()`'s
thread per client), with a bounded window of unacknowledged PUBLISHes per client. At
`rate == 0` they publish as fast as the windows allow; otherwise open loop at a fixed
rate in 10 ms ticks. Every process is forked or started here and stopped by PID.

The figures `run_bench` returns (`bench/ingest --json` prints them), FIGURE_KEYS:

    machine     cpu, cores, python, mosquitto, paho, cryptography, kernel
    started     UTC time of the run
    config      devices, duration_s, rate, window, publishers, presigned, sink_mqtt, envelope_bytes
    raw, real   run figures (RUN_KEYS, the real run also REAL_KEYS), None when skipped
    ratio       real msgs_per_s / raw msgs_per_s, or None
    zero_loss   real run: every published (device, seq) stored exactly once, none
                missing by the gateway's API; None when skipped

Run figures, RUN_KEYS: `published` (PUBACKed, one warm-up message per device
included), `delivered` (received by the sink / distinct rows stored), `lost`,
`duplicates`, `seconds` (first timed publish to last delivery), `msgs_per_s` (timed
messages delivered / seconds), `publish_rate`, `latency_p50_ms`, `latency_p99_ms`,
`latency_max_ms`, `latency_samples` (publish call to arrival at the sink, or to the
arrival of the gateway's signed receipt, which the gateway sends at most every
`receipt_interval_ms` per device), `max_backlog` (rate mode: most messages behind
schedule), `cpu` (per role: `core_pct` of one core and `us_per_msg`, and
`machine_busy_pct`), `background_pct` (the machine's load before the run started).
REAL_KEYS add: `stored_rows`, `distinct`, `missing`, `receipts_confirmed`,
`store_latency_p50_ms`/`_p99_ms`/`_max_ms`/`_samples` (publish call to the row's time
column, `store_latency_column`), `accepted`, `rejected`, `skewed`, `gaps` (the
gateway's `/api/v1/stats`), `gateway_live` (its `ingest` figures there, if any).
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import datetime as dt
import http.client
import json
import math
import multiprocessing as mp
import os
import platform
import selectors
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_connections
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from paho.mqtt.enums import CallbackAPIVersion

from bluelight.broker import Broker, BrokerSettings, find_mosquitto
from certs.pki import DEFAULT_GATEWAY_ID, Pki
from certs.registry import KeyRegistry
from certs.tls import client_context
from edge_agent.link import verify_downlink
from edge_agent.wire.envelope import KeySigner, Message, seal
from edge_agent.wire.errors import Rejected
from edge_agent.wire.ids import Role
from edge_agent.wire.model import parse_ranges
from edge_agent.wire.topics import UP_FILTER, Topic, down_filter

Log = Callable[[str], None]

FIGURE_KEYS = frozenset({"machine", "started", "config", "raw", "real", "ratio", "zero_loss"})
RUN_KEYS = frozenset(
    {
        "published", "delivered", "lost", "duplicates", "seconds", "msgs_per_s", "publish_rate",
        "latency_p50_ms", "latency_p99_ms", "latency_max_ms", "latency_samples", "max_backlog", "cpu",
        "background_pct",
    }
)  # fmt: skip
REAL_KEYS = frozenset(
    {
        "stored_rows", "distinct", "missing", "receipts_confirmed", "store_latency_p50_ms",
        "store_latency_p99_ms", "store_latency_max_ms", "store_latency_samples", "store_latency_column",
        "accepted", "rejected", "skewed", "gaps",
    }
)  # fmt: skip

#: Unacknowledged PUBLISHes allowed per device connection.
DEFAULT_WINDOW = 100
#: How long delivery may stall (no progress at all) before the rest is called lost.
DRAIN_TIMEOUT_S = 20.0
#: Estimated ceiling of a max-rate run, to size the pre-signed stock.
MAX_RATE_ESTIMATE = 16_000
TICK_S = 0.01
#: The checkout this harness belongs to (the gateway it starts runs this code).
REPO_ROOT = Path(__file__).resolve().parent.parent


class BenchError(RuntimeError):
    """The benchmark cannot go on (a process died, a connection failed, a timeout)."""


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        out = subprocess.run([find_mosquitto(), "-h"], capture_output=True, text=True, timeout=5, check=False)
        mosquitto = (out.stdout or out.stderr).splitlines()[0].strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        mosquitto = "unknown"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "mosquitto": mosquitto,
        "paho": metadata.version("paho-mqtt"),
        "cryptography": metadata.version("cryptography"),
        "kernel": platform.release(),
    }


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def _stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


class MosquittoRunner:
    """Mosquitto with the exact config `bluelight broker run` writes, stopped by PID."""

    def __init__(self, pki: Pki, work_dir: Path, port: int | None = None) -> None:
        self.settings = BrokerSettings(pki_dir=pki.root, port=port or free_port(), data_dir=work_dir)
        self.log_path = work_dir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return self.settings.port

    def start(self) -> MosquittoRunner:
        broker = Broker(self.settings)
        broker.write_files()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [find_mosquitto(), "-c", str(broker.config_path)], stdout=log, stderr=log, start_new_session=True
            )
        try:
            wait_for_port(self.port)
        except BenchError:
            self.stop()
            raise BenchError(f"mosquitto did not start:\n{_tail(self.log_path)}") from None
        return self

    def stop(self) -> None:
        _stop_process(self.proc)

    def __enter__(self) -> MosquittoRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class GatewayRunner:
    """`bluelight gateway run` as a subprocess, with its HTTPS API read over mutual TLS."""

    def __init__(
        self,
        pki: Pki,
        broker_port: int,
        work_dir: Path,
        http_port: int | None = None,
        *,
        extra_args: Sequence[str] = (),
    ) -> None:
        """`extra_args` go to `bluelight gateway run` (e.g. `--registry FILE --map FILE`)."""
        self.pki = pki
        self.broker_port = broker_port
        self.work_dir = work_dir
        self.extra_args = tuple(extra_args)
        self.db_path = work_dir / "gateway.db"
        self.http_port = http_port or free_port()
        self.log_path = work_dir / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._ctx = client_context(pki, pki.require_identity(DEFAULT_GATEWAY_ID))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "bluelight", "gateway", "run",
            "--pki", str(self.pki.root),
            "--broker", f"localhost:{self.broker_port}",
            "--db", str(self.db_path),
            "--http-port", str(self.http_port),
            *self.extra_args,
        ]  # fmt: skip

    @staticmethod
    def environment() -> dict[str, str]:
        """The gateway imports the checkout this harness lives in, not whatever the
        venv's editable install points at."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        return env

    def start(self, timeout: float = 30.0) -> GatewayRunner:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=log, start_new_session=True, env=self.environment()
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"the gateway exited with {self.proc.returncode}:\n{_tail(self.log_path)}")
            with contextlib.suppress(OSError, http.client.HTTPException, BenchError):
                # Up, and subscribed: until then the broker drops what devices publish.
                if self.get("/api/v1/health").get("ingest_connected", True):
                    return self
            time.sleep(0.2)
        self.stop()
        raise BenchError(
            f"the gateway's /api/v1/health did not report ingest_connected within {timeout}s:\n{_tail(self.log_path)}"
        )

    def get(self, path: str) -> Any:
        conn = http.client.HTTPSConnection("localhost", self.http_port, context=self._ctx, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise BenchError(f"GET {path}: HTTP {resp.status}")
        return json.loads(body)

    def stop(self) -> None:
        _stop_process(self.proc, timeout=15)

    def __enter__(self) -> GatewayRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: The fields of /proc/stat's first line, in order.
CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal", "guest", "guest_nice")


def machine_ticks() -> dict[str, int]:
    """The whole machine's CPU time since boot by kind (clock ticks), from /proc/stat."""
    values = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return dict(zip(CPU_FIELDS, map(int, values), strict=False))


class CpuMeter:
    """CPU seconds (user + system, all threads, and all descendant processes, such as the
    gateway's verify workers) each role's processes used between `start()` and
    `stop()`, and how busy the whole machine was."""

    def __init__(self, pids: Mapping[str, Iterable[int | None]], *, alone: Iterable[str] = ("harness",)) -> None:
        self.pids = {role: [p for p in ps if p] for role, ps in pids.items()}
        #: Roles counted without their descendants (the harness is everyone's parent).
        self.alone = frozenset(alone)
        self._start: dict[str, dict[int, float]] = {}
        self._machine: tuple[float, float] = (0.0, 0.0)
        self.wall = 0.0

    @staticmethod
    def process_seconds(pid: int) -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def with_descendants(roots: Iterable[int]) -> set[int]:
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    children.setdefault(ppid, []).append(int(entry.name))
        found, todo = set(), list(roots)
        while todo:
            pid = todo.pop()
            if pid not in found:
                found.add(pid)
                todo.extend(children.get(pid, ()))
        return found

    @staticmethod
    def machine_seconds() -> tuple[float, float]:
        """(busy, total) CPU seconds of the whole machine since boot."""
        ticks = machine_ticks()
        idle = ticks["idle"] + ticks["iowait"]
        hz = os.sysconf("SC_CLK_TCK")
        return (sum(ticks.values()) - idle) / hz, sum(ticks.values()) / hz

    def _sample(self) -> dict[str, dict[int, float]]:
        return {
            role: {pid: self.process_seconds(pid) for pid in (ps if role in self.alone else self.with_descendants(ps))}
            for role, ps in self.pids.items()
        }

    def start(self) -> None:
        self._start = self._sample()
        self._machine = self.machine_seconds()
        self.wall = time.monotonic()

    def stop(self, messages: int) -> dict[str, Any]:
        """CPU per role as % of one core over the run and µs per message. A process that
        started during the run counts in full; one that ended during it is not counted."""
        end = self._sample()
        busy, total = self.machine_seconds()
        wall = max(time.monotonic() - self.wall, 1e-9)
        out: dict[str, Any] = {}
        for role, now in end.items():
            before = self._start.get(role, {})
            used = sum(t - before.get(pid, 0.0) for pid, t in now.items())
            out[role] = {
                "core_pct": round(100 * used / wall, 1),
                "us_per_msg": round(1e6 * used / max(messages, 1), 1),
                "processes": len(now),
            }
        out["machine_busy_pct"] = round(100 * (busy - self._machine[0]) / max(total - self._machine[1], 1e-9), 1)
        return out


# --------------------------------------------------------------------------- store


class StoreReader:
    """Reads the gateway's SQLite store (gateway/store.py) read-only, while it writes."""

    #: Per-row times, best first: when the row was committed, else when it was received.
    TIME_COLUMNS = ("stored_ts", "commit_ts", "recv_ts")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._fast_count = False

    def _conn(self) -> sqlite3.Connection | None:
        if self._db is None:
            if not self.path.exists():
                return None
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "messages" not in tables:
                db.close()
                return None
            self._fast_count = "devices" in tables
            self._db = db
        return self._db

    def count(self) -> int:
        """Stored messages, cheaply (the devices table's `stored` counters), for progress."""
        db = self._conn()
        if db is None:
            return 0
        sql = "SELECT coalesce(sum(stored), 0) FROM devices" if self._fast_count else "SELECT max(rowid) FROM messages"
        return int(db.execute(sql).fetchone()[0] or 0)

    def totals(self, devices: Sequence[str]) -> tuple[int, int]:
        """(rows, distinct (device_id, seq)) for `devices`."""
        db = self._conn()
        if db is None:
            return 0, 0
        marks = ",".join("?" * len(devices))
        rows = db.execute(f"SELECT count(*) FROM messages WHERE device_id IN ({marks})", devices).fetchone()[0]
        distinct = db.execute(
            f"SELECT count(*) FROM (SELECT DISTINCT device_id, seq FROM messages WHERE device_id IN ({marks}))",
            devices,
        ).fetchone()[0]
        return int(rows), int(distinct)

    def time_column(self) -> str | None:
        db = self._conn()
        if db is None:
            return None
        cols = {r[1] for r in db.execute("PRAGMA table_info(messages)")}
        return next((c for c in self.TIME_COLUMNS if c in cols), None)

    def row_times(self, device: str) -> Iterator[tuple[int, float]]:
        """(seq, time in s) of each stored row of `device`, by the best time column."""
        db, column = self._conn(), self.time_column()
        if db is None or column is None:
            return
        for seq, ms in db.execute(f"SELECT seq, {column} FROM messages WHERE device_id = ?", (device,)):
            yield int(seq), ms / 1000.0

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


# --------------------------------------------------------------------------- workspace


@dataclass(frozen=True)
class Workspace:
    """A throw-away PKI with `devices` identities."""

    root: Path
    pki: Pki
    devices: tuple[str, ...]

    @classmethod
    def create(cls, root: Path, n_devices: int) -> Workspace:
        pki = Pki(root / "pki")
        pki.init()
        devices = tuple(f"bench-{i:03d}" for i in range(n_devices))
        for device in devices:
            pki.issue(Role.DEVICE, device)
        return cls(root, pki, devices)


# --------------------------------------------------------------------------- pre-signing


def telemetry_body(index: int, seq: int) -> dict[str, Any]:
    """A realistic 1 Hz GPS fix for device `index` at step `seq`: a slow loop around a
    point in London with a few metres of noise, plus battery and temperature."""
    angle = (seq / 600.0 + index) % (2 * math.pi)
    radius = 0.004 + 0.0005 * (index % 7)
    wobble = ((seq * 7919 + index * 104729) % 1000) / 1000.0 - 0.5
    return {
        "lat": round(51.5074 + radius * math.sin(angle) + wobble * 2e-5, 7),
        "lon": round(-0.1278 + radius * 1.6 * math.cos(angle) + wobble * 3e-5, 7),
        "acc": round(3.0 + abs(wobble) * 4, 1),
        "alt": round(24.0 + wobble * 3, 1),
        "speed": round(8.0 + wobble * 2, 2),
        "heading": round(math.degrees(angle + math.pi / 2) % 360, 1),
        "fix": "3d",
        "sensors": {"battery": 100 - (seq // 3600) % 80, "temperature": round(21.5 + wobble, 1)},
    }


_SIGNERS: dict[str, KeySigner] = {}


def _sign_chunk(task: tuple[str, str, int, int, int, int]) -> tuple[str, int, list[bytes]]:
    """Pool worker: sign `count` messages of one device starting at `first_seq`."""
    key_path, device, index, first_seq, count, ts0 = task
    signer = _SIGNERS.get(device)
    if signer is None:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        signer = _SIGNERS[device] = KeySigner(device, key)  # type: ignore[arg-type]
    out = []
    for seq in range(first_seq, first_seq + count):
        message = Message(device, seq, ts0 + seq, "telemetry", telemetry_body(index, seq))
        out.append(seal(message, signer))
    return device, first_seq, out


def presign(
    ws: Workspace,
    per_device: int,
    *,
    processes: int | None = None,
    log: Log | None = None,
    chunk: int = 2000,
) -> dict[str, list[bytes]]:
    """Sign seqs 1..`per_device` of every device, across `processes` (default: all cores).
    A message's `ts` is the signing time (ms) plus its seq, so it is unique and rising."""
    ts0 = int(time.time() * 1000)
    tasks = [
        (str(ws.pki.identity(device).key), device, index, first, min(chunk, per_device - first + 1), ts0)
        for index, device in enumerate(ws.devices)
        for first in range(1, per_device + 1, chunk)
    ]
    parts: dict[str, dict[int, list[bytes]]] = {d: {} for d in ws.devices}
    total, done, started, shown = per_device * len(ws.devices), 0, time.monotonic(), 0.0
    procs = processes or os.cpu_count() or 1
    with mp.get_context("fork").Pool(procs, initializer=_ignore_sigint) as pool:
        for device, first, signed in pool.imap_unordered(_sign_chunk, tasks):
            parts[device][first] = signed
            done += len(signed)
            now = time.monotonic()
            if log and (now - shown >= 1.0 or done == total):
                shown = now
                rate = done / max(now - started, 1e-9)
                log(f"  signed {done:,}/{total:,} ({rate:,.0f}/s)")
    return {d: [m for first in sorted(chunks) for m in chunks[first]] for d, chunks in parts.items()}


def _ignore_sigint() -> None:
    """Children leave Ctrl-C to the parent, which stops them by PID (SIGTERM)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# --------------------------------------------------------------------------- publisher


@dataclass(frozen=True)
class LinkSpec:
    """How the publisher and sink processes reach the broker."""

    pki_root: Path
    port: int
    host: str = "localhost"
    window: int = DEFAULT_WINDOW
    receipts: bool = False
    keepalive: int = 60
    #: Publishers buffer their TLS socket (see `_BufferedTls`).
    buffered: bool = True
    #: The raw sink's MQTT version, "5" or "3.1.1" (publishers always speak MQTT 5).
    sink_protocol: str = "5"


def _new_client(spec: LinkSpec, identity: str, client_id: str, userdata: Any, protocol: str = "5") -> mqtt.Client:
    pki = Pki(spec.pki_root)
    version = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=version, userdata=userdata)
    client.tls_set_context(client_context(pki, pki.require_identity(identity)))
    return client


def _connect(client: mqtt.Client, spec: LinkSpec) -> None:
    """Connect with a clean session (MQTT 5: clean start, no session expiry)."""
    if client.protocol == mqtt.MQTTv5:
        client.connect(spec.host, spec.port, keepalive=spec.keepalive, clean_start=True)
    else:
        client.connect(spec.host, spec.port, keepalive=spec.keepalive)


class _BufferedTls:
    """A publisher's TLS socket as paho sees it, with buffering on both sides.

    paho writes each packet with its own `send()` (one TLS record and one syscall per
    PUBLISH) and reads a packet's header byte by byte (three TLS reads per PUBACK). Here
    the packets paho writes in one loop iteration are collected and `flush()` sends them
    as one write (like TCP_CORK), and reads take whatever TLS has (up to 64 KiB) and
    serve paho's small reads from memory. The bytes on the wire are paho's."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._out = bytearray()
        self._in = b""
        self._pos = 0

    def send(self, data: bytes | bytearray) -> int:
        self._out += data
        return len(data)

    @property
    def corked(self) -> int:
        return len(self._out)

    def flush(self) -> None:
        """Write what is buffered, as far as the socket takes it now."""
        while self._out:
            try:
                n = self._sock.send(self._out)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                return
            del self._out[:n]

    def recv(self, size: int) -> bytes:
        if self._pos >= len(self._in):
            self._in, self._pos = self._sock.recv(65536), 0  # raises when nothing is there
            if not self._in:
                return b""
        chunk = self._in[self._pos : self._pos + size]
        self._pos += len(chunk)
        return chunk

    def pending(self) -> int:
        return len(self._in) - self._pos + int(self._sock.pending())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _Link:
    """One device's connection, its stock of pre-signed messages and what became of them."""

    def __init__(self, device: str, messages: list[bytes], spec: LinkSpec, registry: KeyRegistry | None) -> None:
        self.device = device
        self.topic = str(Topic.up(device, "telemetry"))
        self.messages = messages
        self.n = len(messages)
        self.window = spec.window
        self.registry = registry
        self.next = 0
        self.inflight = 0
        self.acked = 0
        self.failed = 0
        self.connected = False
        self.subscribed = registry is None
        self.error = ""
        self.sent = array.array("d", bytes(8 * (self.n + 1)))
        self.confirmed_at = array.array("d", bytes(8 * (self.n + 1)))
        self.confirmed = 0
        self.low = 0
        self.phantom = 0
        self.bad_receipts = 0
        self.error_sample = ""
        self.client = _new_client(spec, device, device, self)
        self.client.max_inflight_messages_set(max(spec.window, 20))
        self.client.on_connect = _on_connect
        self.client.on_publish = _on_publish
        self.client.on_subscribe = _on_subscribe
        self.client.on_message = _on_receipt
        self.sock: Any = None

    def connect(self, spec: LinkSpec) -> None:
        _connect(self.client, spec)
        self.sock = self.client.socket()
        if spec.buffered:
            self.sock = self.client._sock = _BufferedTls(self.sock)

    @property
    def corked(self) -> int:
        return self.sock.corked if isinstance(self.sock, _BufferedTls) else 0

    @property
    def can_publish(self) -> bool:
        return self.inflight < self.window and self.next < self.n

    def publish(self) -> None:
        i = self.next
        self.client.publish(self.topic, self.messages[i], qos=1)
        self.sent[i + 1] = time.time()
        self.next = i + 1
        self.inflight += 1

    def fill(self) -> int:
        """Publish until the window is full; returns how many."""
        n = 0
        while self.inflight < self.window and self.next < self.n:
            self.publish()
            n += 1
        return n

    def read(self) -> None:
        rc = self.client.loop_read()
        while rc == mqtt.MQTT_ERR_SUCCESS and self.sock.pending():
            rc = self.client.loop_read()
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise BenchError(f"{self.device}: connection lost ({mqtt.error_string(rc)})")

    def confirm(self, ranges: Iterable[tuple[int, int]], now: float) -> None:
        for lo, hi in ranges:
            if hi > self.next:
                self.phantom += hi - max(lo, self.next + 1) + 1
            for seq in range(max(lo, self.low + 1), min(hi, self.next) + 1):
                if self.confirmed_at[seq] == 0.0:
                    self.confirmed_at[seq] = now
                    self.confirmed += 1
        while self.low < self.next and self.confirmed_at[self.low + 1] != 0.0:
            self.low += 1

    def result(self) -> dict[str, Any]:
        return {
            "published": self.next,
            "acked": self.acked,
            "failed": self.failed,
            "confirmed": self.confirmed,
            "phantom": self.phantom,
            "bad_receipts": self.bad_receipts,
            "bad_receipt_sample": self.error_sample,
            "sent": self.sent[: self.next + 1].tobytes(),
            "confirmed_at": self.confirmed_at[: self.next + 1].tobytes(),
        }


def _on_connect(client: mqtt.Client, link: _Link, flags: Any, rc: Any, props: Any = None) -> None:
    if rc.is_failure:
        link.error = f"{link.device}: CONNACK {rc}"
        return
    link.connected = True
    if link.registry is not None:
        client.subscribe(down_filter(link.device), qos=1)


def _on_subscribe(client: mqtt.Client, link: _Link, mid: int, rcs: Any, props: Any = None) -> None:
    if any(rc.is_failure for rc in rcs):
        link.error = f"{link.device}: SUBACK {rcs}"
    link.subscribed = True


def _on_publish(client: mqtt.Client, link: _Link, mid: int, rc: Any, props: Any = None) -> None:
    link.inflight -= 1
    link.acked += 1
    if rc.is_failure:
        link.failed += 1


def _on_receipt(client: mqtt.Client, link: _Link, msg: mqtt.MQTTMessage) -> None:
    now = time.time()
    assert link.registry is not None
    try:
        message = verify_downlink(msg.topic, bytes(msg.payload), link.device, link.registry)
        if message.body.get("type") != "receipt":
            return
        ranges = parse_ranges(message.body.get("ranges"))
    except Rejected as exc:
        link.bad_receipts += 1
        if not link.error_sample:
            link.error_sample = str(exc)
        return
    link.confirm(ranges, now)


class _Worker:
    """The body of a publisher process: a selector over its links and the parent's pipe."""

    def __init__(self, conn: Connection, links: list[_Link]) -> None:
        self.conn = conn
        self.links = links
        self.sel = selectors.DefaultSelector()
        self.inbox: deque[tuple[str, Any]] = deque()
        self.last_misc = time.monotonic()

    def pump(self, timeout: float) -> None:
        """Read what arrived (waiting up to `timeout`), then write what is queued."""
        if any(lk.corked for lk in self.links):
            timeout = 0.0
        for key, _ in self.sel.select(timeout):
            if key.data is None:
                while self.conn.poll():
                    self.inbox.append(self.conn.recv())
            else:
                key.data.read()
        self.write()

    def write(self) -> None:
        for link in self.links:
            if link.client.want_write():
                link.client.loop_write()
            if link.corked:
                link.sock.flush()
        now = time.monotonic()
        if now - self.last_misc >= 1.0:
            self.last_misc = now
            for link in self.links:
                link.client.loop_misc()
        for link in self.links:
            if link.error:
                raise BenchError(link.error)

    def until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise BenchError(f"timed out after {timeout}s waiting for {what}")
            self.pump(0.05)

    def command(self) -> tuple[str, Any]:
        while not self.inbox:
            self.pump(0.2)
        return self.inbox.popleft()

    def connect(self, spec: LinkSpec) -> None:
        self.sel.register(self.conn, selectors.EVENT_READ, None)
        for link in self.links:
            link.connect(spec)
            self.sel.register(link.sock, selectors.EVENT_READ, link)
        self.until(lambda: all(lk.connected and lk.subscribed for lk in self.links), 20, "CONNACK/SUBACK")

    def all_acked(self) -> bool:
        return all(lk.inflight == 0 for lk in self.links)

    def run(self, duration: float, rate: float) -> dict[str, Any]:
        """Publish for `duration` s at `rate` msg/s (0: as fast as the windows allow)."""
        links = self.links
        t_go = time.time()
        start = time.monotonic()
        end = start + duration
        sent = 0
        max_backlog = 0
        rr = 0
        shown = start
        while True:
            now = time.monotonic()
            if now >= end or not any(lk.next < lk.n for lk in links):
                break
            if rate <= 0:
                for link in links:
                    sent += link.fill()
                self.pump(0.05)  # wakes on the first PUBACK that opens a window
            else:
                # Open loop in ticks: read the PUBACKs (and receipts) that came in since
                # the last tick, publish what is due by now, write, sleep to the next tick.
                self.pump(0.0)
                due = int(rate * (now - start)) - sent
                blocked = 0
                while due > 0 and blocked < len(links):
                    link = links[rr % len(links)]
                    rr += 1
                    if link.can_publish:
                        link.publish()
                        sent += 1
                        due -= 1
                        blocked = 0
                    else:
                        blocked += 1
                max_backlog = max(max_backlog, due)
                self.write()
                time.sleep(max(0.0, now + TICK_S - time.monotonic()))
            if now - shown >= 0.5:
                shown = now
                self.conn.send(("progress", sum(lk.next for lk in links)))
        t_stop = time.time()
        self.until(self.all_acked, DRAIN_TIMEOUT_S, "PUBACKs")
        return {
            "t_go": t_go,
            "t_stop": t_stop,
            "max_backlog": max_backlog,
        }


def _publisher_main(conn: Connection, spec: LinkSpec, devices: list[str], stock: Mapping[str, list[bytes]]) -> None:
    """A publisher process. It connects its devices and says "ready"; then the parent
    sends "warmup" (seq 1 of each device), "go" (the timed run), "status" (receipts so
    far) and "stop", which it answers with "result"."""
    _ignore_sigint()
    try:
        registry = KeyRegistry(Pki(spec.pki_root)) if spec.receipts else None
        worker = _Worker(conn, [_Link(d, stock[d], spec, registry) for d in devices])
        worker.connect(spec)
        conn.send(("ready", None))
        run: dict[str, Any] = {}
        while True:
            cmd, arg = worker.command()
            if cmd == "warmup":
                for link in worker.links:
                    link.publish()
                worker.until(worker.all_acked, 20, "warm-up PUBACKs")
                conn.send(("warm", None))
            elif cmd == "go":
                run = worker.run(arg["duration"], arg["rate"])
                conn.send(("published", {"published": sum(lk.next for lk in worker.links), **run}))
            elif cmd == "status":
                conn.send(("status", {"confirmed": sum(lk.confirmed for lk in worker.links)}))
            elif cmd == "stop":
                break
        result = {"run": run, "devices": {lk.device: lk.result() for lk in worker.links}}
        for link in worker.links:
            link.client.disconnect()
            with contextlib.suppress(OSError):
                link.client.loop_write()
                if link.corked:
                    link.sock.flush()
        conn.send(("result", result))
    except (BenchError, OSError, ValueError) as exc:
        conn.send(("error", f"publisher: {exc}"))


# --------------------------------------------------------------------------- raw sink


class _Sink:
    def __init__(self) -> None:
        self.count = 0
        self.arrivals: dict[str, array.array[float]] = {}
        self.subscribed = False
        self.error = ""


def _sink_on_connect(client: mqtt.Client, sink: _Sink, flags: Any, rc: Any, props: Any = None) -> None:
    if rc.is_failure:
        sink.error = f"sink: CONNACK {rc}"
    else:
        client.subscribe(UP_FILTER, qos=1)


def _sink_on_subscribe(client: mqtt.Client, sink: _Sink, mid: int, rcs: Any, props: Any = None) -> None:
    if any(rc.is_failure for rc in rcs):
        sink.error = f"sink: SUBACK {rcs}"
    sink.subscribed = True


def _sink_on_message(client: mqtt.Client, sink: _Sink, msg: mqtt.MQTTMessage) -> None:
    now = time.time()
    device = msg.topic.split("/", 3)[2]
    times = sink.arrivals.get(device)
    if times is None:
        times = sink.arrivals[device] = array.array("d")
    times.append(now)
    sink.count += 1


def _sink_main(conn: Connection, spec: LinkSpec) -> None:
    """The raw path's subscriber: the gateway's identity, no verification, only counts.
    Per device, the k-th arrival is seq k+1 (one connection each way keeps MQTT's order)."""
    _ignore_sigint()
    try:
        sink = _Sink()
        client = _new_client(spec, DEFAULT_GATEWAY_ID, "bench-raw-sink", sink, spec.sink_protocol)
        client.on_connect = _sink_on_connect
        client.on_subscribe = _sink_on_subscribe
        client.on_message = _sink_on_message
        _connect(client, spec)
        sock: Any = client.socket()
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ, client)
        sel.register(conn, selectors.EVENT_READ, None)
        ready_sent = False
        last_report = last_misc = time.monotonic()
        while True:
            stop = False
            for key, _ in sel.select(0.25):
                if key.data is None:
                    while conn.poll():
                        stop = stop or conn.recv()[0] == "stop"
                else:
                    rc = client.loop_read()
                    while rc == mqtt.MQTT_ERR_SUCCESS and sock.pending():
                        rc = client.loop_read()
                    if rc != mqtt.MQTT_ERR_SUCCESS:
                        raise BenchError(f"sink: connection lost ({mqtt.error_string(rc)})")
            if client.want_write():
                client.loop_write()
            if sink.error:
                raise BenchError(sink.error)
            if stop:
                break
            now = time.monotonic()
            if sink.subscribed and not ready_sent:
                conn.send(("ready", None))
                ready_sent = True
            if now - last_report >= 0.2:
                last_report = now
                conn.send(("count", sink.count))
            if now - last_misc >= 1.0:
                last_misc = now
                client.loop_misc()
        client.disconnect()
        with contextlib.suppress(OSError):
            client.loop_write()
        conn.send(("result", {"count": sink.count, "arrivals": {d: a.tobytes() for d, a in sink.arrivals.items()}}))
    except (BenchError, OSError, ValueError) as exc:
        conn.send(("error", str(exc)))


# --------------------------------------------------------------------------- parent side


class _Child:
    """A forked worker process and the parent's end of its pipe."""

    def __init__(self, name: str, target: Callable[..., None], *args: Any) -> None:
        self.name = name
        self.conn, child_conn = mp.Pipe()
        self.proc = mp.get_context("fork").Process(target=target, args=(child_conn, *args), name=name, daemon=True)
        self.proc.start()
        child_conn.close()
        self.latest: dict[str, Any] = {}

    def expect(self, kind: str, timeout: float) -> Any:
        """The next message of `kind`, keeping the latest of every other kind."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: no {kind!r} within {timeout}s")
            if not self.conn.poll(min(left, 0.5)):
                if not self.proc.is_alive():
                    raise BenchError(f"{self.name} died (exit code {self.proc.exitcode})")
                continue
            got, arg = self.recv()
            if got == kind:
                return arg

    def recv(self) -> tuple[str, Any]:
        try:
            got, arg = self.conn.recv()
        except EOFError:
            raise BenchError(f"{self.name} died (exit code {self.proc.exitcode})") from None
        if got == "error":
            raise BenchError(f"{self.name}: {arg}")
        self.latest[got] = arg
        return got, arg

    def drain(self) -> None:
        while self.conn.poll():
            self.recv()

    def send(self, kind: str, arg: Any = None) -> None:
        self.conn.send((kind, arg))

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
        self.conn.close()


@contextlib.contextmanager
def _children() -> Iterator[list[_Child]]:
    kids: list[_Child] = []
    try:
        yield kids
    finally:
        for kid in kids:
            kid.stop()


def _split(devices: Sequence[str], parts: int) -> list[list[str]]:
    parts = max(1, min(parts, len(devices)))
    return [list(devices[i::parts]) for i in range(parts)]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted `values` (q in 0..1)."""
    if not values:
        return math.nan
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def _latency(samples: list[float]) -> dict[str, Any]:
    samples.sort()
    return {
        "latency_p50_ms": round(percentile(samples, 0.50) * 1000, 1) if samples else None,
        "latency_p99_ms": round(percentile(samples, 0.99) * 1000, 1) if samples else None,
        "latency_max_ms": round(samples[-1] * 1000, 1) if samples else None,
        "latency_samples": len(samples),
    }


def gateway_mqtt_protocol() -> str:
    """The MQTT version the gateway ingests with by default, so that the raw baseline's
    subscriber speaks the same ("5" if the gateway does not say)."""
    try:
        from gateway.settings import GatewaySettings  # noqa: PLC0415 - optional: gateway extras
    except ImportError:
        return "5"
    for f in dataclasses.fields(GatewaySettings):
        if f.name == "mqtt_protocol" and f.default in ("5", "3.1.1"):
            return str(f.default)
    return "5"


@dataclass(frozen=True)
class RunConfig:
    """One run: how long, how fast, how many publisher processes."""

    duration: float = 20.0
    rate: float = 0.0
    window: int = DEFAULT_WINDOW
    publishers: int = 1
    drain_timeout: float = DRAIN_TIMEOUT_S
    sink_protocol: str = "5"


class _Publishers:
    """The publisher processes of one run, driven in lock-step."""

    def __init__(self, kids: list[_Child], spec: LinkSpec, ws: Workspace, stock: Mapping[str, list[bytes]], n: int):
        self.kids = [
            _Child(f"publisher-{i}", _publisher_main, spec, devices, stock)
            for i, devices in enumerate(_split(ws.devices, n))
        ]
        kids.extend(self.kids)

    def each(self, kind: str, timeout: float) -> list[Any]:
        return [kid.expect(kind, timeout) for kid in self.kids]

    def send(self, kind: str, arg: Any = None) -> None:
        for kid in self.kids:
            kid.send(kind, arg)

    def progress(self) -> int:
        for kid in self.kids:
            kid.drain()
        return sum(int(kid.latest.get("progress", 0)) for kid in self.kids)


class _Progress:
    """At most one progress line a second, timed from the start of the run."""

    def __init__(self, label: str, log: Log) -> None:
        self.label = label
        self.log = log
        self.start = self.last = time.monotonic()

    def line(self, published: int, delivered: int) -> None:
        now = time.monotonic()
        if now - self.last >= 1.0:
            self.last = now
            self.log(f"  [{self.label}] {now - self.start:5.1f}s  published {published:>9,}  delivered {delivered:>9,}")


def _go(
    pubs: _Publishers,
    cfg: RunConfig,
    delivered: Callable[[], int],
    progress: _Progress,
    *,
    also: Sequence[_Child] = (),
) -> list[Any]:
    """Start the timed phase; print progress until every publisher has published.
    `also`: other children that work meanwhile (their errors and deaths stop the run;
    their messages are kept in `latest`)."""
    rate = cfg.rate / len(pubs.kids) if cfg.rate else 0.0
    pubs.send("go", {"duration": cfg.duration, "rate": rate})
    done: list[Any] = [None] * len(pubs.kids)
    while any(d is None for d in done):
        ready = wait_connections([k.conn for k in (*pubs.kids, *also)], timeout=1.0)
        for i, kid in enumerate(pubs.kids):
            if kid.conn in ready:
                kid.drain()
                if "published" in kid.latest and done[i] is None:
                    done[i] = kid.latest["published"]
            elif not kid.proc.is_alive():
                raise BenchError(f"{kid.name} died (exit code {kid.proc.exitcode})")
        for kid in also:
            if kid.conn in ready:
                kid.drain()
            elif not kid.proc.is_alive():
                raise BenchError(f"{kid.name} died (exit code {kid.proc.exitcode})")
        progress.line(pubs.progress(), delivered())
    return done


def _wait_delivered(
    delivered: Callable[[], int], target: int, timeout: float, progress: _Progress, what: str = "delivered"
) -> float:
    """Wait until `delivered()` reaches `target`, or stops rising for `timeout` s;
    returns the time (time.time()) it was last seen rising."""
    last_value, last_change = -1, time.time()
    while True:
        value = delivered()
        if value != last_value:
            last_value, last_change = value, time.time()
        if value >= target:
            return last_change
        if time.time() - last_change > timeout:
            progress.log(f"  [{progress.label}] {what} stalled at {value:,} of {target:,} for {timeout:.0f}s")
            return last_change
        progress.line(target, value)
        time.sleep(0.02)


def _warm_up(delivered: Callable[[], int], devices: int, progress: _Progress) -> None:
    """Seq 1 of every device must arrive before the timed run starts."""
    _wait_delivered(delivered, devices, 20, progress)
    if delivered() < devices:
        raise BenchError(f"warm-up: {delivered()} of {devices} first messages delivered within 20 s")


def _summarise(
    results: list[dict[str, Any]], published_msgs: list[dict[str, Any]]
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    devices: dict[str, dict[str, Any]] = {}
    for result in results:
        devices.update(result["devices"])
    run = {
        "t_go": min(p["t_go"] for p in published_msgs),
        "t_stop": max(p["t_stop"] for p in published_msgs),
        "max_backlog": sum(p["max_backlog"] for p in published_msgs),
    }
    return devices, run


def _rates(delivered_timed: int, timed_published: int, run: dict[str, Any], t_last: float) -> dict[str, float]:
    seconds = max(t_last - run["t_go"], 1e-9)
    pub_seconds = max(run["t_stop"] - run["t_go"], 1e-9)
    return {
        "seconds": round(seconds, 2),
        "msgs_per_s": round(delivered_timed / seconds, 1),
        "publish_rate": round(timed_published / pub_seconds, 1),
    }


def background_load(log: Log, seconds: float = 1.0) -> float:
    """How busy the machine is before a run (% of all cores); warns past 10%."""
    busy0, total0 = CpuMeter.machine_seconds()
    time.sleep(seconds)
    busy1, total1 = CpuMeter.machine_seconds()
    pct = round(100 * (busy1 - busy0) / max(total1 - total0, 1e-9), 1)
    if pct > 10:
        log(f"  warning: the machine is already {pct:.0f}% busy before the run; the figures will be low")
    return pct


def _meter(pubs: _Publishers, broker: MosquittoRunner, **sinks: list[int | None]) -> CpuMeter:
    pids: dict[str, list[int | None]] = {
        "publishers": [k.proc.pid for k in pubs.kids],
        "broker": [broker.proc.pid if broker.proc else None],
        **sinks,
        "harness": [os.getpid()],
    }
    meter = CpuMeter(pids)
    meter.start()
    return meter


def run_raw(ws: Workspace, stock: Mapping[str, list[bytes]], cfg: RunConfig, log: Log) -> dict[str, Any]:
    """paho publishers -> Mosquitto mTLS -> one counting paho subscriber."""
    background = background_load(log)
    with MosquittoRunner(ws.pki, ws.root / "broker-raw") as broker, _children() as kids:
        spec = LinkSpec(ws.pki.root, broker.port, window=cfg.window, sink_protocol=cfg.sink_protocol)
        sink = _Child("raw-sink", _sink_main, spec)
        kids.append(sink)
        sink.expect("ready", 20)
        pubs = _Publishers(kids, spec, ws, stock, cfg.publishers)
        pubs.each("ready", 30)

        def delivered() -> int:
            sink.drain()
            return int(sink.latest.get("count", 0))

        pubs.send("warmup")
        pubs.each("warm", 30)
        _warm_up(delivered, len(ws.devices), _Progress("raw warm-up", log))
        meter = _meter(pubs, broker, sink=[sink.proc.pid])
        progress = _Progress("raw", log)
        published_msgs = _go(pubs, cfg, delivered, progress)
        published = sum(p["published"] for p in published_msgs)
        _wait_delivered(delivered, published, cfg.drain_timeout, progress)
        cpu = meter.stop(published - len(ws.devices))
        pubs.send("stop")
        results = pubs.each("result", 30)
        sink.send("stop")
        sunk = sink.expect("result", 30)
    devices, run = _summarise(results, published_msgs)
    samples: list[float] = []
    t_last = run["t_go"]
    for device, info in devices.items():
        sent = _doubles(info["sent"])
        arrived = _doubles(sunk["arrivals"].get(device, b""))
        for k, t in enumerate(arrived):
            seq = k + 1
            if 1 < seq < len(sent):
                samples.append(t - sent[seq])
        if arrived:
            t_last = max(t_last, arrived[-1])
    n_dev = len(ws.devices)
    return {
        "published": published,
        "acked": sum(d["acked"] for d in devices.values()),
        "failed": sum(d["failed"] for d in devices.values()),
        "delivered": sunk["count"],
        "lost": max(0, published - sunk["count"]),
        "duplicates": max(0, sunk["count"] - published),
        **_rates(sunk["count"] - n_dev, published - n_dev, run, t_last),
        **_latency(samples),
        "max_backlog": run["max_backlog"],
        "cpu": cpu,
        "background_pct": background,
    }


def run_real(
    ws: Workspace,
    stock: Mapping[str, list[bytes]],
    cfg: RunConfig,
    log: Log,
    *,
    on_gateway: Callable[[GatewayRunner], None] | None = None,
) -> dict[str, Any]:
    """The same publishers -> Mosquitto mTLS -> the real gateway, confirmed by its
    signed receipts and by its SQLite store."""
    background = background_load(log)
    with (
        MosquittoRunner(ws.pki, ws.root / "broker-real") as broker,
        GatewayRunner(ws.pki, broker.port, ws.root / "gateway") as gateway,
        _children() as kids,
    ):
        log(f"  gateway running (pid {gateway.pid}, log {gateway.log_path})")
        if on_gateway:
            on_gateway(gateway)
        store = StoreReader(gateway.db_path)
        spec = LinkSpec(ws.pki.root, broker.port, window=cfg.window, receipts=True)
        pubs = _Publishers(kids, spec, ws, stock, cfg.publishers)
        pubs.each("ready", 30)

        last_poll = [0.0, 0]

        def delivered() -> int:
            now = time.monotonic()
            if now - last_poll[0] >= 0.05:
                last_poll[0], last_poll[1] = now, store.count()
            return int(last_poll[1])

        pubs.send("warmup")
        pubs.each("warm", 30)
        _warm_up(delivered, len(ws.devices), _Progress("real warm-up", log))
        meter = _meter(pubs, broker, gateway=[gateway.pid])
        progress = _Progress("real", log)
        published_msgs = _go(pubs, cfg, delivered, progress)
        figures = finish_real(ws, pubs, published_msgs, store, gateway, delivered, meter, cfg.drain_timeout, progress)
    return {**figures, "background_pct": background}


def finish_real(
    ws: Workspace,
    pubs: _Publishers,
    published_msgs: list[dict[str, Any]],
    store: StoreReader,
    gateway: GatewayRunner,
    delivered: Callable[[], int],
    meter: CpuMeter,
    drain_timeout: float,
    progress: _Progress,
) -> dict[str, Any]:
    """After the publishers have published: wait until the gateway stored everything
    (or stalled), stop the meter, collect the receipts and the publishers' results, and
    count what the store and the gateway's API say (the real run's figures, RUN_KEYS and
    REAL_KEYS but `background_pct`). The publishers are told to stop."""
    log = progress.log
    published = sum(p["published"] for p in published_msgs)
    t_store_done = _wait_delivered(delivered, published, drain_timeout, progress, "stored")
    cpu = meter.stop(published - len(ws.devices))

    def confirmed() -> int:
        pubs.send("status")
        return sum(s["confirmed"] for s in pubs.each("status", 10))

    _wait_delivered(confirmed, published, 5.0, progress, "confirmed by receipts")
    pubs.send("stop")
    results = pubs.each("result", 30)
    devices, run = _summarise(results, published_msgs)
    sent = {d: _doubles(info["sent"]) for d, info in devices.items()}
    rows, distinct = store.totals(ws.devices)
    time_column = store.time_column()
    store_samples = [t - sent[d][seq] for d in ws.devices for seq, t in store.row_times(d) if 1 < seq < len(sent[d])]
    store.close()
    try:
        stats = gateway.get("/api/v1/stats")
        device_rows = gateway.get("/api/v1/devices")
    except (OSError, http.client.HTTPException, BenchError) as exc:
        log(f"  could not read the gateway's API: {exc}")
        stats, device_rows = {}, []
    receipt_samples: list[float] = []
    for d, info in devices.items():
        confirmed_at = _doubles(info["confirmed_at"])
        receipt_samples += [confirmed_at[q] - sent[d][q] for q in range(2, len(confirmed_at)) if confirmed_at[q]]
    confirmed_n = sum(info["confirmed"] for info in devices.values())
    ours = set(ws.devices)
    missing = sum(r.get("missing_count", len(r.get("missing") or [])) for r in device_rows if r.get("id") in ours)
    n_dev = len(ws.devices)
    store_latency = {k.replace("latency", "store_latency"): v for k, v in _latency(store_samples).items()}
    return {
        "published": published,
        "acked": sum(d["acked"] for d in devices.values()),
        "failed": sum(d["failed"] for d in devices.values()),
        "delivered": distinct,
        "stored_rows": rows,
        "distinct": distinct,
        "lost": max(0, published - distinct),
        "duplicates": rows - distinct,
        "missing": missing,
        "receipts_confirmed": confirmed_n,
        "phantom_receipts": sum(d["phantom"] for d in devices.values()),
        "bad_receipts": sum(d["bad_receipts"] for d in devices.values()),
        "bad_receipt_sample": next((d["bad_receipt_sample"] for d in devices.values() if d["bad_receipt_sample"]), ""),
        **_rates(distinct - n_dev, published - n_dev, run, t_store_done),
        **_latency(receipt_samples),
        **store_latency,
        "store_latency_column": time_column,
        "max_backlog": run["max_backlog"],
        "cpu": cpu,
        "gateway_live": stats.get("ingest"),
        "accepted": stats.get("accepted"),
        "rejected": {k: v for k, v in (stats.get("rejected") or {}).items() if v},
        "skewed": stats.get("skewed"),
        "gaps": stats.get("gaps"),
    }


def _doubles(data: bytes) -> array.array[float]:
    out = array.array("d")
    out.frombytes(data)
    return out


@dataclass(frozen=True)
class BenchConfig:
    """What `bench/ingest` was asked to do."""

    devices: int = 8
    duration: float = 20.0
    rate: float = 0.0
    window: int = DEFAULT_WINDOW
    publishers: int = 1
    raw: bool = True
    real: bool = True
    presign_processes: int | None = None
    drain_timeout: float = DRAIN_TIMEOUT_S
    #: The raw sink's MQTT version; None: the gateway's (see `gateway_mqtt_protocol`).
    sink_protocol: str | None = None

    def per_device(self) -> int:
        """Pre-signed messages per device: the run's need plus the warm-up message."""
        rate = self.rate or MAX_RATE_ESTIMATE
        return math.ceil(rate * self.duration * 1.02 / self.devices) + 1


def run_bench(cfg: BenchConfig, root: Path, log: Log = print) -> dict[str, Any]:
    """Everything `bench/ingest` does, in `root` (a fresh directory); returns the figures."""
    sink_protocol = cfg.sink_protocol or gateway_mqtt_protocol()
    figures: dict[str, Any] = {
        "machine": machine_info(),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config": {
            "devices": cfg.devices,
            "duration_s": cfg.duration,
            "rate": cfg.rate,
            "window": cfg.window,
            "publishers": cfg.publishers,
            "presigned": cfg.per_device() * cfg.devices,
            "sink_mqtt": sink_protocol,
        },
        "raw": None,
        "real": None,
        "ratio": None,
        "zero_loss": None,
    }
    log(f"creating a PKI with {cfg.devices} device identities in {root}")
    ws = Workspace.create(root, cfg.devices)
    log(f"pre-signing {cfg.per_device() * cfg.devices:,} telemetry messages (ES256)")
    stock = presign(ws, cfg.per_device(), processes=cfg.presign_processes, log=log)
    sizes = [len(m) for msgs in stock.values() for m in msgs[:100]]
    figures["config"]["envelope_bytes"] = round(sum(sizes) / len(sizes))
    run_cfg = RunConfig(cfg.duration, cfg.rate, cfg.window, cfg.publishers, cfg.drain_timeout, sink_protocol)
    if cfg.raw:
        log(f"raw baseline: paho -> Mosquitto mTLS -> paho subscriber (MQTT {sink_protocol}, QoS 1, counts only)")
        figures["raw"] = run_raw(ws, stock, run_cfg, log)
    if cfg.real:
        log("real path: the same publishers -> Mosquitto mTLS -> bluelight gateway (verify + store)")
        figures["real"] = real = run_real(ws, stock, run_cfg, log)
        figures["zero_loss"] = (
            real["distinct"] == real["published"] and real["duplicates"] == 0 and real["missing"] == 0
        )
    if figures["raw"] and figures["real"] and figures["raw"]["msgs_per_s"]:
        figures["ratio"] = round(figures["real"]["msgs_per_s"] / figures["raw"]["msgs_per_s"], 3)
    return figures
