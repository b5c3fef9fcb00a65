"""Body-worn sensors of an officer: heart rate, panic button, holster, body camera.

Heart rate follows a target with a first-order lag (about 20 s rising, 45 s falling) plus
1.5 bpm of beat-to-beat noise. The target is the resting rate (60-78 bpm) plus effort
(from walking or running speed, or an explicit `exertion(level)`: 0 rest ~70 bpm, 1
flat out ~150-185 bpm) plus stress, a surge that decays over two minutes after a
panic press (+35 bpm) or a holster draw (+30 bpm).

Events: `panic` (detail.source), `holster_draw`, `bodycam_on` (detail.trigger: manual
or holster; drawing the weapon switches a camera that is off on within 0.5-1.5 s, as
holster sensors do). Telemetry sensors: `heart_rate` (bpm), `holster` (holstered |
drawn), `bodycam` (off | recording). A dropout (the body sensor's radio link lost)
blanks them and loses the events it covers.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from typing import Any

from firmware_sim.models.base import EventModel, PositionSource
from firmware_sim.truth import TruthLog

_EPOCH = -(2**62)


def effort_from_speed(speed_mps: float) -> float:
    """0 standing, ~0.1 walking (1.4 m/s), ~0.5 jogging (3 m/s), 1 sprinting (6 m/s+).
    Faster than 7 m/s the wearer is in a vehicle, not running: 0."""
    if speed_mps > 7.0:
        return 0.0
    return float(max(0.0, min(1.0, (speed_mps - 0.5) / 5.5)) ** 1.2)


class BodySensors(EventModel):
    """Heart rate and the officer's kit. `speed(t_ms)` (the wearer's true speed) drives effort."""

    name = "body"

    def __init__(
        self,
        seed: int | None = None,
        truth: TruthLog | None = None,
        *,
        device: str = "",
        resting_bpm: float | None = None,
        max_bpm: float | None = None,
        speed: Callable[[int], float] | None = None,
        position: PositionSource | None = None,
    ) -> None:
        super().__init__(seed=seed, truth=truth, device=device, position=position)
        self.resting_bpm = self.rng.uniform(60.0, 78.0) if resting_bpm is None else resting_bpm
        self.max_bpm = self.rng.uniform(165.0, 185.0) if max_bpm is None else max_bpm
        self._speed = speed
        self._exertion: list[tuple[int, float]] = [(_EPOCH, 0.0)]
        self._stress: list[tuple[int, float]] = []
        self._holster: list[tuple[int, bool]] = [(_EPOCH, False)]  # drawn?
        self._bodycam: list[tuple[int, bool]] = [(_EPOCH, False)]  # recording?
        self._hr: float | None = None
        self._hr_t = 0
        self.presses = 0

    # -- triggers ---------------------------------------------------------------------

    def press_panic(self, source: str = "button", at_ms: int | None = None) -> None:
        """The panic button is pressed: a `panic` event with the device's position."""
        t = self._now(at_ms)
        self.presses += 1
        self._stress.append((t, 35.0))
        self._record(t, "panic", source=source)
        self._event(t, {"type": "panic", "detail": {"source": source}})

    def holster_draw(self, at_ms: int | None = None) -> None:
        t = self._now(at_ms)
        bisect.insort(self._holster, (t, True))
        self._stress.append((t, 30.0))
        self._record(t, "holster", drawn=True)
        self._event(t + 100, {"type": "holster_draw", "detail": {}})
        if not self.bodycam_recording(t):
            self.bodycam_on(at_ms=t + round(self.rng.uniform(500, 1500)), trigger="holster")

    def holster_return(self, at_ms: int | None = None) -> None:
        t = self._now(at_ms)
        bisect.insort(self._holster, (t, False))
        self._record(t, "holster", drawn=False)

    def bodycam_on(self, at_ms: int | None = None, *, trigger: str = "manual") -> None:
        t = self._now(at_ms)
        bisect.insort(self._bodycam, (t, True))
        self._record(t, "bodycam", recording=True, trigger=trigger)
        self._event(t, {"type": "bodycam_on", "detail": {"trigger": trigger}})

    def bodycam_off(self, at_ms: int | None = None) -> None:
        t = self._now(at_ms)
        bisect.insort(self._bodycam, (t, False))
        self._record(t, "bodycam", recording=False)

    def exertion(self, level: float, at_ms: int | None = None) -> None:
        """Sustained effort from `at_ms` (0 rest .. 1 maximal), e.g. a foot chase or a struggle."""
        if not 0.0 <= level <= 1.0:
            raise ValueError("exertion level must be in [0, 1]")
        bisect.insort(self._exertion, (self._now(at_ms), level))

    # -- state ------------------------------------------------------------------------

    @staticmethod
    def _at(timeline: list[tuple[int, Any]], t_ms: int) -> Any:
        i = bisect.bisect_right([t for t, _ in timeline], t_ms) - 1
        return timeline[max(i, 0)][1]

    def holster_drawn(self, t_ms: int) -> bool:
        return bool(self._at(self._holster, t_ms))

    def bodycam_recording(self, t_ms: int) -> bool:
        return bool(self._at(self._bodycam, t_ms))

    def target_bpm(self, t_ms: int) -> float:
        effort = float(self._at(self._exertion, t_ms))
        if self._speed is not None:
            effort = max(effort, effort_from_speed(self._speed(t_ms)))
        stress = sum(a * math.exp(-(t_ms - t0) / 120_000) for t0, a in self._stress if t0 <= t_ms)
        return min(self.max_bpm, self.resting_bpm + (self.max_bpm - self.resting_bpm) * effort + stress)

    def heart_rate(self, t_ms: int) -> float:
        """The true heart rate at `t_ms` (call with non-decreasing times)."""
        if self._hr is None:
            self._hr, self._hr_t = self.target_bpm(t_ms), t_ms
        while self._hr_t < t_ms:
            step = min(5_000, t_ms - self._hr_t)
            self._hr_t += step
            target = self.target_bpm(self._hr_t)
            tau_s = 20.0 if target > self._hr else 45.0
            self._hr += (target - self._hr) * (1.0 - math.exp(-step / 1000.0 / tau_s))
        return self._hr

    def sensors(self, t_ms: int) -> dict[str, Any]:
        """`heart_rate`, `holster`, `bodycam` for the telemetry (empty during a dropout)."""
        hr = self.heart_rate(t_ms) + self.rng.gauss(0, 1.5)
        if self.dropped(t_ms):
            return {}
        return {
            "heart_rate": round(hr),
            "holster": "drawn" if self.holster_drawn(t_ms) else "holstered",
            "bodycam": "recording" if self.bodycam_recording(t_ms) else "off",
        }


__all__ = ["BodySensors", "effort_from_speed"]
