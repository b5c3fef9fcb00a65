"""What the sensor models share: a seeded RNG, the truth log, dropouts, and the event
queue + async shell of the event-driven models.

A model's core is pure: trigger methods (`fall`, `impulse`, ...) take an optional
`at_ms` and schedule readings at sim times; `due(t_ms)` returns the readings whose
time has come. `readings(clock)` is the thin driver loop that sleeps on the injected
clock until the next reading is due or a trigger arrives. Trigger times default to
"now" on the clock the driver runs on; pass `at_ms` for runs that must reproduce
exactly (a real-time clock's "now" depends on the event loop's timing).
"""

from __future__ import annotations

import asyncio
import heapq
import random
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from edge_agent.drivers import Clock, Reading
from edge_agent.drivers.gps import Fix
from firmware_sim.truth import TruthLog

#: Reported as `status.firmware` by every simulated device.
FIRMWARE_VERSION = "bluelight-sim/0.1.0"

#: Where a device thinks it is (its last GNSS fix), for the position of its events.
PositionSource = Callable[[], Fix | None]


def sub_seed(seed: int | None, *parts: object) -> int:
    """A seed for one model of one device, derived from the run's seed (stable across
    Python versions and processes: string seeds are hashed with SHA-512)."""
    return random.Random(":".join(map(str, (seed, *parts)))).getrandbits(63)


class NotStarted(RuntimeError):
    """A trigger without `at_ms` before the model's driver has started (no clock yet)."""


class Model:
    """Base of every model: device name, seeded RNG, optional truth log, dropouts."""

    name = "model"

    def __init__(self, *, seed: int | None, truth: TruthLog | None, device: str) -> None:
        self.device = device
        self.seed = seed
        self.rng = random.Random(seed)
        self.truth = truth
        self._clock: Clock | None = None
        self.start_ms: int | None = None
        self._dropouts: list[tuple[int, int]] = []

    def _record(self, t_ms: int, kind: str, **fields: Any) -> None:
        if self.truth is not None:
            self.truth.record(t_ms, kind, device=self.device, **fields)

    def _now(self, at_ms: float | None) -> int:
        if at_ms is not None:
            return round(at_ms)
        if self._clock is not None:
            return self._clock.now_ms()
        raise NotStarted(f"{self.device or self.name}: pass at_ms before the driver has started")

    def _started(self, clock: Clock) -> int:
        self._clock = clock
        now = clock.now_ms()
        if self.start_ms is None:
            self.start_ms = now
        return now

    def drop_out(self, duration_s: float, at_ms: int | None = None) -> None:
        """No readings from `at_ms` (default now) for `duration_s` (the sensor-dropout fault)."""
        if duration_s <= 0:
            raise ValueError("duration must be > 0")
        start = self._now(at_ms)
        self._dropouts.append((start, start + round(duration_s * 1000)))
        self._record(start, "dropout", model=self.name, duration_s=duration_s)

    def dropped(self, t_ms: int) -> bool:
        """True while a dropout covers `t_ms`."""
        return any(a <= t_ms < b for a, b in self._dropouts)


@dataclass(order=True)
class _Due:
    t_ms: int
    order: int
    make: Callable[[int], Reading | None] = field(compare=False)
    tag: str = field(default="", compare=False)
    cancelled: bool = field(default=False, compare=False)


class EventModel(Model):
    """A model whose readings are scheduled: events after triggers, or periodic ones.
    `position` (the device's last fix) is added to events that ask for it."""

    def __init__(
        self, *, seed: int | None, truth: TruthLog | None, device: str, position: PositionSource | None = None
    ) -> None:
        super().__init__(seed=seed, truth=truth, device=device)
        self.position = position
        self._queue: list[_Due] = []
        self._order = 0
        self._wake: asyncio.Event | None = None
        self.emitted = 0
        self.suppressed = 0

    def _schedule(self, t_ms: int, make: Callable[[int], Reading | None], *, tag: str = "") -> None:
        self._order += 1
        heapq.heappush(self._queue, _Due(int(t_ms), self._order, make, tag))
        if self._wake is not None:
            self._wake.set()

    def _event(self, t_ms: int, body: dict[str, Any], *, tag: str = "", locate: bool = True) -> None:
        """Schedule an `event` reading at `t_ms`, with the device's position at that time."""

        def make(_: int) -> Reading:
            out = dict(body)
            fix = self.position() if locate and self.position is not None else None
            if fix is not None:
                out.update(lat=fix.lat, lon=fix.lon, acc=fix.acc)
            return Reading("event", out)

        self._schedule(t_ms, make, tag=tag)

    def _cancel(self, tag: str, after_ms: int) -> int:
        """Cancel pending readings tagged `tag` due after `after_ms`; return how many."""
        n = 0
        for item in self._queue:
            if item.tag == tag and not item.cancelled and item.t_ms > after_ms:
                item.cancelled = True
                n += 1
        return n

    def pending(self, tag: str | None = None) -> int:
        return sum(1 for i in self._queue if not i.cancelled and (tag is None or i.tag == tag))

    def next_due_ms(self) -> int | None:
        while self._queue and self._queue[0].cancelled:
            heapq.heappop(self._queue)
        return self._queue[0].t_ms if self._queue else None

    def due(self, t_ms: int) -> list[Reading]:
        """Readings due by `t_ms`, oldest first; those due in a dropout are lost."""
        out: list[Reading] = []
        while (nxt := self.next_due_ms()) is not None and nxt <= t_ms:
            item = heapq.heappop(self._queue)
            reading = item.make(item.t_ms)
            if reading is None:
                continue
            if self.dropped(item.t_ms):
                self.suppressed += 1
                self._record(item.t_ms, "suppressed", model=self.name, reading=reading.kind,
                             type=reading.body.get("type", reading.kind))
                continue
            self.emitted += 1
            out.append(reading)
        return out

    def on_start(self, t_ms: int) -> None:
        """Hook: schedule what the device does when it starts."""

    async def readings(self, clock: Clock) -> AsyncGenerator[Reading, None]:
        self._wake = asyncio.Event()
        self.on_start(self._started(clock))
        while True:
            for reading in self.due(clock.now_ms()):
                yield reading
            await self._wait(clock, self.next_due_ms())

    async def _wait(self, clock: Clock, due_ms: int | None) -> None:
        """Until `due_ms` on the clock or the next trigger, whichever is first."""
        wake = self._wake
        assert wake is not None
        if due_ms is None:
            await wake.wait()
            wake.clear()
            return
        delay = (due_ms - clock.now_ms()) / 1000.0
        if delay <= 0:
            return
        if wake.is_set():
            wake.clear()
            return
        nap = asyncio.create_task(clock.sleep(delay), name=f"{self.device}-{self.name}-sleep")
        kick = asyncio.create_task(wake.wait(), name=f"{self.device}-{self.name}-wake")
        try:
            await asyncio.wait({nap, kick}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            nap.cancel()
            kick.cancel()
        wake.clear()


__all__ = ["FIRMWARE_VERSION", "EventModel", "Model", "NotStarted", "PositionSource", "sub_seed"]
