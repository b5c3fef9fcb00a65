"""Street-graph arrival times: Dijkstra on a tiny hand-made graph, off-street legs, the
one-search-per-target cache, the straight-line fallback, and agreement with the
simulator's city on the built-in map."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from typing import Any

import pytest

from edge_agent.wire.geo import distance_m, offset
from firmware_sim.city import City
from gateway.core.streets import KindSpeed, StraightLineEta, StreetEta, StreetGraph, StreetsError

ORIGIN = (51.5, -0.12)
SPEEDS = {"officer": KindSpeed(2.0, 1.0), "vehicle": KindSpeed(10.0, 5.0, {"primary": 20.0})}


@dataclass(frozen=True)
class U:
    id: str
    kind: str
    lat: float
    lon: float


def at(north: float, east: float) -> tuple[float, float]:
    lat, lon = offset(ORIGIN, north, east)
    return round(lat, 7), round(lon, 7)


def line(*points: tuple[float, float], kind: str = "residential") -> dict[str, Any]:
    return {"type": "Feature", "properties": {"kind": kind},
            "geometry": {"type": "LineString", "coordinates": [[lon, lat] for lat, lon in points]}}


def square() -> StreetGraph:
    """A 1 km x 1 km square: A(0,0) - B(0,1000) residential, A - C(1000,0) primary,
    C - D(1000,1000) residential, B - D residential; plus a river (scenery)."""
    a, b, c, d = at(0, 0), at(0, 1000), at(1000, 0), at(1000, 1000)
    return StreetGraph.from_geojson({"type": "FeatureCollection", "features": [
        line(a, b), line(a, c, kind="primary"), line(c, d), line(b, d), line(a, d, kind="river"),
    ]})


def test_dijkstra_on_a_tiny_graph() -> None:
    model = StreetEta(square(), SPEEDS)
    d = at(1000, 1000)
    units = [U("walker", "officer", *at(0, 0)), U("van", "vehicle", *at(0, 0))]
    etas = model.etas(units, *d)
    # on foot: 2,000 m at 2 m/s either way round
    assert etas["walker"].seconds == pytest.approx(1000, rel=1e-3)
    assert etas["walker"].metres == pytest.approx(2000, rel=1e-3)
    # by van: A-C is primary (20 m/s) then C-D at 10 m/s = 150 s, faster than A-B-D (200 s)
    assert etas["van"].seconds == pytest.approx(150, rel=1e-3)
    assert model.searches == 2  # one per kind, not per unit


def test_mid_edge_positions_and_off_street_legs() -> None:
    model = StreetEta(square(), SPEEDS)
    # a walker halfway along A-B, 10 m off the street; target 100 m along B-D from B
    walker = U("w", "officer", *at(-10, 500))
    eta = model.etas([walker], *at(100, 1000))["w"]
    assert eta.metres == pytest.approx(500 + 100 + 10, abs=1)
    assert eta.seconds == pytest.approx(600 / 2.0 + 10 / 1.0, abs=1)
    # the same street segment: straight along it
    near = U("n", "officer", *at(0, 400))
    assert model.etas([near], *at(0, 700))["n"].metres == pytest.approx(300, abs=1)


def test_one_search_per_target_and_kind_is_cached() -> None:
    model = StreetEta(square(), SPEEDS)
    units = [U(f"u{i}", "officer", *at(0, 100 * i)) for i in range(10)]
    for _ in range(3):
        model.etas(units, *at(1000, 1000))
    assert model.searches == 1


def test_unknown_kind_and_disconnected_parts_are_left_out() -> None:
    island = StreetGraph.from_geojson({"type": "FeatureCollection", "features": [
        line(at(0, 0), at(0, 100)), line(at(5000, 5000), at(5000, 5100)),
    ]})
    model = StreetEta(island, SPEEDS)
    etas = model.etas([U("far", "officer", *at(5000, 5050)), U("bike", "bicycle", *at(0, 10))], *at(0, 50))
    assert etas == {}


def test_straight_line_fallback() -> None:
    model = StraightLineEta(SPEEDS, detour=1.3)
    here, there = at(0, 0), at(300, 400)
    eta = model.etas([U("w", "officer", *here)], *there)["w"]
    assert eta.metres == pytest.approx(distance_m(here, there) * 1.3)
    assert eta.seconds == pytest.approx(eta.metres / 2.0)
    with pytest.raises(ValueError, match="detour"):
        StraightLineEta(SPEEDS, detour=0.5)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"type": "Feature"}, "FeatureCollection"),
        ({"type": "FeatureCollection", "features": []}, "no streets"),
        ({"type": "FeatureCollection", "features": [line((95.0, 0.0), (0.0, 0.0))]}, "WGS84"),
    ],
)
def test_bad_maps_are_refused(data: dict[str, Any], message: str) -> None:
    with pytest.raises(StreetsError, match=message):
        StreetGraph.from_geojson(data)


def test_agrees_with_the_simulator_city_between_junctions() -> None:
    text = resources.files("firmware_sim.data").joinpath("city.geojson").read_text(encoding="utf-8")
    graph = StreetGraph.from_geojson(json.loads(text))
    city = City.builtin()
    assert len(graph.nodes) == len(city.nodes)
    model = StreetEta(graph, {"vehicle": KindSpeed(10.0, 5.0)})
    rng = random.Random(3)
    for _ in range(20):
        a, b = city.random_node(rng), city.random_node(rng)
        eta = model.etas([U("v", "vehicle", *a)], *b)["v"]
        assert eta.seconds == pytest.approx(city.travel_time_s(a, b, 10.0), rel=1e-6, abs=1e-6)
