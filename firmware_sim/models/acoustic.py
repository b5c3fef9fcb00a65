"""An acoustic gunshot sensor at a fixed, surveyed site.

An impulse emitted at `t_emit` from `source` reaches the sensor at
`t_emit + distance / 343 m/s`. The sensor timestamps its arrival with its own clock,
which is off by a fixed bias drawn once per sensor from N(0, `clock_error_ms`) (the
error a GNSS-disciplined clock still has), plus an onset-picking jitter per detection
(N(0, `pick_jitter_ms`), default 0.1 ms). Optionally (`nlos_prob`) the direct path is
blocked and the sound arrives late by a diffracted path (exponential, mean 3 ms).
`skew_ms` adds a further offset (a clock-skew fault on the sensor).

Detection: certain up to a third of `range_m`, then falling to 70% at `range_m`, none
beyond. `confidence` falls with distance (0.95 near, ~0.6 at the edge). `level_db` is the
peak sound level: 150 dB at 1 m, spherical spreading. The `gunshot` event is sent 20-80
ms (processing) after the arrival, with the site's position and
`detail.t_detect_ns` = the sensor's timestamp of the arrival, UTC nanoseconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from edge_agent.wire.geo import LatLon, distance_m
from firmware_sim.models.base import EventModel
from firmware_sim.truth import TruthLog

SPEED_OF_SOUND_MPS = 343.0
#: Peak level of a gunshot 1 m from the muzzle.
SOURCE_LEVEL_DB = 150.0


class AcousticSensor(EventModel):
    """A fixed gunshot detector at `site`."""

    name = "acoustic"

    def __init__(
        self,
        site: LatLon,
        clock_error_ms: float = 1.0,
        seed: int | None = None,
        truth: TruthLog | None = None,
        *,
        device: str = "",
        range_m: float = 1500.0,
        pick_jitter_ms: float = 0.1,
        nlos_prob: float = 0.0,
        site_acc_m: float = 0.5,
    ) -> None:
        super().__init__(seed=seed, truth=truth, device=device)
        if clock_error_ms < 0 or pick_jitter_ms < 0 or range_m <= 0 or not 0 <= nlos_prob <= 1:
            raise ValueError("need clock_error_ms, pick_jitter_ms >= 0, range_m > 0, nlos_prob in [0, 1]")
        self.site = (float(site[0]), float(site[1]))
        self.clock_error_ms = clock_error_ms
        self.pick_jitter_ms = pick_jitter_ms
        self.range_m = range_m
        self.nlos_prob = nlos_prob
        self.site_acc_m = site_acc_m
        self.skew_ms = 0.0
        #: This sensor's clock bias (ms), fixed for its life.
        self.clock_bias_ms = self.rng.gauss(0.0, clock_error_ms)
        self._announced = False

    def _announce(self, t_ms: int) -> None:
        if not self._announced:
            self._announced = True
            self._record(t_ms, "acoustic_site", lat=self.site[0], lon=self.site[1],
                         clock_bias_ms=round(self.clock_bias_ms, 6), clock_error_ms=self.clock_error_ms)

    def on_start(self, t_ms: int) -> None:
        self._announce(t_ms)

    def detection_probability(self, distance: float) -> float:
        if distance > self.range_m:
            return 0.0
        near = self.range_m / 3
        return 1.0 if distance <= near else 1.0 - 0.3 * (distance - near) / (self.range_m - near)

    def impulse(self, source: LatLon, t_emit_ms: float, *, label: str = "") -> int | None:
        """A gunshot at `source`, fired at `t_emit_ms` (UTC, may be fractional). Returns the
        sensor's `t_detect_ns` if it detects it, else None. The truth log gets the true
        arrival time and every error term."""
        self._announce(round(t_emit_ms))
        rng = self.rng
        distance = distance_m(source, self.site)
        # draw every random term, detected or not, so one impulse never shifts another's
        detect_draw, jitter, nlos_draw, nlos_delay = rng.random(), rng.gauss(0, 1), rng.random(), rng.expovariate(1 / 3)
        confidence_noise, level_noise, processing = rng.gauss(0, 0.03), rng.gauss(0, 2), rng.uniform(20, 80)
        t_emit_ns = round(t_emit_ms * 1_000_000)
        t_arrive_ns = t_emit_ns + round(distance / SPEED_OF_SOUND_MPS * 1e9)
        extra_ms = nlos_delay if nlos_draw < self.nlos_prob else 0.0
        error_ms = self.clock_bias_ms + self.skew_ms + self.pick_jitter_ms * jitter + extra_ms
        t_detect_ns = t_arrive_ns + round(error_ms * 1_000_000)
        detected = detect_draw < self.detection_probability(distance)
        self._record(
            round(t_emit_ms), "detection", label=label, source_lat=source[0], source_lon=source[1],
            distance_m=round(distance, 2), t_arrive_ns=t_arrive_ns, t_detect_ns=t_detect_ns,
            error_ms=round(error_ms, 6), nlos=extra_ms > 0, detected=detected,
        )
        if not detected:
            return None
        confidence = max(0.05, min(0.99, 0.95 - 0.35 * distance / self.range_m + confidence_noise))
        level = SOURCE_LEVEL_DB - 20 * math.log10(max(distance, 1.0)) + level_noise
        body: dict[str, Any] = {
            "type": "gunshot",
            "lat": self.site[0],
            "lon": self.site[1],
            "acc": self.site_acc_m,
            "detail": {
                "t_detect_ns": t_detect_ns,
                "confidence": round(confidence, 3),
                "level_db": round(level, 1),
                "clock_sigma_ms": self.clock_error_ms,
            },
        }
        self._event(math.ceil(t_detect_ns / 1_000_000 + processing), body, locate=False)
        return t_detect_ns


def gunshot(
    sensors: Iterable[AcousticSensor], source: LatLon, t_emit_ms: float, truth: TruthLog | None = None, *,
    label: str = "",
) -> dict[str, int]:
    """Fire one shot heard by every sensor in `sensors`: records the `impulse` (the true
    source and time) once and returns {device: t_detect_ns} of the sensors that detect it."""
    if truth is not None:
        truth.record(round(t_emit_ms), "impulse", label=label, lat=source[0], lon=source[1],
                     t_emit_ns=round(t_emit_ms * 1_000_000))
    out: dict[str, int] = {}
    for sensor in sensors:
        t = sensor.impulse(source, t_emit_ms, label=label)
        if t is not None:
            out[sensor.device] = t
    return out


__all__ = ["SOURCE_LEVEL_DB", "SPEED_OF_SOUND_MPS", "AcousticSensor", "gunshot"]
