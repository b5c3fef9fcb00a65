"""Where a unit really is: a trajectory of legs on a timeline (pure, no clock).

    motion = Trajectory(patrol_loop, speed_mps=1.4)          # loop until told otherwise
    motion.follow(city.shortest_path(here, scene), 12.0, at_ms=t)   # respond, then stop there
    motion.follow(patrol_loop, 1.4, at_ms=t2, loop=True)      # back on patrol
    motion.state(t_ms)   # MotionState(lat, lon, heading, speed)

Each leg starts at `at_ms` from wherever the unit is at that moment (the leg's path is
joined to the current position), and runs at constant speed. An open path ends with the
unit standing at its last point; a loop repeats. The first leg starts when `start(t_ms)`
is called (the GNSS receiver does this at its first epoch) unless given `start_ms`.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from edge_agent.drivers.gps import Route
from edge_agent.wire.geo import LatLon, bearing_deg, distance_m

#: Points closer than this are the same point.
_SAME_M = 0.01


@dataclass(frozen=True)
class MotionState:
    """True position, course over ground (degrees) and speed (m/s) at one instant."""

    lat: float
    lon: float
    heading: float
    speed: float

    @property
    def position(self) -> LatLon:
        return self.lat, self.lon


@dataclass(frozen=True)
class _Leg:
    start_ms: int
    points: tuple[LatLon, ...]
    speed_mps: float
    loop: bool
    route: Route | None
    open_length_m: float
    heading_in: float


def _clean(points: Sequence[LatLon]) -> tuple[LatLon, ...]:
    out: list[LatLon] = []
    for lat, lon in points:
        p = (float(lat), float(lon))
        if not out or distance_m(out[-1], p) > _SAME_M:
            out.append(p)
    if not out:
        raise ValueError("a path needs at least one point")
    return tuple(out)


class Trajectory:
    """A unit's true motion over time, as a list of legs."""

    def __init__(
        self, route: Route | Sequence[LatLon], speed_mps: float, *, loop: bool = True, start_ms: int | None = None
    ) -> None:
        points = route.waypoints if isinstance(route, Route) else tuple(route)
        self._first = (_clean(points), float(speed_mps), loop)
        self._legs: list[_Leg] = []
        if speed_mps < 0:
            raise ValueError("speed must be >= 0")
        if start_ms is not None:
            self.start(start_ms)

    @property
    def started(self) -> bool:
        return bool(self._legs)

    def start(self, t_ms: int) -> None:
        """Begin the first leg at `t_ms` (no-op if already started)."""
        if not self._legs:
            points, speed, loop = self._first
            self._legs.append(self._leg(int(t_ms), points, speed, loop, 0.0))

    def follow(self, path: Sequence[LatLon], speed_mps: float, at_ms: int, *, loop: bool = False) -> None:
        """From `at_ms`, go from the current position along `path` at `speed_mps`; stop at its
        end (or repeat it, from its first point, if `loop`). Legs later than `at_ms` are dropped."""
        if speed_mps < 0:
            raise ValueError("speed must be >= 0")
        at_ms = int(at_ms)
        self.start(at_ms)
        here = self.state(at_ms)
        self._legs = [leg for leg in self._legs if leg.start_ms <= at_ms]
        points = _clean([here.position, *path]) if not loop else _clean(path)
        if loop and distance_m(here.position, points[0]) > _SAME_M:
            # get onto the loop first: a straight approach leg, then the loop
            approach = self._leg(at_ms, (here.position, points[0]), speed_mps, False, here.heading)
            self._legs.append(approach)
            arrive = at_ms + (round(approach.open_length_m / speed_mps * 1000) if speed_mps > 0 else 0)
            if speed_mps == 0:
                return
            self._legs.append(self._leg(arrive, points, speed_mps, True, here.heading))
            return
        self._legs.append(self._leg(at_ms, points, speed_mps, loop, here.heading))

    def hold(self, at_ms: int) -> None:
        """Stop where the unit is at `at_ms`."""
        self.follow([], 0.0, at_ms)

    @staticmethod
    def _leg(start_ms: int, points: tuple[LatLon, ...], speed: float, loop: bool, heading_in: float) -> _Leg:
        if len(points) < 2:
            return _Leg(start_ms, points, 0.0, False, None, 0.0, heading_in)
        open_length = sum(distance_m(a, b) for a, b in itertools.pairwise(points))
        return _Leg(start_ms, points, speed, loop, Route(points), open_length, heading_in)

    def state(self, t_ms: int) -> MotionState:
        """Where the unit is at `t_ms` (before the first leg starts: at its start point)."""
        if not self._legs:
            points, _, _ = self._first
            heading = bearing_deg(points[0], points[1]) if len(points) > 1 else 0.0
            return MotionState(points[0][0], points[0][1], heading, 0.0)
        i = max(0, bisect.bisect_right([leg.start_ms for leg in self._legs], t_ms) - 1)
        leg = self._legs[i]
        elapsed_s = max(0.0, (t_ms - leg.start_ms) / 1000.0)
        if leg.route is None:
            return MotionState(leg.points[0][0], leg.points[0][1], leg.heading_in, 0.0)
        travelled = leg.speed_mps * elapsed_s
        if leg.loop:
            lat, lon, heading = leg.route.at(travelled)
            return MotionState(lat, lon, heading, leg.speed_mps)
        if travelled >= leg.open_length_m:
            end = leg.points[-1]
            return MotionState(end[0], end[1], bearing_deg(leg.points[-2], end), 0.0)
        lat, lon, heading = leg.route.at(travelled)
        return MotionState(lat, lon, heading, leg.speed_mps)


__all__ = ["MotionState", "Trajectory"]
