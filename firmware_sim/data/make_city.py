"""Generate the built-in city, `city.geojson` beside this script:

    .venv/bin/python -m firmware_sim.data.make_city

"Riverford" is fictional: an irregular street grid about 3 x 3 km centred on
51.5000, -0.1200 (WGS84), cut east-west by a meandering river crossed by a few bridges
and one road tunnel, with a second tunnel where a street passes under a railway.
Streets are GeoJSON LineStrings in [lon, lat] order with properties `name`, `kind`
(`primary` or `residential`), `bridge` and `tunnel`. Every vertex is a junction
shared exactly by the streets that meet there; `firmware_sim.city` builds its graph
from them. The output is fully determined by `SEED`: rerunning rewrites the same file.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections import deque
from pathlib import Path

SEED = 20260101
ORIGIN = (51.5000, -0.1200)
HALF_SIZE_M = 1500.0
EARTH_RADIUS_M = 6_371_008.8
#: The river runs between the rows either side of y = RIVER_Y_M (metres north of ORIGIN).
RIVER_Y_M = -200.0
RIVER_GAP_M = 240.0

COLUMN_NAMES = [
    "Abbey", "Bridge", "Canal", "Dock", "Elm", "Friars", "Granary", "Hatter", "Ivy", "Juniper",
    "Kiln", "Lamb", "Market", "Navigation", "Orchard", "Pump", "Quarry", "Rope", "Saddler", "Tanner",
]
ROW_NAMES = [
    "Alder", "Beacon", "Chapel", "Drover", "Exchange", "Foundry", "Guild", "Harbour", "Inkerman", "Jubilee",
    "Kings", "Lantern", "Mill", "North", "Oak", "Priory", "Queens", "Regent", "Station", "Tower",
]

Node = tuple[int, int]  # (column, row)


def _lines(rng: random.Random, gap_at: float | None) -> list[float]:
    """Street positions (metres) from -HALF_SIZE_M to +HALF_SIZE_M, irregularly spaced,
    leaving a street-free band RIVER_GAP_M wide centred on `gap_at` if given."""
    out = [-HALF_SIZE_M + rng.uniform(0, 60)]
    while True:
        nxt = out[-1] + rng.uniform(150, 260)
        if gap_at is not None and out[-1] < gap_at and nxt > gap_at - RIVER_GAP_M / 2 - 60:
            bank = gap_at - RIVER_GAP_M / 2
            if bank - out[-1] < 90:
                out.pop()
            out.extend((bank, bank + RIVER_GAP_M))
            continue
        if nxt > HALF_SIZE_M:
            return out
        out.append(nxt)


def river_y(x: float) -> float:
    """The river's centre line (metres north of ORIGIN) at `x` metres east."""
    return RIVER_Y_M + 35 * math.sin(x / 800.0)


def _to_latlon(x: float, y: float) -> tuple[float, float]:
    lat = ORIGIN[0] + math.degrees(y / EARTH_RADIUS_M)
    lon = ORIGIN[1] + math.degrees(x / (EARTH_RADIUS_M * math.cos(math.radians(ORIGIN[0]))))
    return round(lat, 7), round(lon, 7)


