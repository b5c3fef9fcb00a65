"""`bluelight demo`: the whole platform on one box, from nothing.

A throw-away PKI in a work directory, the Mosquitto broker, the gateway, and the
simulator's built-in `demo` scenario: 44 units (officers on foot, cars) patrolling the
built-in city, 6 fixed sensors (acoustic gunshot detectors, ANPR cameras) and an
incident every couple of minutes (panic, gunshot, hot-listed vehicle, man down, crash),
repeated until stopped. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from bluelight.broker import Broker, BrokerSettings
from certs.pki import Pki
from edge_agent.errors import BluelightError, ConfigError
from edge_agent.wire.ids import Role

if TYPE_CHECKING:
    from firmware_sim.scenario import Scenario

log = logging.getLogger(__name__)

OPERATOR_ID = "control-room"
#: The simulator scenario the demo runs.
SCENARIO = "demo"
#: Speeds the demo accepts (the simulator's own range is wider, but past ~50x one event
#: loop of ~50 agents no longer keeps up with 1 Hz devices on a small box).
MIN_SPEED, MAX_SPEED = 0.1, 100.0


class DemoError(BluelightError):
    """The demo could not start or a part of it stopped."""


@dataclass(frozen=True)
class DemoSettings:
    """Where the demo keeps its files, which ports it uses, how big and how fast the fleet is."""

    work_dir: Path = Path("var/demo")
    broker_port: int = 8883
    http_port: int = 8443
    seed: int = 1
    #: Scale the scenario's fleet to this many devices in all (None: the scenario's ~50).
    devices: int | None = None
    #: Time acceleration: 10 plays the scenario's 15-minute timeline in 90 s.
    speed: float = 1.0

    def __post_init__(self) -> None:
        for flag, port in (("--broker-port", self.broker_port), ("--http-port", self.http_port)):
            if not 1 <= port <= 65535:
                raise ConfigError(f"{flag} must be 1-65535, got {port}")
        if self.broker_port == self.http_port:
            raise ConfigError("--broker-port and --http-port must differ")
        if not MIN_SPEED <= self.speed <= MAX_SPEED:
            raise ConfigError(f"--speed must be {MIN_SPEED:g}-{MAX_SPEED:g}, got {self.speed:g}")

    @property
    def broker(self) -> str:
        return f"localhost:{self.broker_port}"

    @property
    def api(self) -> str:
        return f"https://localhost:{self.http_port}/api/v1"


def load_demo_scenario(settings: DemoSettings) -> Scenario:
    """The scenario as the demo will run it (validates --devices before anything starts)."""
    try:
        from firmware_sim.scenario import load_scenario  # noqa: PLC0415 - the simulator needs PyYAML
    except ImportError as exc:
        raise DemoError(f"the demo needs the simulator's dependencies ({exc}): pip install 'bluelight[sim]'") from None
    return load_scenario(SCENARIO, seed=settings.seed, devices=settings.devices, speed=settings.speed)


def _require_free(port: int, flag: str) -> None:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise DemoError(f"port {port} is in use: pass {flag} with a free port") from None


async def _wait_port(port: int, timeout_s: float, what: str, alive: Callable[[], bool]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if not alive():
            raise DemoError(f"{what} exited during start-up; see its log above")
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
            return
        await asyncio.sleep(0.1)
    raise DemoError(f"{what} did not open port {port} within {timeout_s:.0f} s")


def prepare_pki(settings: DemoSettings) -> Pki:
    """A fresh PKI (CAs, broker, gateway, one operator) and a fresh gateway database and
    device outboxes. Device certificates are issued by the fleet runner."""
    work = settings.work_dir
    for stale in ("pki", "broker", "sim", "agents"):
        shutil.rmtree(work / stale, ignore_errors=True)
    for db in work.glob("gateway.db*"):
        db.unlink()
    pki = Pki(work / "pki")
    pki.init()
    pki.issue(Role.OPERATOR, OPERATOR_ID)
    return pki


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}:{secs:02d}"


def timeline(scenario: Scenario) -> list[str]:
    """When each incident happens, in real time from the fleet's start."""
    speed = scenario.speed
    lines = []
    for inc in scenario.incidents:
        who = inc.unit or inc.plate or (f"at {inc.place[0]:.5f}, {inc.place[1]:.5f}" if inc.place else "")
        lines.append(f"    {_clock(inc.at_s / speed):>6}  {inc.type:<16} {who}")
    return lines


