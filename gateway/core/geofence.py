"""Geofences: exclusion zones (a monitored person's device must not enter) and coverage
zones (at least N available units must be inside), as a pure state machine.

    zones = [Zone("school", Polygon(points), "exclusion", monitored=frozenset({"tag-7"})),
             Zone("centre", Polygon(points2), "coverage", min_units=2)]
    monitor = GeofenceMonitor(zones)
    monitor.observe("tag-7", lat, lon, t_ms)        # [GeofenceEvent("breach", ...)] once
    monitor.coverage({"van-1": (lat, lon), ...}, t_ms)   # gap / restored, on change only

Point in polygon: ray casting in a local plane (metres around the polygon's first
point). Hysteresis: a unit counts as inside once it is inside the polygon, and as outside
again only once it is more than `exit_margin_m` (default `EXIT_MARGIN_M`, 25 m, about
three times a typical urban GNSS error) outside its edge, so a device loitering at the
boundary, or GNSS noise, raises one breach, not one per fix. The same per-unit
hysteresis decides who is inside a coverage zone. Events are reported on change only:
`breach` on entry, `left` on exit (exclusion); `coverage_gap` when the count of units
inside drops below `min_units`, `coverage_restored` when it is back.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_agent.wire.geo import LatLon, displacement_m
from gateway.core.track import FusionError

EXIT_MARGIN_M = 25.0
RULES = frozenset({"exclusion", "coverage"})


class GeofenceError(FusionError):
    """A polygon or zone that cannot be used."""


@dataclass(frozen=True)
class Polygon:
    """A simple polygon of 3+ distinct (lat, lon) vertices, closed or not."""

    points: tuple[LatLon, ...]
    _local: tuple[tuple[float, float], ...] = field(init=False, repr=False, compare=False)
    _bbox: tuple[float, float, float, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        points = [(float(lat), float(lon)) for lat, lon in self.points]
        for lat, lon in points:
            if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0) or math.isnan(lat + lon):
                raise GeofenceError(f"({lat}, {lon}) is not a WGS84 lat/lon")
        if len(points) > 1 and points[0] == points[-1]:
            points.pop()
        if len(set(points)) < 3:
            raise GeofenceError(f"a polygon needs 3+ distinct points, got {len(set(points))}")
        local = tuple((e, n) for n, e in (displacement_m(points[0], p) for p in points))
        area2 = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in itertools.pairwise((*local, local[0])))
        if abs(area2) < 1.0:
            raise GeofenceError("the polygon has no area (collinear points)")
        object.__setattr__(self, "points", tuple(points))
        object.__setattr__(self, "_local", local)
        xs, ys = [p[0] for p in local], [p[1] for p in local]
        object.__setattr__(self, "_bbox", (min(xs), min(ys), max(xs), max(ys)))

    def _xy(self, point: LatLon) -> tuple[float, float]:
        north, east = displacement_m(self.points[0], point)
        return east, north

    def contains(self, point: LatLon) -> bool:
        """Ray casting (even-odd rule)."""
        x, y = self._xy(point)
        x0, y0, x1, y1 = self._bbox
        if not (x0 <= x <= x1 and y0 <= y <= y1):
            return False
        inside = False
        for (ax, ay), (bx, by) in itertools.pairwise((*self._local, self._local[0])):
            if (ay > y) != (by > y) and x < ax + (y - ay) * (bx - ax) / (by - ay):
                inside = not inside
        return inside

    def distance_to_edge_m(self, point: LatLon) -> float:
        """Distance from `point` to the nearest edge (inside or outside)."""
        x, y = self._xy(point)
        best = math.inf
        for (ax, ay), (bx, by) in itertools.pairwise((*self._local, self._local[0])):
            dx, dy = bx - ax, by - ay
            t = max(0.0, min(1.0, ((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy)))
            best = min(best, math.hypot(x - ax - t * dx, y - ay - t * dy))
        return best


@dataclass(frozen=True)
class Zone:
    """A polygon with a rule. `exclusion`: `monitored` are the unit ids whose entry is a
    breach. `coverage`: at least `min_units` available units must be inside."""

    zone_id: str
    polygon: Polygon
    rule: str
    monitored: frozenset[str] = frozenset()
    min_units: int = 1
    exit_margin_m: float = EXIT_MARGIN_M

    def __post_init__(self) -> None:
        if not self.zone_id:
            raise GeofenceError("a zone needs an id")
        if self.rule not in RULES:
            raise GeofenceError(f"zone {self.zone_id}: rule must be one of {sorted(RULES)}, got {self.rule!r}")
        if self.rule == "exclusion" and not self.monitored:
            raise GeofenceError(f"zone {self.zone_id}: an exclusion zone needs monitored unit ids")
        if self.rule == "coverage" and self.min_units < 1:
            raise GeofenceError(f"zone {self.zone_id}: min_units must be >= 1")
        if not self.exit_margin_m >= 0.0:
            raise GeofenceError(f"zone {self.zone_id}: exit_margin_m must be >= 0")


@dataclass(frozen=True, slots=True)
class GeofenceEvent:
    """`breach` / `left` (exclusion; `unit_id`, where) or `coverage_gap` /
    `coverage_restored` (coverage; `units_inside` of `min_units`)."""

    kind: str
    zone_id: str
    t_ms: int
    unit_id: str | None = None
    lat: float | None = None
    lon: float | None = None
    units_inside: int | None = None
    min_units: int | None = None


class GeofenceMonitor:
    """Who is inside which zone, and which coverage zones are short. Feed positions in
    time order per unit; events come on changes only."""

    def __init__(self, zones: Iterable[Zone]) -> None:
        self.zones: dict[str, Zone] = {}
        for zone in zones:
            if zone.zone_id in self.zones:
                raise GeofenceError(f"zone id {zone.zone_id} used twice")
            self.zones[zone.zone_id] = zone
        self._watch: dict[str, list[Zone]] = {}
        for zone in self.zones.values():
            for unit in zone.monitored if zone.rule == "exclusion" else ():
                self._watch.setdefault(unit, []).append(zone)
        self._inside: set[tuple[str, str]] = set()  # (zone, unit)
        self._short: set[str] = set()  # coverage zones with a gap
        self._checked: set[str] = set()  # coverage zones evaluated at least once
        #: Some zone has a coverage rule (else `coverage` has nothing to count).
        self.has_coverage = any(zone.rule == "coverage" for zone in self.zones.values())

    def _is_inside(self, zone: Zone, unit_id: str, point: LatLon) -> bool:
        """Inside with hysteresis: once in, out only past the exit margin."""
        key = (zone.zone_id, unit_id)
        if zone.polygon.contains(point):
            self._inside.add(key)
            return True
        if key in self._inside and zone.polygon.distance_to_edge_m(point) <= zone.exit_margin_m:
            return True
        self._inside.discard(key)
        return False

    def inside(self, zone_id: str, unit_id: str) -> bool:
        return (zone_id, unit_id) in self._inside

    def observe(self, unit_id: str, lat: float, lon: float, t_ms: int) -> list[GeofenceEvent]:
        """A monitored device's position: breach on entering an exclusion zone, `left` on
        leaving it (past the margin)."""
        events: list[GeofenceEvent] = []
        for zone in self._watch.get(unit_id, ()):
            was = (zone.zone_id, unit_id) in self._inside
            now = self._is_inside(zone, unit_id, (lat, lon))
            if now != was:
                events.append(GeofenceEvent("breach" if now else "left", zone.zone_id, t_ms, unit_id, lat, lon))
        return events

    def coverage(self, available: Mapping[str, LatLon], t_ms: int) -> list[GeofenceEvent]:
        """The positions of the units available now: a gap event for each coverage zone
        whose count falls below its minimum (also on the first call), a restored event
        when it recovers."""
        events: list[GeofenceEvent] = []
        for zone in self.zones.values():
            if zone.rule != "coverage":
                continue
            for key in [k for k in self._inside if k[0] == zone.zone_id and k[1] not in available]:
                self._inside.discard(key)  # no longer available: not counted
            count = sum(self._is_inside(zone, unit, point) for unit, point in available.items())
            short = count < zone.min_units
            first = zone.zone_id not in self._checked
            self._checked.add(zone.zone_id)
            if short and (first or zone.zone_id not in self._short):
                self._short.add(zone.zone_id)
                events.append(GeofenceEvent("coverage_gap", zone.zone_id, t_ms, units_inside=count,
                                            min_units=zone.min_units))
            elif not short and zone.zone_id in self._short:
                self._short.discard(zone.zone_id)
                events.append(GeofenceEvent("coverage_restored", zone.zone_id, t_ms, units_inside=count,
                                            min_units=zone.min_units))
        return events

    def export_state(self) -> dict[str, list[Any]]:
        """Who is inside which zone and which coverage zones are short, as plain data (so a
        restored monitor does not report a breach or a gap again)."""
        return {"inside": sorted([z, u] for z, u in self._inside), "short": sorted(self._short),
                "checked": sorted(self._checked)}

    def restore_state(self, data: Mapping[str, Any]) -> None:
        """The state `export_state` gave; zones no longer configured are left out."""
        inside = {(str(z), str(u)) for z, u in data.get("inside", [])}
        self._inside = {k for k in inside if k[0] in self.zones}
        self._short = {str(z) for z in data.get("short", []) if z in self.zones}
        self._checked = {str(z) for z in data.get("checked", []) if z in self.zones}

    @property
    def gaps(self) -> frozenset[str]:
        """Coverage zones short of units now."""
        return frozenset(self._short)


def polygon_from_lonlat(ring: Sequence[Sequence[float]]) -> Polygon:
    """A polygon from a GeoJSON ring ([lon, lat] pairs)."""
    try:
        return Polygon(tuple((float(p[1]), float(p[0])) for p in ring))
    except (TypeError, IndexError, ValueError) as exc:
        raise GeofenceError(f"bad GeoJSON ring: {exc}") from None


__all__ = [
    "EXIT_MARGIN_M",
    "GeofenceError",
    "GeofenceEvent",
    "GeofenceMonitor",
    "Polygon",
    "Zone",
    "polygon_from_lonlat",
]
