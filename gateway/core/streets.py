"""Arrival-time estimates for next-best-action: along streets when there is a map, as the
crow flies (with a detour factor) when there is not. Pure: no I/O, no clock.

    graph = StreetGraph.from_geojson(json.loads(text))   # the city.geojson format
    model = StreetEta(graph, policy.speeds)
    model.etas(units, lat, lon)                          # {unit id: Eta(seconds, metres)}

`StreetEta` runs one Dijkstra (in seconds, per unit kind) from the target out to every
junction and keeps it in a small cache, so ranking fifty units costs one search per kind
plus one vectorised projection of each unit onto its nearest street. Points off the
graph (a car park, a GNSS fix 8 m to the side) reach the street at the kind's
off-street speed, then move along the street they are nearest to, in either direction.

Geometry is a local flat (equirectangular) projection about the graph's centre, good to
well under a metre across a city; a region hundreds of kilometres across should be split.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from edge_agent.wire.geo import EARTH_RADIUS_M, LatLon, distance_m

#: GeoJSON feature kinds that are streets (the rest, e.g. a river, is scenery).
STREET_KINDS = frozenset({"primary", "residential", "service"})
UNIT_KINDS = frozenset({"officer", "vehicle"})
#: How much longer a street route is than the straight line, typically, in a city grid.
DEFAULT_DETOUR = 1.3

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class StreetsError(ValueError):
    """The map data is unusable (not a FeatureCollection, no streets, bad coordinates)."""


class Placed(Protocol):
    """What an ETA model needs of a unit: its id, kind and reported position."""

    @property
    def id(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def lat(self) -> float: ...
    @property
    def lon(self) -> float: ...


class Eta(NamedTuple):
    """Estimated time of arrival (seconds) and the length of the route it assumes (metres)."""

    seconds: float
    metres: float


class EtaModel(Protocol):
    """Arrival-time estimates of many units to one point. Units that cannot get there (no
    route, unknown kind) are left out of the answer."""

    def etas(self, units: Sequence[Placed], lat: float, lon: float) -> dict[str, Eta]: ...


@dataclass(frozen=True)
class KindSpeed:
    """How fast one kind of unit moves, m/s: on streets (optionally per street kind, e.g.
    a van on a primary road) and off them (the leg to the nearest street)."""

    street_mps: float
    off_street_mps: float
    by_street_kind: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in (("street_mps", self.street_mps), ("off_street_mps", self.off_street_mps),
                            *((f"by_street_kind.{k}", v) for k, v in self.by_street_kind.items())):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 100:
                raise ValueError(f"{name} must be a speed in (0, 100] m/s, got {value!r}")
        object.__setattr__(self, "by_street_kind", dict(self.by_street_kind))

    def on(self, street_kind: str) -> float:
        return self.by_street_kind.get(street_kind, self.street_mps)


#: Defaults: an officer on foot walks briskly; a vehicle drives at urban speeds.
DEFAULT_SPEEDS: Mapping[str, KindSpeed] = {
    "officer": KindSpeed(1.8, 1.4),
    "vehicle": KindSpeed(11.0, 4.0, {"primary": 13.0, "residential": 10.0, "service": 6.0}),
}


class StraightLineEta:
    """The fallback without a map: great-circle distance times a detour factor, at the
    kind's street speed."""

    def __init__(self, speeds: Mapping[str, KindSpeed] = DEFAULT_SPEEDS, *, detour: float = DEFAULT_DETOUR) -> None:
        if not 1.0 <= detour <= 5.0:
            raise ValueError(f"detour factor must be in [1, 5], got {detour}")
        self._speeds = dict(speeds)
        self.detour = detour

    def etas(self, units: Sequence[Placed], lat: float, lon: float) -> dict[str, Eta]:
        out: dict[str, Eta] = {}
        for unit in units:
            speed = self._speeds.get(unit.kind)
            if speed is None:
                continue
            metres = distance_m((unit.lat, unit.lon), (lat, lon)) * self.detour
            out[unit.id] = Eta(metres / speed.street_mps, metres)
        return out


class Snap(NamedTuple):
    """A point's nearest place on the street graph: edge `edge`, fraction `t` of the way
    from its first to its second node, `off_m` metres away from the street."""

    edge: int
    t: float
    off_m: float


