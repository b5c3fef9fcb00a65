"""The fleet runner: one real `edge_agent.agent.Agent` per simulated device, driven by a
scenario's timeline on a shared `SimClock`, with faults injected on schedule.

    summary = await run_fleet(load_scenario("city-shift"), FleetOptions(pki_dir, "localhost:8883"))

What it does, in order:
1. Issues every device certificate the PKI directory lacks (and an operator identity
   for the gateway API), with progress for thousands.
2. Starts devices at their shift start, staggered (`agent.connect_rate` per second):
   each is an `Agent` with its own certificate, TLS context, SQLite outbox in the run
   directory (`sync="off"`: the devices share one operating system, and fsyncs in
   thousands of outboxes' checkpoints would stall the event loop they all run on) and
   the sensor-model drivers of its kind (`Kit`). Devices with link faults reach the
   broker through their own `CutProxy`; when the scenario has a broker outage every
   other device goes through one shared proxy.
3. Triggers incidents and injects faults at their scenario times; records what really
   happened in the ground-truth log (`TruthLog`), next to what the models record.
4. At the end (or at a shift's end) powers the sensors off, waits for the outboxes to
   drain (every message receipted by the gateway), stops the agents gracefully, asks
   the gateway what it stored and rejected, and returns the `Summary`.

Agents log to `<run_dir>/agents.log`, not the console. Everything runs on one event
loop; a device that fails is reported and the rest carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import random
import resource
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from certs.pki import Pki, PkiError
from certs.registry import KeyRegistry
from certs.signing import load_signer
from certs.tls import client_context
from edge_agent.agent import Agent
from edge_agent.config import parse_hostport
from edge_agent.drivers import Clock, Driver, Reading
from edge_agent.errors import BluelightError, ConfigError
from edge_agent.eventloop import loop_name
from edge_agent.mqtt.client import MqttError
from edge_agent.settings import AgentSettings
from edge_agent.wire.envelope import Message
from edge_agent.wire.geo import LatLon, bearing_deg, distance_m
from edge_agent.wire.ids import Role
from firmware_sim.city import City, project_to_segment
from firmware_sim.clock import SimClock, SkewedClock
from firmware_sim.epochs import EpochScheduler
from firmware_sim.faults import Capture, CutProxy, ForgeableSigner, garbage_payloads, publish_raw, uplink
from firmware_sim.kit import Kit, build_kit
from firmware_sim.models import gunshot
from firmware_sim.scenario import Incident, Scenario, SensorSpec, UnitSpec, derive_seed, hotlist_data, registry_data
from firmware_sim.summary import (
    DeviceReport,
    FaultRecord,
    GatewayApi,
    GatewayUnavailable,
    IncidentRecord,
    Progress,
    Snapshot,
    Summary,
    assess,
)
from firmware_sim.truth import TruthLog

log = logging.getLogger(__name__)

#: The gateway's unit registry for the run's devices (`bluelight gateway run --registry`).
REGISTRY_FILE = "registry.yaml"
HOTLIST_FILE = "hotlist.yaml"
#: The identity the simulator uses to read the gateway's API.
OPERATOR_ID = "sim-operator"
#: File descriptors per device: its socket, the outbox and its WAL file, and one to spare.
FDS_PER_DEVICE = 4
#: Patrol loops computed per unit group; units share them with different starting points.
ROUTE_POOL = 32
#: Accelerated runs keep every device clock at least this far behind the wall clock.
CLOCK_MARGIN_S = 10.0


class FleetError(BluelightError):
    """The fleet cannot run (PKI, file descriptors, broker address)."""


@dataclass(frozen=True)
class FleetOptions:
    """Where the fleet's identities, broker, gateway and files are."""

    pki_dir: Path
    broker: str
    #: Outboxes (`outboxes/<id>.db`) and `agents.log`; default `<pki_dir>/../sim`. Keep it
    #: between runs against the same gateway: a device's sequence numbers live there.
    run_dir: Path | None = None
    #: `https://host:port/api/v1` of the gateway, to judge what the platform did.
    gateway_api: str | None = None
    truth_path: Path | None = None
    #: Real seconds to wait at the end for every outbox to be receipted.
    drain_s: float = 60.0
    #: Called after a certificate is revoked, e.g. to make an unsupervised broker reload
    #: its CRL (`bluelight broker run` does that by itself).
    on_revoke: Callable[[], None] | None = None
    #: Run until cancelled instead of for the scenario's duration (the demo).
    forever: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "pki_dir", Path(self.pki_dir))
        parse_hostport(self.broker)
        if self.drain_s < 0:
            raise ConfigError("drain time must be >= 0 seconds")

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir is not None else self.pki_dir.resolve().parent / "sim"


