"""Drivers: where readings come from. A driver is any object with
`async def readings(self, clock) -> AsyncIterator[Reading]`; the agent signs and
queues each reading it yields. Simulated drivers live here; real ones come later."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Reading:
    """One thing a driver observed: a message `kind` and its data-model body."""

    kind: str
    body: Mapping[str, Any] = field(default_factory=dict)


class Clock(Protocol):
    """Time as the agent sees it: UTC milliseconds and a sleep in the same time base,
    so a simulator can run faster than real time."""

    def now_ms(self) -> int: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """Wall-clock UTC milliseconds and `asyncio.sleep`."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class Driver(Protocol):
    """A source of readings; iterating it runs the device (or the simulation)."""

    def readings(self, clock: Clock) -> AsyncIterator[Reading]: ...


__all__ = ["Clock", "Driver", "Reading", "SystemClock"]
