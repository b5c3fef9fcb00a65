"""An inertial sensor: an officer's fall followed by stillness (man-down), a vehicle crash.

Man-down is what body-worn devices do: an impact (a free-fall then a 3-8 g spike)
arms a timer; if no movement is seen for `still_s` seconds after it, a `man_down`
event is raised (0.2-1 s after the window ends, the detector's own latency). Movement
within the window (`move()`, or `fall(..., recover_after_s=...)`) disarms it.

A crash is a deceleration pulse: the detector measures its peak (within 5%) and raises
`crash` (100-300 ms later) if it exceeds `crash_threshold_g` (default 3 g: harder than
any braking, about 1 g, softer than a real collision, 5-50 g).
"""

from __future__ import annotations

from typing import Any

from firmware_sim.models.base import EventModel, PositionSource
from firmware_sim.truth import TruthLog


class Imu(EventModel):
    """Fall / stillness and crash detector of one device."""

    name = "imu"

    def __init__(
        self,
        seed: int | None = None,
        truth: TruthLog | None = None,
        *,
        device: str = "",
        still_s: float = 30.0,
        crash_threshold_g: float = 3.0,
        position: PositionSource | None = None,
    ) -> None:
        super().__init__(seed=seed, truth=truth, device=device, position=position)
        if still_s <= 0 or crash_threshold_g <= 0:
            raise ValueError("still_s and crash_threshold_g must be > 0")
        self.still_s = still_s
        self.crash_threshold_g = crash_threshold_g
        self._falls: dict[str, tuple[int, int]] = {}  # tag -> (fall, end of the still window)

    def fall(
        self, at_ms: int | None = None, *, recover_after_s: float | None = None, peak_g: float | None = None
    ) -> int:
        """The wearer falls at `at_ms` (default now). Unless they move within `still_s`
        (`recover_after_s`, or a later `move()`), `man_down` follows. Returns the time at
        which it would be raised."""
        t = self._now(at_ms)
        impact = self.rng.uniform(3.0, 8.0) if peak_g is None else peak_g
        latency_ms = round(self.rng.uniform(200, 1000))
        window_end = t + round(self.still_s * 1000)
        due = window_end + latency_ms
        tag = f"man_down-{len(self._falls) + 1}"
        self._falls[tag] = (t, window_end)
        self._record(t, "fall", impact_g=round(impact, 2), man_down_at_ms=due)
        body: dict[str, Any] = {
            "type": "man_down",
            "detail": {"still_s": self.still_s, "impact_g": round(impact, 1), "impact_ts": t},
        }
        self._event(due, body, tag=tag)
        if recover_after_s is not None:
            self.move(t + round(recover_after_s * 1000))
        return due

    def move(self, at_ms: int | None = None) -> None:
        """The wearer moves at `at_ms` (default now): a pending man-down whose stillness
        window has not ended by then is cancelled."""
        t = self._now(at_ms)
        cancelled = 0
        for tag, (fell, window_end) in list(self._falls.items()):
            if fell < t < window_end:
                cancelled += self._cancel(tag, -(2**62))
                del self._falls[tag]
        if cancelled:
            self._record(t, "recovered", cancelled=cancelled)

    def crash(self, decel_g: float, at_ms: int | None = None) -> bool:
        """A deceleration pulse of peak `decel_g` at `at_ms` (default now); returns whether
        the detector will raise `crash`."""
        t = self._now(at_ms)
        measured = decel_g * (1.0 + self.rng.gauss(0, 0.05))
        latency_ms = round(self.rng.uniform(100, 300))
        detected = measured >= self.crash_threshold_g
        self._record(t, "crash", decel_g=decel_g, measured_g=round(measured, 2), detected=detected)
        if detected:
            self._event(t + latency_ms, {"type": "crash", "detail": {"decel_g": round(measured, 1), "impact_ts": t}})
        return detected


__all__ = ["Imu"]
