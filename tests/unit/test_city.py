"""The built-in city: a connected street graph, shortest paths, patrol loops, tunnels."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections import deque
from importlib import resources

import pytest

from edge_agent.drivers.gps import Route
from edge_agent.wire.geo import distance_m
from firmware_sim.city import City, CityError, Tunnel
from firmware_sim.data import make_city


@pytest.fixture(scope="module")
def city() -> City:
    return City.builtin()


def test_builtin_city_is_a_plausible_three_km_square(city: City) -> None:
    south, west, north, east = city.bounds
    assert distance_m((south, west), (north, west)) == pytest.approx(3000, rel=0.05)
    assert distance_m((south, west), (south, east)) == pytest.approx(3000, rel=0.05)
    assert distance_m(city.centre, (51.5, -0.12)) < 100
    assert 150 < len(city.nodes) < 600
    lengths = [length for a in city.nodes for length in city.neighbours(a).values()]
    assert 100 < sorted(lengths)[len(lengths) // 2] < 300  # city blocks
    assert {s.name for s in city.streets if s.bridge}
    assert [s.kind for s in city.scenery] == ["river"]
    assert City.builtin() is city


def test_graph_is_connected(city: City) -> None:
    seen = {city.nodes[0]}
    todo = deque([city.nodes[0]])
    while todo:
        for nxt in city.neighbours(todo.popleft()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(city.nodes)


def test_shipped_geojson_is_what_the_generator_makes() -> None:
    shipped = json.loads(resources.files("firmware_sim.data").joinpath("city.geojson").read_text(encoding="utf-8"))
    assert shipped == json.loads(json.dumps(make_city.build()))


def _bellman_ford(city: City, source: tuple[float, float]) -> dict[tuple[float, float], float]:
    dist = dict.fromkeys(city.nodes, math.inf)
    dist[source] = 0.0
    for _ in range(len(city.nodes)):
        changed = False
        for a in city.nodes:
            for b, length in city.neighbours(a).items():
                if dist[a] + length < dist[b] - 1e-9:
                    dist[b] = dist[a] + length
                    changed = True
        if not changed:
            return dist
    return dist


def test_shortest_paths_follow_streets_and_are_shortest(city: City) -> None:
    rng = random.Random(5)
    for _ in range(4):
        source = city.random_node(rng)
        truth = _bellman_ford(city, source)
        for _ in range(10):
            target = city.random_node(rng)
            path = city.shortest_path(source, target)
            assert path[0] == source
            assert path[-1] == target
            assert len(set(path)) == len(path)
            assert all(city.is_edge(a, b) for a, b in itertools.pairwise(path))
            assert city.path_length_m(path) == pytest.approx(truth[target], abs=1e-6)
    node = city.nodes[10]
    assert city.shortest_path(node, node) == [node]


def test_points_are_snapped_to_the_nearest_junction(city: City) -> None:
    a, b = city.nodes[0], city.nodes[-1]
    near_a = (a[0] + 0.0001, a[1])  # 11 m north
    assert city.nearest_node(near_a) == a
    assert city.shortest_path(near_a, b) == city.shortest_path(a, b)


def test_travel_time(city: City) -> None:
    a, b = city.nodes[3], city.nodes[-3]
    length = city.path_length_m(city.shortest_path(a, b))
    assert city.travel_time_s(a, b, 10.0) == pytest.approx(length / 10.0)
    assert length >= distance_m(a, b)
    with pytest.raises(ValueError, match="speed"):
        city.travel_time_s(a, b, 0.0)


@pytest.mark.parametrize(("seed", "length_m"), [(1, 1500), (2, 3000), (3, 5000), (4, 8000), (5, 3000)])
def test_patrol_loops_are_closed_loops_on_streets(city: City, seed: int, length_m: float) -> None:
    loop = city.patrol_route(random.Random(seed), length_m)
    assert len(loop) >= 3
    # every leg, including the closing one, is a street
    assert all(city.is_edge(a, b) for a, b in itertools.pairwise((*loop, loop[0])))
    total = city.path_length_m(loop, closed=True)
    assert total == pytest.approx(length_m, rel=0.3)
    route = Route(loop)
    assert route.length_m == pytest.approx(total)
    # driving it never leaves the streets
    for d in range(0, int(route.length_m), 37):
        lat, lon, _ = route.at(float(d))
        assert city.distance_to_street_m((lat, lon)) < 0.5


def test_patrol_loops_are_deterministic_and_can_start_anywhere(city: City) -> None:
    assert city.patrol_route(random.Random(9), 4000) == city.patrol_route(random.Random(9), 4000)
    assert city.patrol_route(random.Random(9), 4000) != city.patrol_route(random.Random(10), 4000)
    start = city.nodes[42]
    assert city.patrol_route(random.Random(1), 2000, start=start)[0] == start


def test_random_points_on_streets(city: City) -> None:
    rng = random.Random(3)
    for _ in range(50):
        assert city.distance_to_street_m(city.random_point_on_street(rng)) < 0.5


def test_tunnels_cover_their_street_between_the_portals(city: City) -> None:
    assert [t.name for t in city.tunnels] == ["Riverford Tunnel", "Station Underpass"]
    for tunnel in city.tunnels:
        assert 150 < tunnel.length_m < 400
        a, b = tunnel.path[0], tunnel.path[-1]
        middle = ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)
        assert tunnel.contains(middle)
        assert not tunnel.contains(a)  # the junction at the end is in the open
        assert not tunnel.contains(b)
        assert not tunnel.contains((middle[0] + 0.001, middle[1]))  # 110 m to one side
        # a crossing street's junction is never under cover
        assert not any(tunnel.contains(n) for n in city.nodes)


def test_tunnel_portals() -> None:
    tunnel = Tunnel("t", ((51.5, -0.12), (51.5018, -0.12)), half_width_m=10, portal_m=25)  # ~200 m north
    assert not tunnel.contains((51.5 + 20 / 111_195, -0.12))
    assert tunnel.contains((51.5 + 30 / 111_195, -0.12))
    with pytest.raises(ValueError, match="2 points"):
        Tunnel("t", ((51.5, -0.12),))


def test_bad_map_data_is_refused() -> None:
    with pytest.raises(CityError, match="FeatureCollection"):
        City.from_geojson({"type": "Feature"})
    with pytest.raises(CityError, match="no streets"):
        City.from_geojson({"type": "FeatureCollection", "features": []})
    bad = {"type": "LineString", "coordinates": [[0.0, 95.0], [0.0, 51.0]]}
    with pytest.raises(CityError, match="WGS84"):
        City.from_geojson({"type": "FeatureCollection", "features": [{"geometry": bad, "properties": {}}]})
