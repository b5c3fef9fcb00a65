"""A simulated panic button: pressed by `press()` (the agent wires SIGUSR1 to it) and/or
at configured seconds after start. Each press is an `event` alarm
`{"type": "panic", "lat", "lon", "acc", "detail": {"source": ...}}`, with the position
from the GPS driver when one is known."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

from edge_agent.drivers import Clock, Reading
from edge_agent.drivers.gps import Fix


class SimulatedPanicButton:
    """Presses become panic events. `position` returns the latest fix, or None."""

    def __init__(self, *, at_s: Sequence[float] = (), position: Callable[[], Fix | None] | None = None) -> None:
        if any(t < 0 for t in at_s):
            raise ValueError("panic times must be >= 0 seconds after start")
        self.at_s = tuple(sorted(at_s))
        self._position = position
        self._presses: asyncio.Queue[str] = asyncio.Queue()
        self.pressed = 0

    def press(self, source: str = "button") -> None:
        """Press the button; safe to call from a loop signal handler."""
        self._presses.put_nowait(source)

    def event_body(self, source: str) -> dict[str, Any]:
        body: dict[str, Any] = {"type": "panic", "detail": {"source": source}}
        fix = self._position() if self._position is not None else None
        if fix is not None:
            body.update(lat=fix.lat, lon=fix.lon, acc=fix.acc)
        return body

    async def readings(self, clock: Clock) -> AsyncGenerator[Reading, None]:
        start = clock.now_ms()
        schedule = list(self.at_s)
        while True:
            source = await self._next_press(clock, start, schedule)
            self.pressed += 1
            yield Reading("event", self.event_body(source))

    async def _next_press(self, clock: Clock, start_ms: int, schedule: list[float]) -> str:
        """Wait for a press or the next scheduled time, whichever comes first."""
        if not schedule:
            return await self._presses.get()
        delay = max(0.0, start_ms / 1000.0 + schedule[0] - clock.now_ms() / 1000.0)
        get = asyncio.create_task(self._presses.get(), name="panic-press")
        nap = asyncio.create_task(clock.sleep(delay), name="panic-schedule")
        try:
            await asyncio.wait({get, nap}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            get.cancel()
            nap.cancel()
        if get.done() and not get.cancelled():
            return get.result()
        schedule.pop(0)
        return "schedule"
