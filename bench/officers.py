"""The dispatch benchmark's officers and harness (the command is `bench/dispatch`).

While D background devices publish pre-signed telemetry at a fixed rate through
loadgen's publishers (which also read their signed receipts), one forked process runs
the officers: O identities on their own MQTT 5 connections (aiomqtt, QoS 1, mutual TLS),
placed at points on the streets of the built-in city (the gateway gets the same city as
its `--map` and a registry listing the officers). Each reports its position every
second, subscribes to its `down/#`, verifies every downlink against the gateway's
certificate (`verify_downlink`) and answers each alert `received` then `accepted`, which
commits it (the gateway's unit state).

Every `spacing_s` one officer (seeded random choice) publishes a signed panic `event`
at its position. Per incident the bench records the time from that publish call to the
first and to the last of its alerts arriving, verified, at any officer (one clock: all
officers live in one process). An operator identity closes each incident `hold_s`
after its panic through the API (`POST /incidents/{id}/close`), which cancels its
alerts and makes the committed units available again, so that the same officers can be
chosen again and a subject can raise a new panic (an open incident of the same subject
would absorb it).

Choice check, per incident: the subject is never alerted; the number of alerts is what
the policy asks for; and the alerted units are the ones `gateway.core.decide.recommend`
picks under the same policy and street map from the officers' reported positions and the
states the bench knows it caused. That last check is only made when the states were
settled at the panic: every acceptance already receipted by the gateway (so applied) and
every earlier incident's alerts in. The gateway's own recorded recommendation
(`GET /incidents`) is compared too, and its clock splits each latency: panic publish ->
incident opened (broker, batch, verify, commit), opened -> alert sealed (decision, send
queue), sealed -> arrival (publish, broker, the officer's verify).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import http.client
import math
import os
import random
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import orjson
import yaml
from cryptography.hazmat.primitives import serialization

from bench.loadgen import (
    DEFAULT_WINDOW,
    REPO_ROOT,
    BenchError,
    GatewayRunner,
    LinkSpec,
    Log,
    MosquittoRunner,
    RunConfig,
    StoreReader,
    Workspace,
    _Child,
    _children,
    _go,
    _ignore_sigint,
    _meter,
    _Progress,
    _Publishers,
    _warm_up,
    background_load,
    finish_real,
    machine_info,
    percentile,
    presign,
)
from certs.pki import Pki
from certs.registry import KeyRegistry
from certs.tls import client_context
from edge_agent.link import verify_downlink
from edge_agent.wire.envelope import KeySigner, Message, seal
from edge_agent.wire.errors import Rejected
from edge_agent.wire.ids import Role
from edge_agent.wire.model import parse_ranges
from edge_agent.wire.topics import Topic, down_filter
from firmware_sim.city import City
from gateway.core.decide import IncidentView, UnitView, recommend
from gateway.core.policy import load_policy
from gateway.core.streets import StreetEta, StreetGraph

MAP_PATH = REPO_ROOT / "firmware_sim" / "data" / "city.geojson"
POLICY_PATH = REPO_ROOT / "gateway" / "policy" / "default.yaml"
OPERATOR_ID = "bench-operator"
#: Issue 4's target: event -> alert p99 under this with 2,000 devices at 1 Hz.
TARGET_P99_MS = 250.0
#: Figures `run_dispatch` returns (`bench/dispatch --json` prints them).
FIGURE_KEYS = frozenset(
    {"machine", "started", "config", "load", "latency", "choice", "incidents", "background", "cpu", "target"}
)
LATENCY_KEYS = frozenset({"first", "all", "received", "stored", "opened", "sealed", "delivery"})
#: Incident counts in the figures' `choice`.
CHOICE_COUNTS = (
    "incidents", "with_alerts", "subject_alerted", "count_right", "count_wrong", "settled", "matched_policy",
    "mismatched_policy", "matched_gateway", "mismatched_gateway", "duplicate_alerts", "mapping_disagreed",
    "merged",
)  # fmt: skip


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class OfficerSpec:
    id: str
    lat: float
    lon: float
    supervisor: bool = False


@dataclass(frozen=True)
class DispatchConfig:
    """What `bench/dispatch` was asked to do."""

    devices: int = 2000
    rate_hz: float = 1.0
    officers: int = 20
    supervisors: int = 4
    incidents: int = 60
    spacing_s: float = 3.0
    #: Background load before the first panic (seconds).
    settle_s: float = 5.0
    #: A panic's incident is closed this long after it (default 1.5 x spacing, so that
    #: closes land between two panics).
    hold_s: float | None = None
    #: Wait this long after the last panic for late alerts.
    tail_s: float = 5.0
    #: Seconds of background load; None: as long as the incidents need.
    duration: float | None = None
    publishers: int = 1
    window: int = DEFAULT_WINDOW
    seed: int = 1
    drain_timeout: float = 20.0

    @property
    def hold(self) -> float:
        return self.hold_s if self.hold_s is not None else 1.5 * self.spacing_s

    def timeline_s(self) -> float:
        """Seconds from "go" until the officers are done."""
        last = self.settle_s + (self.incidents - 1) * self.spacing_s
        return last + max(self.hold, self.tail_s) + 1.0

    def background_s(self) -> float:
        need = self.timeline_s() + 2.0
        if self.duration is not None and self.duration < need:
            raise BenchError(f"--duration {self.duration:g} s is shorter than the {need:g} s the incidents need")
        return self.duration if self.duration is not None else need

    @property
    def total_rate(self) -> float:
        return self.devices * self.rate_hz


def place_officers(n: int, supervisors: int, seed: int) -> list[OfficerSpec]:
    """`n` officers at random points on the built-in city's streets; the first
    `supervisors` are supervisors."""
    rng = random.Random(seed)
    city = City.builtin()
    out = []
    for i in range(n):
        lat, lon = city.random_point_on_street(rng)
        out.append(OfficerSpec(f"officer-{i:02d}", round(lat, 7), round(lon, 7), supervisor=i < supervisors))
    return out


def registry_data(officers: Sequence[OfficerSpec]) -> dict[str, Any]:
    return {
        "units": [
            {"id": o.id, "kind": "officer", "callsign": o.id.replace("officer-", "O"), "capabilities": [],
             "supervisor": o.supervisor}
            for o in officers
        ]
    }  # fmt: skip


# --------------------------------------------------------------------------- officer process


@dataclass(frozen=True)
class FleetSpec:
    pki_root: Path
    broker_port: int
    api_port: int
    officers: tuple[OfficerSpec, ...]
    cfg: DispatchConfig
    host: str = "localhost"


@dataclass
class AlertSeen:
    officer: str
    alert_id: str
    incident_id: str
    role: str
    arrived: float  # perf_counter, after verification
    sealed_ms: int  # the envelope's ts (gateway clock at signing)


@dataclass
class Panic:
    index: int
    subject: str
    seq: int
    t0: float  # perf_counter just before the publish call
    t0_wall_ms: float
    puback_ms: float
    expected: list[tuple[str, str]]  # (unit, role) by `recommend` on what the bench knows
    settled: bool
    incident_id: str | None = None
    closed: bool = False


class _Officer:
    def __init__(self, spec: OfficerSpec, pki: Pki, client: aiomqtt.Client) -> None:
        ident = pki.require_identity(spec.id)
        key = serialization.load_pem_private_key(ident.key.read_bytes(), password=None)
        self.spec = spec
        self.id = spec.id
        self.signer = KeySigner(spec.id, key)  # type: ignore[arg-type]
        self.client = client
        self.seq = 0
        self.sent = 0
        self.confirmed: set[int] = set()
        #: The incident this officer accepted and that is not closed yet (bench's view).
        self.incident: str | None = None
        self.accepted_seq: int | None = None
        self.bad = 0
        self.withdrawn = 0

    async def send(self, kind: str, body: dict[str, Any]) -> tuple[int, float]:
        """Sign and publish at QoS 1 (returns after the PUBACK); (seq, time of the call)."""
        self.seq += 1
        seq = self.seq
        data = seal(Message(self.id, seq, wall_ms(), kind, body), self.signer)
        t0 = time.perf_counter()
        await self.client.publish(str(Topic.up(self.id, kind)), data, qos=1)
        self.sent += 1
        return seq, t0

    def position(self) -> dict[str, Any]:
        return {"lat": self.spec.lat, "lon": self.spec.lon, "acc": 5.0, "fix": "3d"}


class _Fleet:
    """The officers, the panic schedule and the operator's closes, on one event loop."""

    def __init__(self, conn: Connection, spec: FleetSpec) -> None:
        self.conn = conn
        self.spec = spec
        self.cfg = spec.cfg
        self.pki = Pki(spec.pki_root)
        self.keys = KeyRegistry(self.pki)
        self.policy = load_policy(POLICY_PATH)
        self.eta = StreetEta(StreetGraph.from_geojson(orjson.loads(MAP_PATH.read_bytes())), self.policy.speeds)
        self.officers: dict[str, _Officer] = {}
        self.alerts: list[AlertSeen] = []
        self.panics: list[Panic] = []
        self.by_incident: dict[str, Panic] = {}
        self.closed: set[str] = set()
        self.answering = 0
        self.refused_closes: list[str] = []
        self.rng = random.Random(self.cfg.seed + 1)
        self.api = f"https://{spec.host}:{spec.api_port}/api/v1"
        self._tg: asyncio.TaskGroup | None = None

    # -- officers ----------------------------------------------------------------------------

    async def _read(self, officer: _Officer) -> None:
        async for m in officer.client.messages:
            payload = m.payload if isinstance(m.payload, bytes) else b""
            try:
                msg = verify_downlink(m.topic.value, payload, officer.id, self.keys)
            except Rejected:
                officer.bad += 1
                continue
            arrived = time.perf_counter()
            if msg.kind == "alert":
                self._on_alert(officer, msg, arrived)
            elif msg.body.get("type") == "receipt":
                for lo, hi in parse_ranges(msg.body.get("ranges")):
                    officer.confirmed.update(range(lo, hi + 1))
            elif msg.body.get("type") == "withdraw":
                officer.withdrawn += 1

    def _on_alert(self, officer: _Officer, msg: Message, arrived: float) -> None:
        body = msg.body
        seen = AlertSeen(officer.id, str(body["alert_id"]), str(body["incident_id"]), str(body.get("role", "")),
                         arrived, msg.ts)  # fmt: skip
        self.alerts.append(seen)
        if seen.incident_id not in self.by_incident:
            # Incidents open in the order of the panics (only panics open them here).
            panic = next((p for p in self.panics if p.incident_id is None and p.t0 <= arrived), None)
            if panic is not None:
                panic.incident_id = seen.incident_id
                self.by_incident[seen.incident_id] = panic
        assert self._tg is not None
        self.answering += 1
        self._tg.create_task(self._answer(officer, seen), name=f"answer-{seen.alert_id}")

    async def _answer(self, officer: _Officer, alert: AlertSeen) -> None:
        try:
            await officer.send("ack", {"alert_id": alert.alert_id, "answer": "received"})
            seq, _ = await officer.send("ack", {"alert_id": alert.alert_id, "answer": "accepted"})
            if alert.incident_id not in self.closed:
                officer.incident, officer.accepted_seq = alert.incident_id, seq
        finally:
            self.answering -= 1

    async def _report_positions(self, officer: _Officer, phase: float) -> None:
        await asyncio.sleep(phase)
        loop = asyncio.get_running_loop()
        next_t = loop.time()
        while True:
            await officer.send("telemetry", officer.position())
            next_t += 1.0
            await asyncio.sleep(max(0.0, next_t - loop.time()))

    # -- the schedule ------------------------------------------------------------------------

    def _settled(self) -> bool:
        """Does the gateway hold exactly the unit states the bench believes?"""
        if self.answering:
            return False
        if any(o.incident is not None and o.accepted_seq not in o.confirmed for o in self.officers.values()):
            return False
        return all(p.closed or self._received(p) >= len(p.expected) for p in self.panics)

    def _received(self, panic: Panic) -> int:
        if panic.incident_id is None:
            return 0
        return len({a.alert_id for a in self.alerts if a.incident_id == panic.incident_id})

    def _expected(self, subject: _Officer, now_ms: int) -> list[tuple[str, str]]:
        units = [
            UnitView(o.id, "officer", o.spec.lat, o.spec.lon, state="committed" if o.incident else "available",
                     supervisor=o.spec.supervisor)
            for o in self.officers.values()
        ]  # fmt: skip
        incident = IncidentView("bench", "panic", subject.spec.lat, subject.spec.lon, now_ms, subject=subject.id)
        rec = recommend(incident, units, self.policy, self.eta, now_ms)
        return [(c.unit_id, c.role) for c in rec.chosen]

    async def _panic(self, index: int) -> None:
        # Not the subject of an incident still open: the gateway would merge the new
        # panic into it (one officer down is one incident) and send no new alerts.
        busy = {p.subject for p in self.panics if not p.closed}
        free = [o for o in self.officers.values() if o.id not in busy]
        subject = self.rng.choice(free or list(self.officers.values()))  # none free: counted as merged
        settled = self._settled()
        expected = self._expected(subject, wall_ms())
        t0_wall = time.time() * 1000
        seq, t0 = await subject.send("event", {"type": "panic", "lat": subject.spec.lat, "lon": subject.spec.lon,
                                               "acc": 5.0})  # fmt: skip
        puback = (time.perf_counter() - t0) * 1000
        self.panics.append(Panic(index, subject.id, seq, t0, t0_wall, puback, expected, settled))

    async def _close_due(self, client: httpx.AsyncClient, index: int) -> None:
        """Close panic `index`'s incident, and retry those that could not be closed
        before (the gateway had not opened them yet); one lookup of unknown ids."""
        due = [p for p in self.panics if p.index <= index and not p.closed]
        if any(p.incident_id is None for p in due):
            resp = await client.get(f"{self.api}/incidents")
            by_source = {src: str(inc["incident_id"]) for inc in resp.json() for src in inc.get("sources", [])}
            for p in due:
                found = by_source.get(f"{p.subject}:{p.seq}")
                if p.incident_id is None and found is not None:
                    p.incident_id = found
                    self.by_incident.setdefault(found, p)
        for panic in due:
            if panic.incident_id is None:
                self.refused_closes.append(f"panic {panic.index}: no incident yet at close time")
                continue
            await self._close(client, panic, panic.incident_id)

    async def _close(self, client: httpx.AsyncClient, panic: Panic, incident_id: str) -> None:
        resp = await client.post(f"{self.api}/incidents/{incident_id}/close", json={"reason": "bench"})
        if resp.status_code != 200:
            self.refused_closes.append(f"{incident_id}: HTTP {resp.status_code} {resp.text[:200]}")
            return
        panic.closed = True
        self.closed.add(incident_id)
        for o in self.officers.values():
            if o.incident == incident_id:
                o.incident, o.accepted_seq = None, None

    async def _wait_on_picture(self, client: httpx.AsyncClient, within_s: float = 60.0) -> None:
        deadline = time.monotonic() + within_s
        want = set(self.officers)
        while True:
            resp = await client.get(f"{self.api}/picture")
            ok = {
                f["properties"]["id"]
                for f in resp.json()["features"]
                if f["properties"].get("layer") == "unit"
                and f["properties"]["id"] in want
                and f["geometry"] is not None
                and f["properties"].get("state") == "available"
            }
            if ok == want:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"officers not available on the picture after {within_s:g}s: {sorted(want - ok)}")
            await asyncio.sleep(0.5)

    async def main(self) -> None:
        spec, cfg = self.spec, self.cfg
        api_ctx = client_context(self.pki, self.pki.require_identity(OPERATOR_ID))
        loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:
            api = await stack.enter_async_context(httpx.AsyncClient(verify=api_ctx, timeout=10))
            for o in spec.officers:
                client = aiomqtt.Client(
                    spec.host, spec.broker_port, identifier=o.id, protocol=aiomqtt.ProtocolVersion.V5,
                    tls_context=client_context(self.pki, self.pki.require_identity(o.id)), keepalive=30,
                )  # fmt: skip
                await stack.enter_async_context(client)
                client.pending_calls_threshold = 10_000
                await client.subscribe(down_filter(o.id), qos=1)
                self.officers[o.id] = _Officer(o, self.pki, client)
            tg = self._tg = await stack.enter_async_context(asyncio.TaskGroup())
            background = []
            for officer in self.officers.values():
                background.append(tg.create_task(self._read(officer), name=f"read-{officer.id}"))
                await officer.send("status", {"state": "available"})
            n = len(self.officers)
            for i, officer in enumerate(self.officers.values()):
                reporter = self._report_positions(officer, i / n)
                background.append(tg.create_task(reporter, name=f"position-{officer.id}"))
            await self._wait_on_picture(api)
            self.conn.send(("ready", None))
            cmd = await loop.run_in_executor(None, self.conn.recv)
            if cmd[0] != "go":
                raise BenchError(f"officers: expected 'go', got {cmd[0]!r}")
            start = loop.time()
            events = []
            for i in range(cfg.incidents):
                t = cfg.settle_s + i * cfg.spacing_s
                events += [(t, 0, i), (t + cfg.hold, 1, i)]
            done = 0
            for t, kind, i in sorted(events):
                await asyncio.sleep(max(0.0, start + t - loop.time()))
                if kind == 0:
                    await self._panic(i)
                    done += 1
                    self.conn.send(("progress", {"panics": done, "alerts": len(self.alerts)}))
                elif loop.time() < start + cfg.timeline_s():  # an overloaded gateway: stop closing in time
                    await self._close_due(api, i)
            await asyncio.sleep(max(0.0, start + cfg.timeline_s() - loop.time()))
            incidents = (await api.get(f"{self.api}/incidents")).json()
            for task in background:
                task.cancel()
            self.conn.send(("result", self._result(incidents)))

    def _result(self, incidents: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "panics": [dataclasses.asdict(p) for p in self.panics],
            "alerts": [dataclasses.asdict(a) for a in self.alerts],
            "incidents": incidents,
            "officers": {
                o.id: {"sent": o.sent, "bad_downlinks": o.bad, "withdrawn": o.withdrawn} for o in self.officers.values()
            },
            "refused_closes": self.refused_closes,
        }