def _connected(nodes: set[Node], edges: set[frozenset[Node]]) -> bool:
    adj: dict[Node, list[Node]] = {n: [] for n in nodes}
    for edge in edges:
        a, b = tuple(edge)
        adj[a].append(b)
        adj[b].append(a)
    start = next(iter(sorted(nodes)))
    seen = {start}
    todo = deque([start])
    while todo:
        for nxt in adj[todo.popleft()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return len(seen) == len(nodes)


def build() -> dict[str, object]:
    """The city as a GeoJSON FeatureCollection (a dict ready for `json.dump`)."""
    rng = random.Random(SEED)
    xs = _lines(rng, None)
    ys = _lines(rng, RIVER_Y_M)
    south_bank = max(i for i, y in enumerate(ys) if y < RIVER_Y_M)

    def warp(i: int, j: int) -> tuple[float, float]:
        x, y = xs[i], ys[j]
        x += 45 * math.sin(y / 700.0) + rng.uniform(-12, 12)
        y += 20 * math.sin(x / 600.0 + 1.0) + rng.uniform(-10, 10)
        return x, y

    nodes = {(i, j) for i in range(len(xs)) for j in range(len(ys))}
    xy = {node: warp(*node) for node in sorted(nodes)}
    edges: set[frozenset[Node]] = set()
    for i, j in sorted(nodes):
        if i + 1 < len(xs):
            edges.add(frozenset({(i, j), (i + 1, j)}))
        if j + 1 < len(ys):
            edges.add(frozenset({(i, j), (i, j + 1)}))

    # The river: only some columns cross it, as bridges; one crosses in a tunnel.
    crossings = [i for i in range(1, len(xs) - 1) if i % 3 == 1]
    tunnel_column = crossings[len(crossings) // 2]
    for i in range(len(xs)):
        if i not in crossings:
            edges.discard(frozenset({(i, south_bank), (i, south_bank + 1)}))
    special: dict[frozenset[Node], dict[str, object]] = {}
    for i in crossings:
        edge = frozenset({(i, south_bank), (i, south_bank + 1)})
        if i == tunnel_column:
            special[edge] = {"name": "Riverford Tunnel", "kind": "primary", "tunnel": True, "bridge": False}
        else:
            special[edge] = {"name": f"{COLUMN_NAMES[i % len(COLUMN_NAMES)]} Bridge", "kind": "primary",
                             "tunnel": False, "bridge": True}
    # A railway runs north-south near the east side; one street passes under it.
    rail_row = south_bank + 4
    rail_col = len(xs) - 5
    rail_edge = frozenset({(rail_col, rail_row), (rail_col + 1, rail_row)})
    special[rail_edge] = {"name": "Station Underpass", "kind": "primary", "tunnel": True, "bridge": False}
    for j in range(len(ys)):
        if j != rail_row:
            edges.discard(frozenset({(rail_col, j), (rail_col + 1, j)}))

    # Knock out some ordinary blocks so the grid is not regular, keeping it connected.
    for edge in sorted(edges, key=sorted):
        if edge in special or rng.random() > 0.12:
            continue
        edges.discard(edge)
        if not _connected(nodes, edges):
            edges.add(edge)

    features: list[dict[str, object]] = []

    def emit(points: list[Node], props: dict[str, object]) -> None:
        coords = [list(reversed(_to_latlon(*xy[p]))) for p in points]
        features.append({"type": "Feature", "properties": props, "geometry": {"type": "LineString",
                                                                           "coordinates": coords}})

    def streets(line: list[Node], name: str, kind: str) -> None:
        run: list[Node] = [line[0]]
        for a, b in itertools.pairwise(line):
            edge = frozenset({a, b})
            if edge in edges and edge not in special:
                run.append(b)
                continue
            if len(run) > 1:
                emit(run, {"name": name, "kind": kind, "tunnel": False, "bridge": False})
            if edge in special:
                emit([a, b], special[edge])
            run = [b]
        if len(run) > 1:
            emit(run, {"name": name, "kind": kind, "tunnel": False, "bridge": False})

    for i in range(len(xs)):
        kind = "primary" if i % 4 == 2 else "residential"
        suffix = "Road" if kind == "primary" else "Street"
        streets([(i, j) for j in range(len(ys))], f"{COLUMN_NAMES[i % len(COLUMN_NAMES)]} {suffix}", kind)
    for j in range(len(ys)):
        kind = "primary" if j % 4 == 1 else "residential"
        suffix = "Avenue" if kind == "primary" else "Lane"
        streets([(i, j) for i in range(len(xs))], f"{ROW_NAMES[j % len(ROW_NAMES)]} {suffix}", kind)

    river = [[*reversed(_to_latlon(x, river_y(x)))] for x in range(-1500, 1501, 100)]
    features.append({"type": "Feature", "properties": {"name": "River Ford", "kind": "river"},
                     "geometry": {"type": "LineString", "coordinates": river}})
    return {
        "type": "FeatureCollection",
        "name": "Riverford (fictional)",
        "origin": [ORIGIN[1], ORIGIN[0]],
        "generator": "firmware_sim/data/make_city.py",
        "seed": SEED,
        "features": features,
    }


def main() -> None:
    out = Path(__file__).with_name("city.geojson")
    out.write_text(json.dumps(build(), separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
