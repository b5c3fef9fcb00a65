"""The simulator's clock: sim time runs `speed` x real time; sleeps are scaled to match."""

from __future__ import annotations

import asyncio
import time

import pytest

from edge_agent.drivers import Clock
from edge_agent.errors import ConfigError
from firmware_sim.clock import SimClock, SkewedClock


class FakeMonotonic:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_sim_time_runs_speed_times_real_time() -> None:
    mono = FakeMonotonic()
    clock = SimClock(10, start_ms=1_700_000_000_000, monotonic=mono)
    assert clock.now_ms() == 1_700_000_000_000
    mono.t += 1.5
    assert clock.now_ms() == 1_700_000_015_000
    assert clock.elapsed_s() == pytest.approx(15.0)
    assert clock.real_s(60) == pytest.approx(6.0)


def test_default_start_is_the_wall_clock() -> None:
    before = time.time_ns() // 1_000_000
    clock = SimClock()
    after = time.time_ns() // 1_000_000
    assert before <= clock.now_ms() <= after + 5


def test_it_is_an_agent_clock() -> None:
    clock: Clock = SimClock(2)
    skewed: Clock = SkewedClock(clock, 5000)
    assert skewed.now_ms() - clock.now_ms() in range(4990, 5011)


@pytest.mark.parametrize("speed", [0, -1, 0.001, 1001, float("nan"), float("inf"), True, "10"])
def test_unusable_speeds_are_refused(speed: object) -> None:
    with pytest.raises(ConfigError, match="speed"):
        SimClock(speed)  # type: ignore[arg-type]


async def test_sleep_takes_sim_seconds_over_speed() -> None:
    clock = SimClock(100)
    t0, s0 = time.monotonic(), clock.now_ms()
    await clock.sleep(5)  # 50 ms real
    real = time.monotonic() - t0
    assert 0.045 <= real < 0.5
    assert clock.now_ms() - s0 >= 5000


async def test_sleep_until_reaches_an_absolute_time_without_drift() -> None:
    clock = SimClock(50)
    target = clock.now_ms() + 3000
    for _ in range(3):
        await asyncio.sleep(0.001)
    await clock.sleep_until(target)
    assert clock.now_ms() >= target
    assert clock.now_ms() - target < 50 * 100  # at most ~0.1 s real late on a busy box
    now = clock.now_ms()
    await clock.sleep_until(now - 1000)  # in the past: returns at once
    assert clock.now_ms() - now < 50 * 100


async def test_negative_sleep_is_no_sleep() -> None:
    clock = SimClock(1)
    t0 = time.monotonic()
    await clock.sleep(-5)
    assert time.monotonic() - t0 < 0.1


def test_skewed_clock_can_jump_while_running() -> None:
    mono = FakeMonotonic()
    base = SimClock(1, start_ms=0, monotonic=mono)
    skewed = SkewedClock(base)
    assert skewed.now_ms() == 0
    skewed.offset_ms = -90_000
    assert skewed.now_ms() == -90_000
    mono.t += 1
    assert skewed.now_ms() == -89_000
