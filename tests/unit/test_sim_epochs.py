"""The fleet's epoch scheduler: the same NMEA and readings as a receiver on its own task."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest

from edge_agent.drivers import Reading
from edge_agent.drivers.nmea import NmeaGps
from firmware_sim.clock import SimClock, SkewedClock
from firmware_sim.epochs import EpochScheduler
from firmware_sim.models.gnss import GnssReceiver

ROUTE = [(51.5007, -0.1246), (51.5033, -0.1195), (51.5055, -0.1130), (51.5007, -0.1246)]


def _receiver(seed: int) -> tuple[GnssReceiver, NmeaGps]:
    gnss = GnssReceiver(ROUTE, 9.0, seed=seed, device=f"t-{seed}")
    gnss.phase_ms = 130 * seed % 1000  # NMEA times have centiseconds
    return gnss, NmeaGps(gnss.sentences)


def _key(r: Reading) -> tuple[Any, ...]:
    return r.body["fix_ts"], r.body["lat"], r.body["lon"], r.body.get("speed")


async def test_scheduled_receivers_report_what_a_driver_task_would() -> None:
    # The clock stands still until the receiver on its own task has started, so both
    # ways take their first epoch from the same instant (at 50x an epoch is 20 ms of
    # real time: a busy machine could otherwise start the task an epoch later).
    t0 = time.monotonic()
    standing = [True]
    clock = SimClock(speed=50, monotonic=lambda: t0 if standing[0] else time.monotonic())
    epochs = EpochScheduler(clock, speed=clock.speed)
    scheduled: dict[int, list[Reading]] = {s: [] for s in (1, 2, 3)}
    for seed, out in scheduled.items():
        gnss, gps = _receiver(seed)
        epochs.add(gnss, gps, clock, emit=out.append, alive=lambda: True)
    alone: list[Reading] = []
    gnss, gps = _receiver(1)

    async def pump() -> None:
        async for reading in gps.readings(clock):  # endless: appended as they come
            alone.append(reading)  # noqa: PERF401

    task = asyncio.create_task(pump())
    while gnss.start_ms is None:
        await asyncio.sleep(0)
    standing[0] = False
    await asyncio.sleep(0.5)  # 25 simulated seconds
    epochs.close()
    task.cancel()
    for out in scheduled.values():
        assert len(out) >= 20
        times = [r.body["fix_ts"] for r in out]
        assert all(b - a == 1000 for a, b in itertools.pairwise(times))  # every epoch, in order
    n = min(len(alone), len(scheduled[1]))
    assert n >= 20
    assert [_key(r) for r in scheduled[1][:n]] == [_key(r) for r in alone[:n]]  # same seed, same fixes
    assert {r.body["fix_ts"] % 1000 for r in scheduled[2]} == {260}  # its own phase


async def test_stopped_failing_and_skewed_receivers() -> None:
    clock = SimClock(speed=50)
    epochs = EpochScheduler(clock, speed=clock.speed)
    powered = [True]
    stopped: list[Reading] = []
    gnss, gps = _receiver(4)
    epochs.add(gnss, gps, clock, emit=stopped.append, alive=lambda: powered[0])
    failures: list[BaseException] = []

    def broken(_: Reading) -> None:
        raise RuntimeError("disk full")

    gnss, gps = _receiver(5)
    epochs.add(gnss, gps, clock, emit=broken, alive=lambda: True, failed=failures.append)
    skewed_clock = SkewedClock(clock, offset_ms=-3_000)
    skewed: list[Reading] = []
    gnss, gps = _receiver(6)
    epochs.add(gnss, gps, skewed_clock, emit=skewed.append, alive=lambda: True)
    await asyncio.sleep(0.2)
    powered[0] = False
    seen = len(stopped)
    skewed_clock.offset_ms = 60_000  # the clock jumps a minute ahead: epochs skip to the present
    await asyncio.sleep(0.2)
    epochs.close()
    assert seen >= 5
    assert len(stopped) == seen  # powered off: no more epochs
    assert len(failures) == 1
    assert isinstance(failures[0], RuntimeError)
    times = [r.body["fix_ts"] for r in skewed]
    assert any(b - a > 30_000 for a, b in itertools.pairwise(times))
    assert all(r.body["fix_ts"] % 1000 == 780 for r in skewed)


def test_loop_factory_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_agent import eventloop  # noqa: PLC0415

    monkeypatch.setenv(eventloop.LOOP_ENV, "asyncio")
    assert eventloop.loop_factory() is None
    assert eventloop.run(_name()) == "asyncio"
    monkeypatch.delenv(eventloop.LOOP_ENV)
    uvloop = pytest.importorskip("uvloop")
    assert eventloop.loop_factory() is uvloop.new_event_loop
    assert eventloop.run(_name()) == "uvloop"


async def _name() -> str:
    from edge_agent.eventloop import loop_name  # noqa: PLC0415

    return loop_name()
