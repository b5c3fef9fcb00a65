"""WGS84 geometry shared by every runtime: distances, bearings and small local
displacements (metres north/east). Pure functions, no I/O."""

from __future__ import annotations

import math

EARTH_RADIUS_M = 6_371_008.8

LatLon = tuple[float, float]


def distance_m(a: LatLon, b: LatLon) -> float:
    """Great-circle (haversine) distance between two points."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def bearing_deg(a: LatLon, b: LatLon) -> float:
    """Initial bearing from `a` to `b`, in [0, 360)."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    y = math.sin(lon2 - lon1) * math.cos(lat2)
    x = math.cos(lat1) * math.sin(lat2) - math.sin(lat1) * math.cos(lat2) * math.cos(lon2 - lon1)
    return math.degrees(math.atan2(y, x)) % 360.0


def offset(point: LatLon, north_m: float, east_m: float) -> LatLon:
    """Move `point` by a small local displacement (metres north and east)."""
    lat, lon = point
    dlat = math.degrees(north_m / EARTH_RADIUS_M)
    dlon = math.degrees(east_m / (EARTH_RADIUS_M * math.cos(math.radians(lat))))
    return lat + dlat, lon + dlon


def displacement_m(origin: LatLon, point: LatLon) -> tuple[float, float]:
    """The inverse of `offset`: (north, east) metres from `origin` to a nearby `point`."""
    north = math.radians(point[0] - origin[0]) * EARTH_RADIUS_M
    east = math.radians(point[1] - origin[1]) * EARTH_RADIUS_M * math.cos(math.radians(origin[0]))
    return north, east
