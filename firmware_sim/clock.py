"""Simulated time: the agent's `Clock` running `speed` times faster than real time.

    clock = SimClock(speed=10)          # sim time starts now (wall clock) and runs 10x
    clock.now_ms()                      # UTC ms in sim time
    await clock.sleep(60)               # 6 real seconds
    await clock.sleep_until(t_ms)       # absolute sim time: no drift over a long timeline

Sim time is `start_ms + speed * (monotonic elapsed)`, so it never jumps backwards when
the wall clock is adjusted. Every device of a run shares one `SimClock`; a device with
a clock-skew fault sees it through a `SkewedClock`.

At `speed > 1` device timestamps run ahead of the gateway's wall clock, so the gateway
flags every device as skewed: compare skew estimates between devices, not to zero.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from edge_agent.drivers import Clock
from edge_agent.errors import ConfigError

#: Speeds outside this range are refused (past ~100x the event loop cannot keep up
#: with 1 Hz devices and sleeps shorter than a millisecond lose meaning).
MIN_SPEED, MAX_SPEED = 0.01, 1000.0


def wall_ms() -> int:
    """UTC milliseconds from the system clock."""
    return time.time_ns() // 1_000_000


class SimClock:
    """A `Clock` whose time runs `speed` x real time from `start_ms` (default: now)."""

    def __init__(
        self,
        speed: float = 1.0,
        start_ms: int | None = None,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(speed, bool) or not isinstance(speed, int | float) or not math.isfinite(speed):
            raise ConfigError(f"speed must be a number, got {speed!r}")
        if not MIN_SPEED <= speed <= MAX_SPEED:
            raise ConfigError(f"speed must be in [{MIN_SPEED:g}, {MAX_SPEED:g}], got {speed:g}")
        self.speed = float(speed)
        self._monotonic = monotonic
        self._t0 = monotonic()
        self.start_ms = wall_ms() if start_ms is None else int(start_ms)

    def now_ms(self) -> int:
        """Sim time, UTC milliseconds."""
        return self.start_ms + int((self._monotonic() - self._t0) * 1000.0 * self.speed)

    def elapsed_s(self) -> float:
        """Sim seconds since the start."""
        return (self._monotonic() - self._t0) * self.speed

    def real_s(self, sim_s: float) -> float:
        """How many real seconds `sim_s` sim seconds take."""
        return sim_s / self.speed

    async def sleep(self, seconds: float) -> None:
        """Sleep `seconds` of sim time (`seconds / speed` real seconds)."""
        await asyncio.sleep(max(0.0, seconds) / self.speed)

    async def sleep_until(self, t_ms: int) -> None:
        """Sleep until sim time reaches `t_ms` (returns at once if it has)."""
        while (left := t_ms - self.now_ms()) > 0:  # noqa: ASYNC110 - waiting for a time, not a condition
            await asyncio.sleep(left / 1000.0 / self.speed)


class SkewedClock:
    """Another clock read `offset_ms` wrong (the clock-skew fault); sleeps are not skewed.
    `offset_ms` may be changed while running (a clock that jumps)."""

    def __init__(self, base: Clock, offset_ms: int = 0) -> None:
        self.base = base
        self.offset_ms = int(offset_ms)

    def now_ms(self) -> int:
        return self.base.now_ms() + self.offset_ms

    async def sleep(self, seconds: float) -> None:
        await self.base.sleep(seconds)