def instructions(settings: DemoSettings, pki: Pki, scenario: Scenario) -> str:
    op = pki.identity(OPERATOR_ID)
    api = settings.api
    curl = f"curl --cacert {pki.ca_bundle} --cert {op.chain} --key {op.key}"
    cycle = scenario.duration_s / scenario.speed
    pace = "real time" if scenario.speed == 1 else f"{scenario.speed:g}x real time"
    lines = [
        f"Bluelight demo: scenario '{scenario.name}' ({scenario.description})",
        f"  fleet:         {len(scenario.units)} units + {len(scenario.sensors)} fixed sensors on "
        f"mqtts://{settings.broker}, {pace}, seed {scenario.seed}",
        f"  live stream:   {sys.executable} -m bluelight tail --pki {pki.root} --broker {settings.broker}",
        f"  devices:       {curl} {api}/devices",
        f"  picture:       {curl} {api}/picture        (GeoJSON: units, sensors, incidents)",
        f"  incidents:     {curl} {api}/incidents      (each with its recommendation and alerts)",
        f"  alerts:        {curl} {api}/alerts         (sent, delivered, accepted, escalated, ...)",
        f"  live changes:  wss://{api.split('://', 1)[1]}/stream (WebSocket, same client certificate)",
        f"  stats:         {curl} {api}/stats",
        f"  audit log:     {sys.executable} -m bluelight audit verify {settings.work_dir / 'gateway.db'} "
        f"--pki {pki.root}",
        f"  API docs:      {api}/docs (client certificate {op.chain}, key {op.key})",
        f"  agents' log:   {settings.work_dir / 'sim' / 'agents.log'}",
        f"  incidents (m:ss after the fleet starts; the timeline repeats every {_clock(cycle)}):",
        *timeline(scenario),
    ]
    if scenario.speed > 1:
        lines.append("  at --speed > 1 device clocks run ahead of the gateway's, so it flags messages as skewed")
    lines.append("Ctrl-C stops everything.")
    return "\n".join(lines)


async def run_demo(settings: DemoSettings, *, echo: Callable[[str], None] = print) -> None:
    """Start broker, gateway and the demo scenario's fleet; run until cancelled."""
    # The simulator is heavy; only the demo needs it.
    from firmware_sim.fleet import HOTLIST_FILE, REGISTRY_FILE, run_demo_fleet, write_gateway_files  # noqa: PLC0415

    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    scenario = load_demo_scenario(settings)
    _require_free(settings.broker_port, "--broker-port")
    _require_free(settings.http_port, "--http-port")
    echo(f"demo: preparing a throw-away PKI in {settings.work_dir}")
    pki = await asyncio.to_thread(prepare_pki, settings)
    run_dir = settings.work_dir / "sim"
    run_dir.mkdir(parents=True, exist_ok=True)
    write_gateway_files(scenario, run_dir)  # the gateway's unit registry and ANPR hotlist
    city_map = resources.files("firmware_sim").joinpath("data/city.geojson")
    broker_settings = BrokerSettings(
        pki_dir=pki.root, port=settings.broker_port, data_dir=settings.work_dir / "broker"
    )
    async with Broker(broker_settings) as broker:
        assert broker.process is not None
        proc = broker.process
        await _wait_port(settings.broker_port, 10, "mosquitto", lambda: proc.returncode is None)
        gateway = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bluelight", "gateway", "run",
            "--pki", str(pki.root), "--broker", settings.broker,
            "--db", str(settings.work_dir / "gateway.db"), "--http-port", str(settings.http_port),
            "--registry", str(run_dir / REGISTRY_FILE), "--hotlist", str(run_dir / HOTLIST_FILE),
            "--map", str(city_map),
        )
        try:
            await _wait_port(settings.http_port, 30, "the gateway", lambda: gateway.returncode is None)
            echo(instructions(settings, pki, scenario))
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(_watch(broker.supervise(), "mosquitto"), name="broker")
                    tg.create_task(_watch(gateway.wait(), "the gateway"), name="gateway")
                    tg.create_task(
                        run_demo_fleet(
                            pki.root, settings.broker, run_dir=run_dir, seed=settings.seed,
                            devices=settings.devices, speed=settings.speed, echo=lambda line: echo(f"demo: {line}"),
                            scenario=SCENARIO,
                        ),
                        name="fleet",
                    )
            except ExceptionGroup as group:
                first = group.exceptions[0]
                if len(group.exceptions) == 1 and isinstance(first, BluelightError):
                    raise first from None  # one line on the command line
                raise
        finally:
            if gateway.returncode is None:
                gateway.terminate()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(gateway.wait(), 10)
            if gateway.returncode is None:
                gateway.kill()
                await gateway.wait()


#: Seconds a child's exit waits before it counts as a failure: Ctrl-C in a terminal
#: reaches the broker and the gateway too, and they may exit before the demo is cancelled.
EXIT_GRACE_S = 2.0


async def _watch(waiting: Awaitable[int | None], what: str) -> None:
    code = await waiting
    await asyncio.sleep(EXIT_GRACE_S)  # cancelled here when the user stopped the demo
    raise DemoError(f"{what} exited with status {code}; see its log above")

