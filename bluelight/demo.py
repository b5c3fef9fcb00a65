"""`bluelight demo`: the whole platform on one box, from nothing.

A throw-away PKI in a work directory, the Mosquitto broker, the gateway, and a fleet
of simulated units driving loops around central London, one of them pressing its panic
button now and then. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bluelight.broker import Broker, BrokerSettings
from certs.pki import Pki
from edge_agent.agent import Agent
from edge_agent.errors import BluelightError, ConfigError
from edge_agent.settings import AgentSettings
from edge_agent.wire.geo import LatLon, offset
from edge_agent.wire.ids import Role

log = logging.getLogger(__name__)

CENTRE: LatLon = (51.5074, -0.1278)
OPERATOR_ID = "control-room"


class DemoError(BluelightError):
    """The demo could not start or a part of it stopped."""


@dataclass(frozen=True)
class DemoSettings:
    """Where the demo keeps its files, which ports it uses and how big the fleet is."""

    work_dir: Path = Path("var/demo")
    units: int = 10
    broker_port: int = 8883
    http_port: int = 8443
    panic_every_s: float = 60.0
    seed: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.units <= 500:
            raise ConfigError("--units must be 1-500 (the fleet simulator scales further)")
        if self.panic_every_s <= 0:
            raise ConfigError("--panic-every must be > 0 seconds")


def patrol_loop(rng: random.Random) -> tuple[LatLon, ...]:
    """A closed patrol loop of 6-8 waypoints, 300-900 m across, within ~2 km of the centre."""
    centre = offset(CENTRE, rng.uniform(-2000, 2000), rng.uniform(-2000, 2000))
    radius = rng.uniform(300, 900)
    count = rng.randint(6, 8)
    points = []
    for i in range(count):
        angle = 2 * math.pi * i / count
        wobble = rng.uniform(0.7, 1.2)
        north = radius * wobble * math.cos(angle)
        east = radius * wobble * math.sin(angle)
        points.append(offset(centre, north, east))
    return tuple(points)


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


def prepare_pki(settings: DemoSettings) -> tuple[Pki, list[str]]:
    """A fresh PKI: CAs, broker, gateway, one operator and one device per unit."""
    work = settings.work_dir
    for stale in ("pki", "broker", "agents"):
        shutil.rmtree(work / stale, ignore_errors=True)
    for db in work.glob("gateway.db*"):
        db.unlink()
    pki = Pki(work / "pki")
    pki.init()
    pki.issue(Role.OPERATOR, OPERATOR_ID)
    units = [f"unit-{i:03d}" for i in range(1, settings.units + 1)]
    for unit in units:
        pki.issue(Role.DEVICE, unit)
    return pki, units


def instructions(settings: DemoSettings, pki: Pki) -> str:
    op = pki.identity(OPERATOR_ID)
    broker = f"localhost:{settings.broker_port}"
    api = f"https://localhost:{settings.http_port}/api/v1"
    return "\n".join(
        [
            f"Bluelight demo: {settings.units} units on mqtts://{broker}, gateway API {api}",
            f"  live stream:   bluelight tail --pki {pki.root} --broker {broker}",
            f"  devices:       curl --cacert {pki.ca_bundle} --cert {op.chain} --key {op.key} {api}/devices",
            f"  stats:         curl --cacert {pki.ca_bundle} --cert {op.chain} --key {op.key} {api}/stats",
            f"  API docs:      {api}/docs (client certificate {op.chain} required)",
            "Ctrl-C stops everything.",
        ]
    )


async def run_demo(settings: DemoSettings, *, echo: Callable[[str], None] = print) -> None:
    """Start broker, gateway and fleet; run until cancelled."""
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    _require_free(settings.broker_port, "--broker-port")
    _require_free(settings.http_port, "--http-port")
    echo(f"demo: preparing a throw-away PKI and {settings.units} unit certificates in {settings.work_dir}")
    pki, units = await asyncio.to_thread(prepare_pki, settings)
    rng = random.Random(settings.seed)
    broker_settings = BrokerSettings(
        pki_dir=pki.root, port=settings.broker_port, data_dir=settings.work_dir / "broker"
    )
    async with Broker(broker_settings) as broker:
        assert broker.process is not None
        proc = broker.process
        await _wait_port(settings.broker_port, 10, "mosquitto", lambda: proc.returncode is None)
        gateway = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bluelight", "gateway", "run",
            "--pki", str(pki.root), "--broker", f"localhost:{settings.broker_port}",
            "--db", str(settings.work_dir / "gateway.db"), "--http-port", str(settings.http_port),
        )
        try:
            await _wait_port(settings.http_port, 20, "the gateway", lambda: gateway.returncode is None)
            agents = [
                Agent(
                    AgentSettings(
                        pki_dir=pki.root,
                        id=unit,
                        broker=f"localhost:{settings.broker_port}",
                        outbox=settings.work_dir / "agents" / f"{unit}.db",
                        route=patrol_loop(rng),
                        speed_mps=rng.uniform(1.4, 12.0),
                        seed=rng.randrange(2**31),
                        sync="normal",
                        progress_every_s=0,
                    )
                )
                for unit in units
            ]
            echo(instructions(settings, pki))
            with contextlib.ExitStack() as stack:
                for agent in agents:
                    stack.enter_context(agent)
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(_watch(broker.supervise(), "mosquitto"), name="broker")
                    tg.create_task(_watch(gateway.wait(), "the gateway"), name="gateway")
                    for agent in agents:
                        tg.create_task(agent.run(), name=f"agent-{agent.id}")
                    tg.create_task(_panics(agents, settings.panic_every_s, rng, echo), name="panics")
        finally:
            if gateway.returncode is None:
                gateway.terminate()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(gateway.wait(), 10)
            if gateway.returncode is None:
                gateway.kill()
                await gateway.wait()


async def _watch(waiting: object, what: str) -> None:
    code = await waiting  # type: ignore[misc]
    raise DemoError(f"{what} exited with status {code}; see its log above")


async def _panics(agents: list[Agent], every_s: float, rng: random.Random, echo: Callable[[str], None]) -> None:
    """Now and then a unit's officer presses the panic button."""
    while True:
        await asyncio.sleep(rng.uniform(0.5, 1.5) * every_s)
        agent = rng.choice(agents)
        agent.panic.press()
        echo(f"demo: {agent.id} pressed panic")
