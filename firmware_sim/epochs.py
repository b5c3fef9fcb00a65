"""One scheduler for every GNSS receiver of a fleet: the epochs of thousands of
simulated receivers on one timer instead of one task, timer and chain of async
generators per device.

    epochs = EpochScheduler(sim_clock)
    epochs.add(gnss, gps, clock, emit=agent.emit, alive=lambda: power.is_set())

Each epoch does what a receiver on its own task does (`GnssReceiver.sentences` feeding
`NmeaGps.readings`, pumped by the agent): at the receiver's epoch times (whole periods
of UTC plus its phase, on its `clock`) the model makes its NMEA sentences, the agent's
real NMEA driver parses them (`NmeaGps.feed`) and each reading goes to `emit` (the
agent's, which signs and commits it). It skips ahead the same way when more than
`MAX_BEHIND_EPOCHS` late, and a receiver whose clock is skewed (`SkewedClock`, offset
changed at run time) keeps its epochs on its own clock. A receiver stops for good when
`alive()` is false (sensors powered off, agent stopped), as a driver loop would.

The scheduler is a heap of (due on the shared clock, receiver) and one `call_at` timer
for the earliest; a burst of receivers due in the same millisecond is one wake-up.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.drivers import Clock, Reading
from edge_agent.drivers.nmea import NmeaGps
from firmware_sim.models.gnss import MAX_BEHIND_EPOCHS, GnssReceiver

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Receiver:
    gnss: GnssReceiver
    gps: NmeaGps
    clock: Clock
    emit: Callable[[Reading], object]
    alive: Callable[[], bool]
    failed: Callable[[BaseException], None] | None
    #: The next epoch, UTC ms on `clock`.
    t_ms: int


class EpochScheduler:
    """Runs the epochs of every receiver added, on `base` (the fleet's shared clock, of
    which every receiver's clock is the same or an offset copy)."""

    def __init__(self, base: Clock, *, speed: float = 1.0) -> None:
        self.base = base
        self.speed = speed
        self._heap: list[tuple[int, int, _Receiver]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due: int | None = None
        self._closed = False
        #: Epochs run, readings emitted (for tests and progress).
        self.epochs = 0
        self.readings = 0

    def __len__(self) -> int:
        return len(self._heap)

    def add(
        self,
        gnss: GnssReceiver,
        gps: NmeaGps,
        clock: Clock,
        *,
        emit: Callable[[Reading], object],
        alive: Callable[[], bool],
        failed: Callable[[BaseException], None] | None = None,
    ) -> None:
        """Start a receiver now: its first epoch is the next one of its period and phase.
        `failed` is told (and the receiver stopped) if an epoch raises."""
        now = gnss._started(clock)  # what `GnssReceiver.sentences` does first
        period = gnss.period_ms
        phase = gnss.phase_ms % period
        t = -(-(now - phase) // period) * period + phase
        self._push(_Receiver(gnss, gps, clock, emit, alive, failed, t), self.base.now_ms() + (t - now))

    def close(self) -> None:
        """Stop every receiver (the run is over)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_due = None, None
        self._heap.clear()

    # -- the timer ---------------------------------------------------------------------
    def _push(self, rx: _Receiver, due_ms: int) -> None:
        heapq.heappush(self._heap, (due_ms, next(self._order), rx))
        self._arm()

    def _arm(self) -> None:
        if self._closed or not self._heap:
            return
        due = self._heap[0][0]
        if self._timer is not None and self._timer_due is not None and self._timer_due <= due:
            return
        if self._timer is not None:
            self._timer.cancel()
        delay = max(0.0, (due - self.base.now_ms()) / 1000.0 / self.speed)
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire)
        self._timer_due = due

    def _fire(self) -> None:
        self._timer, self._timer_due = None, None
        heap = self._heap
        now = self.base.now_ms()
        later: list[tuple[_Receiver, int]] = []
        while heap and heap[0][0] <= now and not self._closed:
            _, _, rx = heapq.heappop(heap)
            due = self._epoch(rx, now)
            if due is not None:
                later.append((rx, due))
        for rx, due in later:
            heapq.heappush(heap, (due, next(self._order), rx))
        self._arm()

    def _epoch(self, rx: _Receiver, base_now: int) -> int | None:
        """Run the receiver's epoch if it is due on its own clock; return when (on the
        base clock) to look at it next, or None if it has stopped."""
        if not rx.alive():
            return None
        period = rx.gnss.period_ms
        clock_now = rx.clock.now_ms()
        t = rx.t_ms
        behind = clock_now - t
        if behind > MAX_BEHIND_EPOCHS * period:
            t += behind // period * period
        if t > clock_now:  # not yet on its own clock (its skew changed): wait for it
            rx.t_ms = t
            return base_now + (t - clock_now)
        try:
            for line in rx.gnss.epoch(t):
                for reading in rx.gps.feed(line, clock_now):
                    self.readings += 1
                    rx.emit(reading)
        except Exception as exc:
            if rx.failed is None:
                raise
            log.exception("%s: GNSS epoch at %d failed; the receiver stops", rx.gnss.device, t)
            rx.failed(exc)
            return None
        self.epochs += 1
        rx.t_ms = t + period
        return base_now + (rx.t_ms - clock_now)


__all__ = ["EpochScheduler"]
