"""A simulated GPS: a vehicle driving a looping route at a set speed, reporting a noisy
fix at a fixed rate.

The geometry and the noise are pure functions (no I/O, no clock), so they are tested
on their own; `SimulatedGps` is the thin loop that samples them on the agent's clock.
Positions are WGS84 degrees, distances metres, headings degrees from true north.

Noise model: position error is a first-order Gauss-Markov process per axis (north,
east) with standard deviation `sigma_m` and correlation time `correlation_s`. Real
receivers wander rather than jump each second; with `correlation_s=0` the error is
white. The reported `acc` is `sigma_m` (1 sigma per axis).
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from functools import cached_property

from edge_agent.drivers import Clock, Reading
from edge_agent.wire.geo import LatLon, bearing_deg, displacement_m, distance_m, offset

#: A loop of about 3.4 km through central London (Trafalgar Square, Strand, Aldwych,
#: Waterloo Bridge, Waterloo, County Hall, Westminster Bridge, Whitehall).
LONDON_LOOP: tuple[LatLon, ...] = (
    (51.50809, -0.12804),
    (51.51050, -0.12060),
    (51.51290, -0.11730),
    (51.50620, -0.11470),
    (51.50310, -0.11280),
    (51.50090, -0.11880),
    (51.50070, -0.12630),
    (51.50440, -0.12640),
)


@dataclass(frozen=True)
class Route:
    """A closed loop of waypoints: after the last one it drives back to the first."""

    waypoints: tuple[LatLon, ...]

    def __post_init__(self) -> None:
        points = tuple((float(lat), float(lon)) for lat, lon in self.waypoints)
        if len(points) < 2:
            raise ValueError("a route needs at least 2 waypoints")
        for lat, lon in points:
            if not (-85 <= lat <= 85 and -180 <= lon <= 180):
                raise ValueError(f"waypoint ({lat}, {lon}) is not a WGS84 lat/lon (|lat| <= 85)")
        object.__setattr__(self, "waypoints", points)
        if self.length_m <= 0:
            raise ValueError("a route must have a length")

    @cached_property
    def _cumulative(self) -> tuple[float, ...]:
        """Distance from the start to each waypoint, ending with the full loop length."""
        total = 0.0
        out = [0.0]
        n = len(self.waypoints)
        for i in range(n):
            total += distance_m(self.waypoints[i], self.waypoints[(i + 1) % n])
            out.append(total)
        return tuple(out)

    @property
    def length_m(self) -> float:
        return self._cumulative[-1]

    def at(self, travelled_m: float) -> tuple[float, float, float]:
        """(lat, lon, heading) after driving `travelled_m` metres from the first waypoint."""
        cum = self._cumulative
        d = travelled_m % self.length_m
        leg = min(bisect.bisect_right(cum, d) - 1, len(self.waypoints) - 1)
        a = self.waypoints[leg]
        b = self.waypoints[(leg + 1) % len(self.waypoints)]
        frac = (d - cum[leg]) / (cum[leg + 1] - cum[leg])
        north, east = displacement_m(a, b)
        lat, lon = offset(a, north * frac, east * frac)
        return lat, lon, bearing_deg(a, b)


def position_at(route: Route, speed_mps: float, t_s: float) -> tuple[float, float, float]:
    """(lat, lon, heading) at `t_s` seconds after leaving the first waypoint."""
    return route.at(speed_mps * t_s)


def noise_step(
    previous: tuple[float, float], sigma_m: float, dt_s: float, correlation_s: float, rng: random.Random
) -> tuple[float, float]:
    """Next (north, east) error of a stationary Gauss-Markov process with std `sigma_m`."""
    a = math.exp(-dt_s / correlation_s) if correlation_s > 0 else 0.0
    scale = sigma_m * math.sqrt(1.0 - a * a)
    return a * previous[0] + rng.gauss(0.0, scale), a * previous[1] + rng.gauss(0.0, scale)


def initial_noise(sigma_m: float, rng: random.Random) -> tuple[float, float]:
    """A first error drawn from the stationary distribution."""
    return rng.gauss(0.0, sigma_m), rng.gauss(0.0, sigma_m)


@dataclass(frozen=True)
class Fix:
    """The last reported position, for other drivers (the panic button) to use."""

    lat: float
    lon: float
    acc: float


class SimulatedGps:
    """Drives `route` at `speed_mps`, emitting `telemetry` at `rate_hz` with noise."""

    def __init__(
        self,
        route: Route | Sequence[LatLon] = LONDON_LOOP,
        *,
        speed_mps: float = 8.0,
        rate_hz: float = 1.0,
        sigma_m: float = 5.0,
        correlation_s: float = 5.0,
        seed: int | None = None,
        battery: float = 100.0,
        drain_per_h: float = 5.0,
    ) -> None:
        if rate_hz <= 0 or speed_mps < 0 or sigma_m < 0 or correlation_s < 0:
            raise ValueError("rate must be > 0; speed, sigma and correlation >= 0")
        self.route = route if isinstance(route, Route) else Route(tuple(route))
        self.speed_mps = speed_mps
        self.rate_hz = rate_hz
        self.sigma_m = sigma_m
        self.correlation_s = correlation_s
        self.seed = seed
        self.battery = battery
        self.drain_per_h = drain_per_h
        self.last_fix: Fix | None = None

    async def readings(self, clock: Clock) -> AsyncGenerator[Reading, None]:
        rng = random.Random(self.seed)
        period = 1.0 / self.rate_hz
        start = clock.now_ms()
        error = initial_noise(self.sigma_m, rng)
        last_t = 0.0
        tick = 0
        while True:
            t = (clock.now_ms() - start) / 1000.0
            if tick:
                error = noise_step(error, self.sigma_m, max(t - last_t, 0.0), self.correlation_s, rng)
            last_t = t
            lat, lon, heading = position_at(self.route, self.speed_mps, t)
            lat, lon = offset((lat, lon), *error)
            battery = max(0.0, self.battery - self.drain_per_h * t / 3600.0)
            self.last_fix = Fix(round(lat, 7), round(lon, 7), self.sigma_m)
            yield Reading(
                "telemetry",
                {
                    "lat": self.last_fix.lat,
                    "lon": self.last_fix.lon,
                    "acc": self.sigma_m,
                    "speed": round(self.speed_mps, 2),
                    "heading": round(heading, 1) % 360.0,
                    "fix": "3d",
                    "sensors": {"battery": round(battery, 1)},
                },
            )
            tick += 1
            await clock.sleep(max(0.0, start / 1000.0 + tick * period - clock.now_ms() / 1000.0))