class StreetGraph:
    """An undirected street graph: every LineString vertex is a node, consecutive vertices
    are joined by an edge as long as the great-circle distance between them (the same
    rules as the simulator's `City`, so the two agree on the built-in city)."""

    def __init__(self, edges: Iterable[tuple[LatLon, LatLon, str]], *, name: str = "") -> None:
        self.name = name
        index: dict[LatLon, int] = {}
        seen: set[tuple[int, int]] = set()
        a_idx: list[int] = []
        b_idx: list[int] = []
        lengths: list[float] = []
        kinds: list[str] = []
        for a, b, kind in edges:
            if a == b:
                continue
            ia = index.setdefault(a, len(index))
            ib = index.setdefault(b, len(index))
            key = (min(ia, ib), max(ia, ib))
            if key in seen:
                continue
            seen.add(key)
            a_idx.append(ia)
            b_idx.append(ib)
            lengths.append(distance_m(a, b))
            kinds.append(kind)
        if not lengths:
            raise StreetsError("the map has no streets")
        self.nodes: tuple[LatLon, ...] = tuple(index)
        self.edge_a: IntArray = np.asarray(a_idx, dtype=np.int64)
        self.edge_b: IntArray = np.asarray(b_idx, dtype=np.int64)
        self.edge_m: FloatArray = np.asarray(lengths, dtype=np.float64)
        self.edge_kind: tuple[str, ...] = tuple(kinds)
        self.adjacency: tuple[tuple[tuple[int, int], ...], ...] = self._adjacency()
        lats = [p[0] for p in self.nodes]
        lons = [p[1] for p in self.nodes]
        self.origin: LatLon = ((min(lats) + max(lats)) / 2, (min(lons) + max(lons)) / 2)
        self._kx = math.radians(1.0) * EARTH_RADIUS_M * math.cos(math.radians(self.origin[0]))
        self._ky = math.radians(1.0) * EARTH_RADIUS_M
        xy = np.asarray([self._xy(p) for p in self.nodes], dtype=np.float64)
        self._ax, self._ay = xy[self.edge_a, 0], xy[self.edge_a, 1]
        self._dx, self._dy = xy[self.edge_b, 0] - self._ax, xy[self.edge_b, 1] - self._ay
        self._len2 = np.maximum(self._dx * self._dx + self._dy * self._dy, 1e-12)

    def _adjacency(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Per node: (neighbour node, edge index)."""
        adj: list[list[tuple[int, int]]] = [[] for _ in self.nodes]
        for e, (a, b) in enumerate(zip(self.edge_a.tolist(), self.edge_b.tolist(), strict=True)):
            adj[a].append((b, e))
            adj[b].append((a, e))
        return tuple(tuple(row) for row in adj)

    @classmethod
    def from_geojson(cls, data: Mapping[str, Any], *, street_kinds: frozenset[str] = STREET_KINDS) -> StreetGraph:
        """Build from a parsed GeoJSON FeatureCollection of LineStrings ([lon, lat]).
        Properties used: `kind` (a street if in `street_kinds`; default `residential`)."""
        if data.get("type") != "FeatureCollection" or not isinstance(data.get("features"), list):
            raise StreetsError("want a GeoJSON FeatureCollection")
        edges: list[tuple[LatLon, LatLon, str]] = []
        for n, feature in enumerate(data["features"]):
            if not isinstance(feature, Mapping):
                raise StreetsError(f"feature {n}: not an object")
            geometry = feature.get("geometry") or {}
            props = feature.get("properties") or {}
            if geometry.get("type") != "LineString":
                continue
            kind = str(props.get("kind", "residential"))
            if kind not in street_kinds:
                continue
            try:
                points = [(round(float(lat), 7), round(float(lon), 7)) for lon, lat, *_ in geometry["coordinates"]]
            except (TypeError, ValueError, KeyError) as exc:
                raise StreetsError(f"feature {n}: bad coordinates ({exc})") from None
            for lat, lon in points:
                if not (-90 <= lat <= 90 and -180 <= lon <= 180):
                    raise StreetsError(f"feature {n}: ({lat}, {lon}) is not WGS84 lat/lon")
            edges.extend((a, b, kind) for a, b in itertools.pairwise(points))
        return cls(edges, name=str(data.get("name", "")))

    def _xy(self, point: LatLon) -> tuple[float, float]:
        return (point[1] - self.origin[1]) * self._kx, (point[0] - self.origin[0]) * self._ky

    def snap(self, lat: float, lon: float) -> Snap:
        """The nearest point on any street to (lat, lon); ties go to the lower edge index."""
        x, y = self._xy((lat, lon))
        px, py = x - self._ax, y - self._ay
        t = np.clip((px * self._dx + py * self._dy) / self._len2, 0.0, 1.0)
        ex, ey = px - t * self._dx, py - t * self._dy
        d2 = ex * ex + ey * ey
        e = int(np.argmin(d2))
        return Snap(e, float(t[e]), math.sqrt(float(d2[e])))

    def dijkstra(
        self, sources: Iterable[tuple[int, float, float]], edge_s: FloatArray
    ) -> tuple[FloatArray, FloatArray]:
        """Shortest times from `sources` ((node, seconds, metres) already spent) to every
        node, with `edge_s` seconds per edge. Returns (seconds, metres along that route);
        unreachable nodes are `inf`."""
        best = np.full(len(self.nodes), math.inf)
        metres = np.full(len(self.nodes), math.inf)
        heap: list[tuple[float, int, float]] = []
        for node, secs, m in sources:
            if secs < best[node]:
                best[node], metres[node] = secs, m
                heapq.heappush(heap, (secs, node, m))
        cost = edge_s.tolist()
        length = self.edge_m.tolist()
        done = [False] * len(self.nodes)
        while heap:
            secs, node, m = heapq.heappop(heap)
            if done[node]:
                continue
            done[node] = True
            for nxt, e in self.adjacency[node]:
                ns = secs + cost[e]
                if ns < best[nxt]:
                    best[nxt], metres[nxt] = ns, m + length[e]
                    heapq.heappush(heap, (ns, nxt, m + length[e]))
        return best, metres


class StreetEta:
    """Arrival times along the street graph: one Dijkstra per (target, unit kind), cached
    (the last `cache_size` targets), then O(1) per unit plus its projection onto a street."""

    def __init__(self, graph: StreetGraph, speeds: Mapping[str, KindSpeed] = DEFAULT_SPEEDS, *,
                 cache_size: int = 64) -> None:
        self.graph = graph
        self._speeds = dict(speeds)
        self._edge_s: dict[str, FloatArray] = {}
        for kind, speed in self._speeds.items():
            per_edge = np.asarray([speed.on(k) for k in graph.edge_kind], dtype=np.float64)
            self._edge_s[kind] = graph.edge_m / per_edge
        self._cache: OrderedDict[tuple[float, float, str], tuple[Snap, FloatArray, FloatArray]] = OrderedDict()
        self._cache_size = cache_size
        #: How many Dijkstra searches have run (for tests and the benchmark).
        self.searches = 0

    def _from_target(self, lat: float, lon: float, kind: str) -> tuple[Snap, FloatArray, FloatArray]:
        key = (round(lat, 7), round(lon, 7), kind)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        g = self.graph
        snap = g.snap(lat, lon)
        e_s = float(self._edge_s[kind][snap.edge])
        e_m = float(g.edge_m[snap.edge])
        a, b = int(g.edge_a[snap.edge]), int(g.edge_b[snap.edge])
        sources = [(a, snap.t * e_s, snap.t * e_m), (b, (1 - snap.t) * e_s, (1 - snap.t) * e_m)]
        secs, metres = g.dijkstra(sources, self._edge_s[kind])
        self.searches += 1
        entry = (snap, secs, metres)
        self._cache[key] = entry
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return entry

    def etas(self, units: Sequence[Placed], lat: float, lon: float) -> dict[str, Eta]:
        g = self.graph
        out: dict[str, Eta] = {}
        for unit in units:
            speed = self._speeds.get(unit.kind)
            if speed is None:
                continue
            target, secs, metres = self._from_target(lat, lon, unit.kind)
            edge_s = self._edge_s[unit.kind]
            here = g.snap(unit.lat, unit.lon)
            e_s, e_m = float(edge_s[here.edge]), float(g.edge_m[here.edge])
            a, b = int(g.edge_a[here.edge]), int(g.edge_b[here.edge])
            options = [
                (float(secs[a]) + here.t * e_s, float(metres[a]) + here.t * e_m),
                (float(secs[b]) + (1 - here.t) * e_s, float(metres[b]) + (1 - here.t) * e_m),
            ]
            if here.edge == target.edge:  # same street segment: straight along it
                frac = abs(here.t - target.t)
                options.append((frac * e_s, frac * e_m))
            along_s, along_m = min(options)
            if not math.isfinite(along_s):
                continue  # another component of the graph
            off_m = here.off_m + target.off_m
            out[unit.id] = Eta(along_s + off_m / speed.off_street_mps, along_m + off_m)
        return out


__all__ = [
    "DEFAULT_DETOUR",
    "DEFAULT_SPEEDS",
    "STREET_KINDS",
    "UNIT_KINDS",
    "Eta",
    "EtaModel",
    "KindSpeed",
    "Placed",
    "Snap",
    "StraightLineEta",
    "StreetEta",
    "StreetGraph",
    "StreetsError",
]