def _fleet_main(conn: Connection, spec: FleetSpec) -> None:
    """The officer process: "ready" once every officer is on the picture, available;
    then "go" starts the panics; sends "result" when done, exits on "stop"."""
    _ignore_sigint()
    failed = False
    try:
        asyncio.run(_Fleet(conn, spec).main())
    except* (BenchError, OSError, aiomqtt.MqttError, httpx.HTTPError, ValueError) as group:
        conn.send(("error", "officers: " + "; ".join(repr(e) for e in group.exceptions)))
        failed = True
    if failed:
        return
    with contextlib.suppress(EOFError):
        conn.recv()  # "stop": the parent watches this process until the background is done


# --------------------------------------------------------------------------- figures


def _stats(samples_ms: Sequence[float]) -> dict[str, Any]:
    values = sorted(samples_ms)
    if not values:
        return {"n": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 0.50), 1),
        "p95_ms": round(percentile(values, 0.95), 1),
        "p99_ms": round(percentile(values, 0.99), 1),
        "max_ms": round(values[-1], 1),
        "mean_ms": round(sum(values) / len(values), 1),
    }


def summarise_fleet(result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """(latency, choice, per-incident rows) from the officer process's result."""
    incidents = {inc["incident_id"]: inc for inc in result["incidents"]}
    by_source = {src: inc for inc in result["incidents"] for src in inc.get("sources", [])}
    alerts: dict[str, list[dict[str, Any]]] = {}
    for a in result["alerts"]:
        alerts.setdefault(a["incident_id"], []).append(a)
    rows: list[dict[str, Any]] = []
    first, every, opened, sealed, delivery = [], [], [], [], []
    counts = Counter(dict.fromkeys(CHOICE_COUNTS, 0))
    mismatches: list[dict[str, Any]] = []
    mapped: set[str | None] = set()
    for p in result["panics"]:
        counts["incidents"] += 1
        inc = by_source.get(f"{p['subject']}:{p['seq']}")
        incident_id = inc["incident_id"] if inc else p["incident_id"]
        if inc is not None and p["incident_id"] not in (None, inc["incident_id"]):
            counts["mapping_disagreed"] += 1
        if incident_id is not None and incident_id in mapped:
            counts["merged"] += 1  # the gateway took this panic into an earlier incident
        mapped.add(incident_id)
        got = sorted(alerts.get(incident_id, []), key=lambda a: a["arrived"]) if incident_id else []
        got = [a for a in got if a["arrived"] >= p["t0"]]
        distinct = {a["alert_id"]: a for a in got}
        counts["duplicate_alerts"] += len(got) - len(distinct)
        units = [a["officer"] for a in distinct.values()]
        gw_chosen = [c["unit_id"] for c in ((inc or {}).get("recommendation") or {}).get("chosen", [])]
        want = len(p["expected"])
        row: dict[str, Any] = {
            "index": p["index"], "subject": p["subject"], "incident_id": incident_id, "alerts": len(distinct),
            "expected": [u for u, _ in p["expected"]], "gateway_chose": gw_chosen, "alerted": sorted(units),
            "settled": p["settled"], "puback_ms": round(p["puback_ms"], 1),
        }  # fmt: skip
        if got:
            counts["with_alerts"] += 1
            row["first_ms"] = round((got[0]["arrived"] - p["t0"]) * 1000, 1)
            first.append(row["first_ms"])
            firsts = list(distinct.values())[: max(want, 1)]
            if len(distinct) >= want:
                row["all_ms"] = round((max(a["arrived"] for a in firsts) - p["t0"]) * 1000, 1)
                every.append(row["all_ms"])
            a0 = got[0]
            sealed.append(a0["sealed_ms"] - p["t0_wall_ms"])
            delivery.append(row["first_ms"] - (a0["sealed_ms"] - p["t0_wall_ms"]))
            if inc is not None:
                opened.append(inc["opened_ms"] - p["t0_wall_ms"])
        if p["subject"] in units:
            counts["subject_alerted"] += 1
        counts["count_right" if len(distinct) == want else "count_wrong"] += 1
        if sorted(gw_chosen) == sorted(units):
            counts["matched_gateway"] += 1
        else:
            counts["mismatched_gateway"] += 1
        if p["settled"]:
            counts["settled"] += 1
            if sorted(units) == sorted(u for u, _ in p["expected"]):
                counts["matched_policy"] += 1
            else:
                counts["mismatched_policy"] += 1
                mismatches.append(row)
        rows.append(row)
    latency = {
        "first": _stats(first),
        "all": _stats(every),
        "opened": _stats(opened),
        "sealed": _stats(sealed),
        "delivery": _stats(delivery),
    }
    choice: dict[str, Any] = {
        **counts,
        "mismatches": mismatches,
        "incidents_on_gateway": len(incidents),
        "refused_closes": result["refused_closes"],
        "bad_downlinks": sum(o["bad_downlinks"] for o in result["officers"].values()),
    }
    return latency, choice, rows


def _gateway_times(db_path: Path, panics: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each panic's publish -> received (`recv_ts`) and -> stored (`stored_ts`), from the
    gateway's store (its clock; the same machine's)."""
    received, stored = [], []
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)) as db:
        for p in panics:
            row = db.execute("SELECT recv_ts, stored_ts FROM messages WHERE device_id = ? AND seq = ?",
                             (p["subject"], p["seq"])).fetchone()
            if row is not None:
                received.append(row[0] - p["t0_wall_ms"])
                stored.append(row[1] - p["t0_wall_ms"])
    return {"received": _stats(received), "stored": _stats(stored)}


# --------------------------------------------------------------------------- harness


def _officer_identities(ws: Workspace, officers: Sequence[OfficerSpec]) -> None:
    for o in officers:
        ws.pki.issue(Role.DEVICE, o.id)
    ws.pki.issue(Role.OPERATOR, OPERATOR_ID)


@contextlib.contextmanager
def _timed(log: Log, what: str) -> Iterator[None]:
    t = time.monotonic()
    yield
    log(f"  {what}: {time.monotonic() - t:.1f}s")


def run_dispatch(cfg: DispatchConfig, root: Path, log: Log = print) -> dict[str, Any]:
    """Everything `bench/dispatch` does, in `root` (a fresh directory); returns the figures."""
    duration = cfg.background_s()
    per_device = math.ceil(cfg.rate_hz * duration * 1.02) + 1
    officers = place_officers(cfg.officers, cfg.supervisors, cfg.seed)
    figures: dict[str, Any] = {
        "machine": machine_info(),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config": {**dataclasses.asdict(cfg), "hold_s": cfg.hold, "duration": duration,
                   "total_rate": cfg.total_rate, "presigned": per_device * cfg.devices},
    }  # fmt: skip
    log(f"creating a PKI: {cfg.devices} background devices, {cfg.officers} officers, an operator in {root}")
    ws = Workspace.create(root, cfg.devices)
    _officer_identities(ws, officers)
    registry = root / "registry.yaml"
    registry.write_text(yaml.safe_dump(registry_data(officers), sort_keys=False))
    log(f"pre-signing {per_device * cfg.devices:,} telemetry messages (ES256)")
    stock = presign(ws, per_device, log=log)
    load_before = {"busy_pct": background_load(log), "loadavg": [round(x, 2) for x in os.getloadavg()]}
    args = ["--registry", str(registry), "--map", str(MAP_PATH), "--policy", str(POLICY_PATH)]
    connect_s = 30 + cfg.devices / 50
    with (
        MosquittoRunner(ws.pki, root / "broker") as broker,
        GatewayRunner(ws.pki, broker.port, root / "gateway", extra_args=args) as gateway,
        _children() as kids,
    ):
        log(f"  mosquitto on :{broker.port}, gateway pid {gateway.pid} (API :{gateway.http_port}, {gateway.log_path})")
        store = StoreReader(gateway.db_path)
        spec = LinkSpec(ws.pki.root, broker.port, window=cfg.window, receipts=True)
        with _timed(log, f"{cfg.devices} background connections"):
            pubs = _Publishers(kids, spec, ws, stock, cfg.publishers)
            pubs.each("ready", connect_s)
        officer_sent = [0]
        last_poll = [0.0, 0]

        def delivered() -> int:
            now = time.monotonic()
            if now - last_poll[0] >= 0.05:
                last_poll[0], last_poll[1] = now, store.count()
            return int(last_poll[1]) - officer_sent[0]

        pubs.send("warmup")
        pubs.each("warm", connect_s)
        _warm_up(delivered, cfg.devices, _Progress("warm-up", log))
        with _timed(log, f"{cfg.officers} officers connected and on the picture"):
            fleet = _Child("officers", _fleet_main, FleetSpec(ws.pki.root, broker.port, gateway.http_port,
                                                              tuple(officers), cfg))  # fmt: skip
            kids.append(fleet)
            fleet.expect("ready", 90)
        # Officers' own messages so far (status + positions) are not background.
        officer_sent[0] = max(0, store.count() - cfg.devices)
        meter = _meter(pubs, broker, gateway=[gateway.pid], officers=[fleet.proc.pid])
        log(f"background {cfg.total_rate:,.0f} msg/s for {duration:g}s; {cfg.incidents} panics every "
            f"{cfg.spacing_s:g}s from t={cfg.settle_s:g}s")  # fmt: skip
        fleet.send("go")
        progress = _Progress("dispatch", log)
        run_cfg = RunConfig(duration, cfg.total_rate, cfg.window, cfg.publishers, cfg.drain_timeout)
        published_msgs = _go(pubs, run_cfg, delivered, progress, also=[fleet])
        result = fleet.latest.get("result") or fleet.expect("result", 180)
        fleet.send("stop")
        officer_sent[0] = sum(o["sent"] for o in result["officers"].values())
        real = finish_real(ws, pubs, published_msgs, store, gateway, delivered, meter, cfg.drain_timeout, progress)
        gateway_times = _gateway_times(gateway.db_path, result["panics"])
        try:
            situation = gateway.get("/api/v1/stats").get("situation")
        except (OSError, http.client.HTTPException, BenchError):
            situation = None
    latency, choice, rows = summarise_fleet(result)
    latency.update(gateway_times)
    cpu = real.pop("cpu")
    p99 = latency["first"]["p99_ms"]
    figures.update(
        load={"before": load_before, "after_loadavg": [round(x, 2) for x in os.getloadavg()],
              "machine_busy_pct": cpu.get("machine_busy_pct")},
        latency=latency,
        choice=choice,
        incidents=rows,
        background={k: real.get(k) for k in (
            "published", "delivered", "lost", "duplicates", "missing", "publish_rate", "msgs_per_s", "seconds",
            "receipts_confirmed", "bad_receipts", "max_backlog", "accepted", "rejected", "gaps", "skewed",
            "store_latency_p50_ms", "store_latency_p99_ms", "latency_p50_ms", "latency_p99_ms", "gateway_live")},
        cpu=cpu,
        target={"p99_first_ms": p99, "target_ms": TARGET_P99_MS,
                "met": p99 is not None and p99 < TARGET_P99_MS and choice["subject_alerted"] == 0
                and choice["count_wrong"] == 0},
    )  # fmt: skip
    if situation is not None:
        figures["background"]["situation"] = situation
    return figures


__all__ = ["FIGURE_KEYS", "TARGET_P99_MS", "DispatchConfig", "OfficerSpec", "run_dispatch", "summarise_fleet"]