def sim_clock(speed: float, duration_s: float, *, forever: bool = False, ahead_s: float = 0.0) -> SimClock:
    """The run's clock. In real time it starts now. Accelerated, it starts far enough in
    the past that no device's timestamps (not even those of a device whose clock is
    `ahead_s` fast) overtake the wall clock before the run ends: accelerated time makes
    every device look behind the gateway's clock, by the same shrinking amount, so a
    clock-skew fault still stands out against the rest of the fleet."""
    if speed <= 1 or forever:
        return SimClock(speed)
    lead_s = duration_s * (1 - 1 / speed) + max(0.0, ahead_s) + CLOCK_MARGIN_S
    return SimClock(speed, start_ms=time.time_ns() // 1_000_000 - round(lead_s * 1000))


def write_gateway_files(scenario: Scenario, run_dir: Path) -> None:
    """Write the gateway's unit registry (kinds, capabilities, supervisors, sensor sites)
    and ANPR hotlist for this scenario into `run_dir`."""
    head = f"# Written by the simulator for scenario {scenario.name}.\n"
    expires = time.time_ns() // 1_000_000 + 30 * 86_400_000
    for name, data in ((REGISTRY_FILE, registry_data(scenario)),
                       (HOTLIST_FILE, hotlist_data(scenario, expires_ts=expires))):
        (run_dir / name).write_text(head + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


class SimAgent(Agent):
    """The real agent, plus a note of each event it commits (type, seq, sim time)."""

    def __init__(self, *args: Any, sim_clock: SimClock, answer_seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sim_clock = sim_clock
        self.first_seq = self.outbox.next_seq
        self.events: list[tuple[str, int, float]] = []
        #: (alert_id, answer, sim seconds) of every answer given.
        self.answers: list[tuple[str, str, float]] = []
        self.on_alert = self._officer_answers
        self._answer_rng = random.Random(answer_seed)
        self._answering: list[asyncio.TimerHandle] = []
        self._off_duty = False

    def _officer_answers(self, message: Message) -> None:
        """The simulated officer accepts an alert after reading it (2-8 s, sim time),
        says `arrived` 1-3 minutes later and is available again after 2-5 more."""
        if self._off_duty:
            return
        alert_id = str(message.body["alert_id"])
        rng, loop = self._answer_rng, asyncio.get_running_loop()
        accept = rng.uniform(2.0, 8.0)
        arrive = accept + rng.uniform(60.0, 180.0)
        clear = arrive + rng.uniform(120.0, 300.0)
        for at_s, answer in ((accept, "accepted"), (arrive, "arrived"), (clear, None)):
            self._answering.append(loop.call_later(self.sim_clock.real_s(at_s), self._answer, alert_id, answer))

    def _answer(self, alert_id: str, answer: str | None) -> None:
        if answer is None:
            self.emit(Reading("status", {"state": "available"}))
        elif self.answer(alert_id, answer) is not None:
            self.answers.append((alert_id, answer, self.sim_clock.elapsed_s()))

    def stop_answering(self) -> None:
        """Off duty (end of shift, end of the run): no more answers, so the device's
        last message is made when its sensors go off, like every other device's."""
        self._off_duty = True
        for handle in self._answering:
            handle.cancel()

    def close(self) -> None:
        self.stop_answering()
        super().close()

    def emit(self, reading: Reading) -> int | None:
        seq = super().emit(reading)
        if seq is not None and reading.kind == "event":
            self.events.append((str(reading.body.get("type")), seq, self.sim_clock.elapsed_s()))
        return seq


class _Powered:
    """A driver that can be switched off (end of shift, end of run). With `clock` set it
    reads that clock instead of the agent's (a device whose clock is skewed still has
    sensors that live in true time)."""

    def __init__(self, inner: Driver, power: asyncio.Event, clock: Clock | None = None) -> None:
        self.inner, self.power, self.clock = inner, power, clock

    async def readings(self, clock: Clock) -> AsyncIterator[Reading]:
        source = self.inner.readings(self.clock or clock)
        try:
            async for reading in source:
                if not self.power.is_set():
                    return
                yield reading
        finally:
            closer = getattr(source, "aclose", None)
            if closer is not None:
                await closer()


@dataclass(eq=False)
class SimDevice:
    """One simulated device and its fault plumbing."""

    spec: UnitSpec | SensorSpec
    agent: SimAgent
    kit: Kit
    signer: ForgeableSigner
    clock: SkewedClock
    proxy: CutProxy | None
    power: asyncio.Event
    capture: Capture | None = None
    refused_as: str | None = None
    crashed: str | None = None
    report: DeviceReport | None = None
    task: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        return self.spec.id

    def sensing(self) -> bool:
        """Its sensors are powered and its agent runs (a scheduled driver goes on)."""
        return self.power.is_set() and not self.crashed and (self.task is None or not self.task.done())

    def sensor_failed(self, exc: BaseException) -> None:
        """A scheduled driver raised: the device stops, as an agent whose driver fails."""
        self.crashed = f"GNSS driver failed: {exc!r}"
        self.agent.stop()


def _raise_fd_limit(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    target = hard if hard == resource.RLIM_INFINITY else min(hard, max(needed, soft))
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        raise FleetError(
            f"this run needs about {needed:,} open files but the limit is {soft:,}: raise it "
            "(ulimit -n) or run fewer devices (--devices)"
        )
    return soft


@contextlib.contextmanager
def _agent_log(path: Path) -> Iterator[None]:
    """Agents log to a file: thousands of devices would drown the console."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in ("edge_agent", "mqtt")]
    saved = [(lg.propagate, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.propagate = False
        lg.setLevel(logging.INFO if lg.name == "edge_agent" else logging.WARNING)
    try:
        yield
    finally:
        for lg, (propagate, level) in zip(loggers, saved, strict=True):
            lg.removeHandler(handler)
            lg.propagate, lg.level = propagate, level
        handler.close()


def unit_routes(scenario: Scenario) -> dict[str, tuple[LatLon, ...]]:
    """Every unit's patrol loop, deterministic from the scenario seed. Units of one group
    without an explicit route share a pool of loops, each starting somewhere else."""
    city = scenario.city
    routes: dict[str, tuple[LatLon, ...]] = {}
    pools: dict[tuple[str, float, LatLon | None], list[tuple[LatLon, ...]]] = {}
    for unit in scenario.units:
        if unit.route is not None:
            routes[unit.id] = closed_route(city, unit.route)
            continue
        key = (unit.group, unit.patrol_m, unit.start)
        pool = pools.get(key)
        if pool is None:
            size = min(ROUTE_POOL, sum(1 for u in scenario.units if u.group == unit.group))
            pool = pools[key] = [
                city.patrol_route(random.Random(derive_seed(scenario.seed, "route", unit.group, str(i))),
                                  unit.patrol_m, start=unit.start)
                for i in range(size)
            ]
        rng = random.Random(unit.seed)
        loop = pool[rng.randrange(len(pool))]
        turn = 0 if unit.start is not None else rng.randrange(len(loop))
        routes[unit.id] = loop[turn:] + loop[:turn]
    return routes


def closed_route(city: City, stops: Sequence[LatLon]) -> tuple[LatLon, ...]:
    """A loop on streets through `stops` and back to the first."""
    points: list[LatLon] = []
    for a, b in itertools.pairwise([*stops, stops[0]]):
        for p in city.shortest_path(a, b)[:-1]:
            if not points or points[-1] != p:
                points.append(p)
    if len(set(points)) < 2:
        raise ConfigError(f"the route through {list(stops)} collapses to one junction")
    return tuple(points)


def street_path(city: City, stops: Sequence[LatLon]) -> list[LatLon]:
    """An open path on streets through `stops` in order."""
    points: list[LatLon] = []
    for a, b in itertools.pairwise(stops):
        for p in city.shortest_path(a, b):
            if not points or points[-1] != p:
                points.append(p)
    return points


@dataclass(frozen=True)
class Pass:
    """A vehicle passing a camera: when (seconds into its drive), how close, which way."""

    camera: str
    t_s: float
    distance_m: float
    bearing: float


def camera_passes(path: Sequence[LatLon], speed_mps: float, cameras: Sequence[SensorSpec]) -> list[Pass]:
    """When a vehicle driving `path` at `speed_mps` comes within range of each camera."""
    cumulative = [0.0]
    for a, b in itertools.pairwise(path):
        cumulative.append(cumulative[-1] + distance_m(a, b))
    out = []
    for cam in cameras:
        best: tuple[float, float, float] | None = None
        for i, (a, b) in enumerate(itertools.pairwise(path)):
            dist, frac = project_to_segment(cam.site, a, b)
            if best is None or dist < best[0]:
                along = cumulative[i] + frac * (cumulative[i + 1] - cumulative[i])
                best = (dist, along, bearing_deg(a, b))
        if best is not None and best[0] <= cam.range_m:
            out.append(Pass(cam.id, best[1] / speed_mps, best[0], best[2]))
    return sorted(out, key=lambda p: p.t_s)


#: The collector's first threshold while a fleet runs (CPython's default is 700): each
#: message allocates a few hundred short-lived objects, and thousands of devices'
#: long-lived state would otherwise be traversed by every older-generation collection.
GC_THRESHOLD0 = 20_000


def _freeze_heap() -> None:
    """Every device has started: move what exists now (agents, models, routes, TLS
    contexts) out of the collector's way; new garbage is collected as before."""
    gc.collect()
    gc.freeze()


class Fleet:
    """Runs one scenario. `await Fleet(...).run()` returns the `Summary`."""

    def __init__(
        self,
        scenario: Scenario,
        options: FleetOptions,
        *,
        progress: Progress | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.scenario = scenario
        self.options = options
        self.pki = Pki(options.pki_dir)
        self.progress = progress
        self._echo = echo
        self.run_dir = options.resolved_run_dir
        self.clock = SimClock(scenario.speed)
        self.truth: TruthLog | None = None
        self.devices: dict[str, SimDevice] = {}
        self.specs: dict[str, UnitSpec | SensorSpec] = {s.id: s for s in scenario.specs}
        self.fault_records = [FaultRecord(f) for f in scenario.faults]
        self.incident_records: list[IncidentRecord] = []
        self.proxies: dict[str, CutProxy] = {}
        self.shared_proxy: CutProxy | None = None
        self.routes: dict[str, tuple[LatLon, ...]] = {}
        self._keys: KeyRegistry | None = None
        self._tg: asyncio.TaskGroup | None = None
        #: Shift ends and ANPR passes still scheduled: cancelled when the run ends.
        self._later: set[asyncio.Task[None]] = set()
        self._ended = asyncio.Event()
        self._real_start = 0.0
        self._revoked_before: set[str] = set()
        self._outage = False
        #: Every GNSS receiver's epochs, on one timer (set while the run is on).
        self.epochs: EpochScheduler | None = None

    # -- helpers ------------------------------------------------------------------------
    def note(self, text: str) -> None:
        """A line for the operator (above the progress line)."""
        line = f"t={self.clock.elapsed_s():,.0f} s: {text}"
        if self.progress is not None:
            self.progress.note(line)
        elif self._echo is not None:
            self._echo(line)
        else:
            log.info("%s", line)

    def _say(self, text: str) -> None:
        if self.progress is not None:
            self.progress.note(text)
        elif self._echo is not None:
            self._echo(text)

    def _truth(self, t_ms: int, kind: str, **fields: Any) -> None:
        if self.truth is not None:
            self.truth.record(t_ms, kind, **fields)

    def t_ms(self, at_s: float) -> int:
        return self.clock.start_ms + round(at_s * 1000)

    def snapshot(self) -> Snapshot:
        devs = list(self.devices.values())
        produced = sum(d.agent.outbox.next_seq - d.agent.first_seq for d in devs)
        confirmed = sum(d.agent.outbox.confirmed for d in devs)
        return Snapshot(
            t_s=self.clock.elapsed_s(),
            duration_s=None if self.options.forever else self.scenario.duration_s,
            devices=self.scenario.devices,
            started=len(devs),
            online=sum(d.agent.link.connected.is_set() for d in devs),
            produced=produced,
            sent=sum(d.agent.outbox.sent for d in devs),
            confirmed=confirmed,
            pending=max(0, produced - confirmed),
            incidents=sum(r.done for r in self.incident_records),
            incidents_total=len(self.incident_records) if self.scenario.repeat else len(self.scenario.incidents),
            faults=sum(bool(r.injected) for r in self.fault_records),
            faults_total=len(self.fault_records),
            speed=self.scenario.speed,
        )

    # -- preparation ------------------------------------------------------------------------
    def prepare_pki(self, *, operator: bool) -> int:
        """Issue what is missing; returns how many certificates were issued."""
        pki = self.pki.require()
        index = pki.index()
        revoked_faults = {f.unit for f in self.scenario.faults if f.type == "revoked"}
        missing = []
        for ident in self.specs:
            entry = index.get(ident)
            if entry is not None and entry.get("revoked_at"):
                if ident not in revoked_faults:
                    raise FleetError(
                        f"device {ident!r} is revoked in {pki.root} (an earlier run?): use a fresh PKI directory"
                    )
                self._revoked_before.add(ident)
                continue
            files = pki.identity(ident)
            if entry is None or not files.key.is_file() or not files.chain.is_file():
                missing.append(ident)
        if operator and (OPERATOR_ID not in index or not pki.identity(OPERATOR_ID).key.is_file()):
            pki.issue(Role.OPERATOR, OPERATOR_ID)
        if missing:
            self._say(f"sim: issuing {len(missing):,} device certificates in {pki.root}")
        started = time.monotonic()
        chunk = 250
        for n in range(0, len(missing), chunk):
            try:
                pki.issue_many(Role.DEVICE, missing[n : n + chunk])
            except PkiError as exc:
                raise FleetError(f"cannot issue device certificates: {exc}") from None
            done = min(n + chunk, len(missing))
            if done < len(missing):
                rate = done / max(time.monotonic() - started, 1e-6)
                self._say(f"sim: issued {done:,}/{len(missing):,} ({rate:,.0f}/s)")
        return len(missing)

    def _needs_proxy(self) -> tuple[set[str], bool]:
        own: set[str] = set()
        shared = False
        for f in self.scenario.faults:
            if f.type in ("link_flap", "link_outage", "revoked"):
                own.update(f.units)
            if f.type == "broker_outage":
                shared = True
        return own, shared

    async def _open_proxies(self) -> None:
        host, port = parse_hostport(self.options.broker)
        own, shared = self._needs_proxy()
        for ident in sorted(own):
            self.proxies[ident] = await CutProxy(host, port, name=f"proxy-{ident}").open()
        if shared:
            self.shared_proxy = await CutProxy(host, port, name="proxy-fleet").open()

    def _build(self, spec: UnitSpec | SensorSpec) -> SimDevice:
        """One device: its kit of sensor models and a real agent (synchronous)."""
        proxy = self.proxies.get(spec.id) or self.shared_proxy
        broker = proxy.address if proxy is not None else self.options.broker
        agent_defaults = self.scenario.agent
        settings = AgentSettings(
            pki_dir=self.pki.root,
            id=spec.id,
            broker=broker,
            outbox=self.run_dir / "outboxes" / f"{spec.id}.db",
            rate_hz=spec.rate_hz if isinstance(spec, UnitSpec) else agent_defaults.rate_hz,
            seed=spec.seed,
            sync="off",
            resend_after_s=agent_defaults.resend_after_s * self.scenario.speed,
            reconnect_min_s=0.5,
            reconnect_max_s=agent_defaults.reconnect_max_s,
            progress_every_s=0,
        )
        power = asyncio.Event()
        power.set()
        clock = SkewedClock(self.clock)
        route = self.routes.get(spec.id)
        kit = build_kit(spec, route=route, truth=self.truth, city=self.scenario.city)
        true_clock = self.clock if any(
            f.type == "clock_skew" and spec.id in f.units for f in self.scenario.faults
        ) else None
        # The GNSS receiver and the agent's NMEA driver run on the fleet's epoch
        # scheduler (one timer for every receiver); the other drivers on their own.
        gnss, gps = kit.unit.gnss, kit.unit.gps
        scheduled = gnss is not None and gps is not None and self.epochs is not None
        drivers = [_Powered(d, power, true_clock) for d in kit.drivers if not (scheduled and d is gps)]
        signer = ForgeableSigner(load_signer(self.pki, spec.id))
        assert self._keys is not None
        agent = SimAgent(
            settings,
            clock=clock,
            drivers=drivers,
            signer=signer,
            tls_context=client_context(self.pki, self.pki.require_identity(spec.id)),
            keys=self._keys,
            sim_clock=self.clock,
            answer_seed=derive_seed(spec.seed, "answers"),
        )
        device = SimDevice(spec, agent, kit, signer, clock, proxy, power)
        if scheduled:
            assert gnss is not None
            assert gps is not None
            assert self.epochs is not None
            self.epochs.add(gnss, gps, true_clock or clock, emit=agent.emit, alive=device.sensing,
                            failed=device.sensor_failed)
        replay = next((f for f in self.scenario.faults if f.type == "replay" and f.unit == spec.id), None)
        if replay is not None:
            device.capture = Capture(agent, replay.count)
        if spec.id in self._revoked_before:
            device.refused_as = "revoked"
        return device

    # -- running ----------------------------------------------------------------------------
    async def run(self) -> Summary:
        """Run the scenario to its end (or until cancelled with `forever`); return the summary."""
        scenario, options = self.scenario, self.options
        await asyncio.to_thread(self.prepare_pki, operator=options.gateway_api is not None)
        api = GatewayApi(options.gateway_api, self.pki, OPERATOR_ID) if options.gateway_api else None
        _raise_fd_limit(scenario.devices * FDS_PER_DEVICE + 256)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_gateway_files(scenario, self.run_dir)
        self._keys = KeyRegistry(self.pki)
        self.routes = await asyncio.to_thread(unit_routes, scenario)
        before, gateway_error = await self._gateway_stats(api)
        self.truth = TruthLog(options.truth_path) if options.truth_path is not None else None
        length = (
            f"until stopped, incidents every {scenario.duration_s:,.0f} s" if options.forever and scenario.repeat
            else "until stopped" if options.forever else f"{scenario.duration_s:,.0f} s"
        )
        self._say(
            f"sim: {scenario.name}: {scenario.devices:,} devices ({len(scenario.units):,} units, "
            f"{len(scenario.sensors):,} fixed sensors), {len(scenario.incidents)} incidents, "
            f"{len(scenario.faults)} faults, {length} at {scenario.speed:g}x, seed {scenario.seed}; "
            f"broker {options.broker}; files in {self.run_dir}; {loop_name()} event loop"
        )
        online = 0
        skew_view: dict[str, dict[str, Any]] | None = None
        thresholds = gc.get_threshold()
        gc.set_threshold(GC_THRESHOLD0, *thresholds[1:])
        with _agent_log(self.run_dir / "agents.log"):
            try:
                await self._open_proxies()
                ahead = max((f.offset_ms / 1000 for f in scenario.faults if f.type == "clock_skew"), default=0.0)
                self.clock = sim_clock(scenario.speed, scenario.duration_s, forever=options.forever, ahead_s=ahead)
                self._real_start = time.monotonic()
                self.epochs = EpochScheduler(self.clock, speed=self.clock.speed)
                self._truth(self.clock.now_ms(), "run", scenario=scenario.name, seed=scenario.seed,
                            speed=scenario.speed, devices=scenario.devices, wall_ms=time.time_ns() // 1_000_000)
                async with asyncio.TaskGroup() as tg:
                    self._tg = tg
                    loops = [
                        tg.create_task(self._starter(), name="sim-starter"),
                        tg.create_task(self._timeline(), name="sim-incidents"),
                        tg.create_task(self._progress_loop(), name="sim-progress"),
                        *(tg.create_task(self._fault(r), name=f"sim-fault-{r.fault.index}")
                          for r in self.fault_records),
                    ]
                    if options.forever:
                        await asyncio.Event().wait()
                    await self.clock.sleep_until(self.t_ms(scenario.duration_s))
                    for task in [*loops, *self._later]:
                        task.cancel()
                    online, skew_view = await self._finish(api)
            finally:
                if self.epochs is not None:
                    self.epochs.close()
                for proxy in [*self.proxies.values(), *([self.shared_proxy] if self.shared_proxy else [])]:
                    await proxy.close()
                for device in self.devices.values():
                    if device.capture is not None:
                        device.capture.close()
                if self.truth is not None:
                    self.truth.close()
                if self.progress is not None:
                    self.progress.finish()
                gc.set_threshold(*thresholds)
                gc.unfreeze()
        return await self._summarise(api, before, gateway_error, online, skew_view)

    async def _starter(self) -> None:
        """Start devices at their shift start, `connect_rate` a second. The rate is kept
        against real time, in batches, so a busy event loop does not slow the ramp."""
        rate = self.scenario.agent.connect_rate
        order = sorted(self.specs.values(), key=lambda s: s.shift_start_s if isinstance(s, UnitSpec) else 0.0)
        ramp_start = time.monotonic()
        started = 0
        for spec in order:
            start = spec.shift_start_s if isinstance(spec, UnitSpec) else 0.0
            if self.clock.now_ms() < self.t_ms(start):
                await self.clock.sleep_until(self.t_ms(start))
                ramp_start, started = time.monotonic(), 0
            ahead = started - (time.monotonic() - ramp_start) * rate
            if ahead >= 1:
                await asyncio.sleep(ahead / rate)
            elif started % 10 == 0:
                await asyncio.sleep(0)  # behind schedule: catch up, but let the devices run too
            started += 1
            try:
                device = self._build(spec)
            except (BluelightError, OSError, sqlite3.Error, ValueError) as exc:
                self.note(f"{spec.id} could not start: {exc}")
                continue
            self.devices[spec.id] = device
            assert self._tg is not None
            device.task = self._tg.create_task(self._device_main(device), name=f"device-{spec.id}")
            if isinstance(spec, UnitSpec) and spec.shift_end_s is not None:
                self._schedule(self._shift_end(device, spec.shift_end_s), f"shift-end-{spec.id}")
        _freeze_heap()

    def _schedule(self, work: Coroutine[Any, Any, None], name: str) -> None:
        assert self._tg is not None
        task = self._tg.create_task(work, name=name)
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    async def _device_main(self, device: SimDevice) -> None:
        agent = device.agent
        try:
            await agent.run()
        except* (BluelightError, OSError, sqlite3.Error, MqttError) as group:
            device.crashed = "; ".join(str(e) for e in group.exceptions)
            self.note(f"{device.id} stopped with an error: {device.crashed}")
        finally:
            device.report = self._report(device)
            agent.close()

    async def _shift_end(self, device: SimDevice, end_s: float) -> None:
        await self.clock.sleep_until(self.t_ms(end_s))
        self.note(f"{device.id} goes off shift")
        await self._drain([device], self.options.drain_s)
        device.agent.stop()

    async def _device(self, ident: str, timeout_s: float = 120.0) -> SimDevice | None:
        """The running device `ident`, waiting (real seconds) for it to start."""
        deadline = time.monotonic() + timeout_s
        while ident not in self.devices:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.05)
        return self.devices[ident]

    async def _progress_loop(self) -> None:
        if self.progress is None:
            return
        while True:
            self.progress.update(self.snapshot())
            await asyncio.sleep(self.progress.interval_s)

    # -- incidents --------------------------------------------------------------------------------
    async def _timeline(self) -> None:
        scenario = self.scenario
        for cycle in itertools.count():
            offset = cycle * scenario.duration_s
            for incident in scenario.incidents:
                if not self.options.forever and incident.at_s >= scenario.duration_s:
                    return
                record = IncidentRecord(incident)
                self.incident_records.append(record)
                await self.clock.sleep_until(self.t_ms(offset + incident.at_s))
                record.what, record.expected = await self._trigger(incident, self.t_ms(offset + incident.at_s))
                record.done = True
            if not (scenario.repeat and self.options.forever):
                return
            await self.clock.sleep_until(self.t_ms(offset + scenario.duration_s))

    async def _trigger(self, inc: Incident, t_ms: int) -> tuple[str, int | None]:
        """Make the incident happen to the models; returns what was done and, when known,
        how many sensors will report it."""
        self._truth(t_ms, "incident", type=inc.type, unit=inc.unit,
                    lat=inc.place[0] if inc.place else None, lon=inc.place[1] if inc.place else None)
        if inc.type == "gunshot":
            assert inc.place is not None
            sensors = [d.kit.acoustic for d in self.devices.values() if d.kit.acoustic is not None]
            heard = gunshot(sensors, inc.place, t_ms, self.truth, label=f"incidents[{inc.index}]")
            text = (f"shot at {inc.place[0]:.5f}, {inc.place[1]:.5f}; {len(heard)} of {len(sensors)} acoustic "
                    "sensors detect it")
            self.note(f"incident {inc.type}: {text}")
            return text, len(heard)
        if inc.type == "hotlist_vehicle":
            text = self._hotlist(inc, t_ms)
        else:
            assert inc.unit is not None
            device = await self._device(inc.unit, timeout_s=10.0)
            if device is None:
                text = f"{inc.unit} was not running"
            else:
                text = device.kit.incident(inc.type, t_ms=t_ms, decel_g=inc.decel_g, on=inc.on)
        self.note(f"incident {inc.type}: {text}")
        return text, None

    def _hotlist(self, inc: Incident, t_ms: int) -> str:
        assert inc.plate is not None
        path = street_path(self.scenario.city, inc.route)
        cameras = [d.spec for d in self.devices.values() if isinstance(d.spec, SensorSpec) and d.spec.type == "anpr"]
        passes = camera_passes(path, inc.speed_mps, cameras)
        self._truth(t_ms, "vehicle_route", plate=inc.plate, speed_mps=inc.speed_mps,
                    path=[[round(p[0], 7), round(p[1], 7)] for p in path])
        assert self._tg is not None
        for p in passes:
            self._schedule(self._pass(inc.plate, p, t_ms), f"anpr-pass-{p.camera}")
        seen = ", ".join(f"{p.camera} at +{p.t_s:.0f} s" for p in passes) or "no camera on its route"
        return f"{inc.plate} drives {len(path)} junctions at {inc.speed_mps:g} m/s past {seen}"

    async def _pass(self, plate: str, p: Pass, start_ms: int) -> None:
        at = start_ms + round(p.t_s * 1000)
        await self.clock.sleep_until(at)
        device = self.devices.get(p.camera)
        if device is not None:
            device.kit.vehicle_passes(plate, at, p.bearing)

    # -- faults -------------------------------------------------------------------------------------
    async def _fault(self, record: FaultRecord) -> None:
        fault = record.fault
        await self.clock.sleep_until(self.t_ms(fault.at_s))
        devices: list[SimDevice] = []
        for ident in fault.units:
            device = await self._device(ident)
            if device is None:
                record.injected.append(f"{ident} never started")
                return
            devices.append(device)
        self._truth(self.t_ms(fault.at_s), "fault", type=fault.type, units=list(fault.units), at_s=fault.at_s)
        handler: Callable[[FaultRecord, list[SimDevice]], Any] = getattr(self, f"_fault_{fault.type}")
        try:
            await handler(record, devices)
        finally:
            record.done = True

    def _made(self, devices: Sequence[SimDevice]) -> int:
        return sum(d.agent.outbox.next_seq for d in devices)

    async def _cut(self, proxies: Sequence[CutProxy], devices: Sequence[SimDevice], down_s: float) -> int:
        """Cut `proxies` for `down_s` sim seconds; returns messages made meanwhile."""
        made = self._made(devices)
        for proxy in proxies:
            await proxy.cut()
        try:
            await self.clock.sleep(down_s)
        finally:
            for proxy in proxies:
                await proxy.restore()
        return self._made(devices) - made

    async def _fault_link_outage(self, record: FaultRecord, devices: list[SimDevice]) -> None:
        fault = record.fault
        ids = ", ".join(d.id for d in devices)
        record.injected.append(f"link cut for {fault.for_s:g} s")
        self.note(f"fault: cutting the link of {ids} for {fault.for_s:g} s")
        record.facts["made_while_down"] = await self._cut([d.proxy for d in devices if d.proxy], devices, fault.for_s)
        self.note(f"fault: link of {ids} restored")

    async def _fault_link_flap(self, record: FaultRecord, devices: list[SimDevice]) -> None:
        fault = record.fault
        proxies = [d.proxy for d in devices if d.proxy]
        record.injected.append(f"link flapping: {fault.cycles} x ({fault.down_s:g} s down, {fault.up_s:g} s up)")
        self.note(f"fault: link of {', '.join(d.id for d in devices)} starts flapping")
        made = 0
        for _ in range(fault.cycles):
            made += await self._cut(proxies, devices, fault.down_s)
            await self.clock.sleep(fault.up_s)
        record.facts["made_while_down"] = made

    async def _fault_broker_outage(self, record: FaultRecord, _devices: list[SimDevice]) -> None:
        fault = record.fault
        proxies = [*self.proxies.values(), *([self.shared_proxy] if self.shared_proxy else [])]
        everyone = list(self.devices.values())
        record.injected.append(
            f"every device cut off from the broker for {fault.for_s:g} s ({len(everyone):,} devices)"
        )
        self.note(f"fault: broker outage for {fault.for_s:g} s")
        self._outage = True
        try:
            record.facts["made_while_down"] = await self._cut(proxies, everyone, fault.for_s)
        finally:
            self._outage = False
        self.note("fault: broker reachable again")

    async def _fault_clock_skew(self, record: FaultRecord, devices: list[SimDevice]) -> None:
        fault = record.fault
        for d in devices:
            d.clock.offset_ms = fault.offset_ms
        record.facts["skewed_units"] = [d.id for d in devices]
        record.injected.append(f"device clock set {fault.offset_ms / 1000:+g} s off")
        self.note(f"fault: clock of {fault.unit} now {fault.offset_ms / 1000:+g} s off")

    async def _fault_gps_jump(self, record: FaultRecord, devices: list[SimDevice]) -> None:
        fault = record.fault
        done = devices[0].kit.gps_jump(fault.offset_m, fault.for_s, self.t_ms(fault.at_s))
        record.facts["unsupported"] = not done
        what = f"GNSS position jumps {fault.offset_m:g} m for {fault.for_s:g} s"
        record.injected.append(what if done else "the device has no GNSS")
        self.note(f"fault: {fault.unit}: {what}")

    async def _fault_gps_loss(self, record: FaultRecord, devices: list[SimDevice]) -> None:
        fault = record.fault
        done = devices[0].kit.gps_loss(fault.for_s, self.t_ms(fault.at_s))
        record.facts["unsupported"] = not done
        record.injected.append(f"GNSS fix lost for {fault.for_s:g} s" if done else "the device has no GNSS")
        self.note(f"fault: GNSS of {fault.unit} loses its fix for {fault.for_s:g} s")

    async def _fault_sensor_dropout(self, record: FaultRecord, devices: list[SimDevice]) -> None:
        fault = record.fault
        names = devices[0].kit.dropout(fault.for_s, fault.sensor, self.t_ms(fault.at_s))
        record.facts["unsupported"] = not names
        what = ", ".join(names) or "nothing"
        record.injected.append(f"sensors silent for {fault.for_s:g} s: {what}")
        self.note(f"fault: {fault.unit}'s {what} drop out for {fault.for_s:g} s")

    async def _fault_revoked(self, record: FaultRecord, devices: list[SimDevice]) -> None:
        device = devices[0]
        agent = device.agent
        facts = record.facts
        facts["seq_at_revoke"] = agent.outbox.next_seq - 1
        failures_before = agent.link.stats.publish_failures.total()
        if device.refused_as == "revoked":
            record.injected.append("certificate already revoked before this run")
        else:
            await asyncio.to_thread(self.pki.revoke, device.id)
            if self.options.on_revoke is not None:
                self.options.on_revoke()
            record.injected.append("certificate revoked (CRL re-signed); the device keeps trying")
        device.refused_as = "revoked"
        self.note(f"fault: certificate of {device.id} revoked")
        # Give the broker's and gateway's CRL watchers (0.5 s) time to notice.
        await asyncio.sleep(1.5)
        facts["seq_limit"] = agent.outbox.next_seq - 1
        await self.clock.sleep(record.fault.reconnect_after_s)
        connects = agent.link.stats.connects
        attempts = device.proxy.accepted if device.proxy is not None else 0
        agent.link.sever()
        record.injected.append(
            f"its connection dropped after {record.fault.reconnect_after_s:g} s to force a reconnect"
        )
        facts["connects_before"] = connects
        facts["attempts_before"] = attempts
        facts["failures_before"] = failures_before

    async def _fault_forged(self, record: FaultRecord, devices: list[SimDevice]) -> None:
        device = devices[0]
        record.facts["first_forged_seq"] = device.agent.outbox.next_seq
        device.signer.forge()
        device.refused_as = "forged"
        record.injected.append(f"signs from seq {record.facts['first_forged_seq']} with a key its certificate "
                               "does not hold")
        self.note(f"fault: {device.id} now signs with a forged key")

    async def _fault_replay(self, record: FaultRecord, devices: list[SimDevice]) -> None:
        device = devices[0]
        capture = device.capture
        assert capture is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            held = set(device.agent.outbox.seqs()) if capture.done else set()
            if capture.done and not held & {c.seq for c in capture.rows}:
                break
            await asyncio.sleep(0.2)
        if not capture.rows:
            record.injected.append("nothing captured to replay")
            return
        host, port = parse_hostport(self.options.broker)
        messages = [(uplink(device.id, c.kind), c.data) for c in capture.rows]
        acked = await publish_raw(
            self.pki, identity=device.id, host=host, port=port, client_id=f"{device.id}-replay", messages=messages
        )
        seqs = [c.seq for c in capture.rows]
        record.facts.update(acked=acked, seqs=seqs)
        record.injected.append(f"re-published {acked} captured messages (seqs {seqs[0]}-{seqs[-1]}) byte for byte")
        self.note(f"fault: replayed {acked} captured messages of {device.id}")

    async def _fault_malformed(self, record: FaultRecord, devices: list[SimDevice]) -> None:
        device = devices[0]
        rng = random.Random(derive_seed(self.scenario.seed, "malformed", device.id))
        payloads = garbage_payloads(record.fault.count, rng)
        host, port = parse_hostport(self.options.broker)
        acked = await publish_raw(
            self.pki, identity=device.id, host=host, port=port, client_id=f"{device.id}-junk",
            messages=[(uplink(device.id, "telemetry"), data) for _, data in payloads],
        )
        expected = Counter(reason for reason, _ in payloads[:acked])
        record.facts.update(acked=acked, expected=dict(expected))
        kinds = ", ".join(f"{n} {reason}" for reason, n in expected.items())
        record.injected.append(f"published {acked} garbage payloads on its own topic ({kinds})")
        self.note(f"fault: {device.id} published {acked} malformed payloads")

    # -- the end ---------------------------------------------------------------------------------------
    def _healthy(self, devices: Sequence[SimDevice]) -> list[SimDevice]:
        return [d for d in devices if not d.refused_as and not d.crashed and d.task is not None and not d.task.done()]

    async def _drain(self, devices: Sequence[SimDevice], timeout_s: float) -> bool:
        """Power the sensors off and wait until the outboxes are empty (receipted)."""
        for d in devices:
            d.power.clear()
            d.agent.stop_answering()
        deadline = time.monotonic() + timeout_s
        waiting = list(devices)
        while True:
            waiting = [d for d in self._healthy(waiting) if d.agent.outbox.stats().total > 0]
            if not waiting:
                return True
            if time.monotonic() > deadline:
                self.note(f"{len(waiting):,} devices still hold unconfirmed messages after {timeout_s:g} s "
                          f"(e.g. {waiting[0].id})")
                return False
            await asyncio.sleep(0.5)

    async def _finish(self, api: GatewayApi | None) -> tuple[int, dict[str, dict[str, Any]] | None]:
        """Restore links, switch sensors off, drain, stop every agent gracefully. Returns
        the devices online after draining and, for clock-skew faults, the gateway's device
        view taken then (every device's last message was made at the same moment)."""
        for proxy in [*self.proxies.values(), *([self.shared_proxy] if self.shared_proxy else [])]:
            await proxy.restore()
        devices = list(self.devices.values())
        self.note(f"end of the scenario: sensors off, waiting up to {self.options.drain_s:g} s for receipts")
        await self._drain(devices, self.options.drain_s)
        online = sum(d.agent.link.connected.is_set() for d in devices)
        skew_view = None
        if api is not None and any(f.type == "clock_skew" for f in self.scenario.faults):
            skew_view, _ = await self._gateway_devices(api)
        for record in self.fault_records:
            if record.fault.type == "revoked" and record.fault.unit in self.devices:
                self._revoked_facts(record, self.devices[record.fault.unit])
        for d in devices:
            d.agent.stop()
        tasks = [d.task for d in devices if d.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=15)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        return online, skew_view

    def _revoked_facts(self, record: FaultRecord, device: SimDevice) -> None:
        facts = record.facts
        if "connects_before" not in facts:
            return
        stats = device.agent.link.stats
        facts["connects_after"] = stats.connects - facts["connects_before"]
        facts["publish_refused"] = stats.publish_failures.total() - facts["failures_before"]
        if device.proxy is not None:
            facts["reconnect_attempts"] = device.proxy.accepted - facts["attempts_before"]

    def _report(self, device: SimDevice) -> DeviceReport:
        agent = device.agent
        stats = agent.outbox.stats()
        return DeviceReport(
            id=device.id,
            type=device.spec.type,
            first_seq=agent.first_seq,
            next_seq=agent.outbox.next_seq,
            held=stats.held,
            pending=stats.total,
            sent=agent.outbox.sent,
            confirmed=agent.outbox.confirmed,
            connects=agent.link.stats.connects,
            publish_failures=agent.link.stats.publish_failures.total(),
            started=True,
            events=list(agent.events),
            unconfirmed=frozenset(agent.outbox.seqs()),
            refused_as=device.refused_as,
        )

    async def _gateway_stats(self, api: GatewayApi | None) -> tuple[dict[str, Any] | None, str | None]:
        if api is None:
            return None, None
        try:
            return await asyncio.to_thread(api.stats), None
        except GatewayUnavailable as exc:
            return None, str(exc)

    async def _gateway_devices(self, api: GatewayApi) -> tuple[dict[str, dict[str, Any]] | None, str | None]:
        try:
            return await asyncio.to_thread(api.devices), None
        except GatewayUnavailable as exc:
            return None, str(exc)

    async def _summarise(
        self,
        api: GatewayApi | None,
        before: Mapping[str, Any] | None,
        error: str | None,
        online: int,
        skew_view: Mapping[str, Mapping[str, Any]] | None,
    ) -> Summary:
        reports = [d.report or self._report(d) for d in self.devices.values()]
        reports += [
            DeviceReport(ident, spec.type, 0, 0, 0, 0, 0, 0, 0, 0, started=False)
            for ident, spec in self.specs.items() if ident not in self.devices
        ]
        after, devices = None, None
        if api is not None:
            # The last messages (a graceful stop's offline status) may still be on their
            # way through the broker and the gateway's batch: wait for them a while.
            wanted = [r for r in reports if r.started and not r.refused_as and r.produced]
            deadline = time.monotonic() + 20
            while True:
                after, error = await self._gateway_stats(api)
                devices, dev_error = await self._gateway_devices(api)
                error = error or dev_error
                if devices is not None and all(r.stored_at(devices.get(r.id)) for r in wanted):
                    break
                if time.monotonic() > deadline or error is not None:
                    break
                await asyncio.sleep(0.5)
        return assess(
            self.scenario,
            devices=reports,
            faults=self.fault_records,
            incidents=self.incident_records,
            stats_before=before,
            stats_after=after,
            gateway_devices=devices,
            gateway_error=error,
            sim_s=self.clock.elapsed_s(),
            real_s=time.monotonic() - self._real_start,
            online=online,
            skew_view=skew_view,
        )


async def run_fleet(
    scenario: Scenario,
    options: FleetOptions,
    *,
    progress: Progress | None = None,
    echo: Callable[[str], None] | None = None,
) -> Summary:
    """Run `scenario` against the broker (and gateway) in `options`; return the summary."""
    return await Fleet(scenario, options, progress=progress, echo=echo).run()


async def run_demo_fleet(
    pki_dir: Path,
    broker: str,
    *,
    gateway_api: str | None = None,
    run_dir: Path | None = None,
    seed: int = 1,
    devices: int | None = None,
    speed: float = 1.0,
    echo: Callable[[str], None] = print,
    scenario: str = "demo",
) -> None:
    """`bluelight demo`'s fleet: the built-in `demo` scenario, in real time (or `speed`
    times faster), repeating its incidents until cancelled (Ctrl-C). Issues the devices'
    certificates in `pki_dir`."""
    from firmware_sim.scenario import load_scenario  # noqa: PLC0415 - avoid a cycle at import

    loaded = load_scenario(scenario, seed=seed, devices=devices, speed=speed)
    options = FleetOptions(pki_dir=pki_dir, broker=broker, run_dir=run_dir, gateway_api=gateway_api, forever=True)
    await run_fleet(loaded, options, echo=echo)


__all__ = [
    "OPERATOR_ID", "Fleet", "FleetError", "FleetOptions", "Pass", "SimAgent", "SimDevice", "camera_passes",
    "closed_route", "run_demo_fleet", "run_fleet", "street_path", "unit_routes",
]
