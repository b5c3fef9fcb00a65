"""Scenario files: a city, its units and fixed sensors, a timeline of incidents and faults.

    scenario = load_scenario("city-shift")               # a built-in, by name
    scenario = load_scenario(Path("my.yaml"), seed=7)    # a file
    for name, description in builtin_scenarios(): ...

A scenario is YAML (documented in docs/scenarios.md, schema docs/schemas/scenario.json).
Loading validates everything and raises `ScenarioError` naming the file, the line and
the field, e.g. `my.yaml:14: units[2].route[1]: unknown place 'Nowhere Street'`.
The result is a frozen, fully resolved `Scenario`: unit groups expanded to one
`UnitSpec` per device, places resolved to WGS84 points, times in seconds from the
start of the run. Nothing here does I/O beyond reading the file, and nothing random:
per-device seeds are derived from the scenario seed and the device id (`derive_seed`),
so a run is reproducible and independent of how devices are ordered or sharded.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from edge_agent.config import line_numbered_map, yaml_12_booleans
from edge_agent.errors import ConfigError
from edge_agent.wire.geo import LatLon
from edge_agent.wire.ids import InvalidId, check_id
from firmware_sim.city import City, CityError

UNIT_TYPES = ("officer", "vehicle", "tracker")
SENSOR_TYPES = ("acoustic", "anpr")
INCIDENT_TYPES = ("panic", "man_down", "gunshot", "hotlist_vehicle", "crash", "holster", "bodycam")
FAULT_TYPES = (
    "link_flap", "link_outage", "broker_outage", "clock_skew", "gps_jump", "gps_loss", "sensor_dropout",
    "revoked", "forged", "replay", "malformed",
)
#: Walking pace and a city driving speed, m/s.
DEFAULT_SPEED = {"officer": 1.4, "vehicle": 9.0, "tracker": 9.0}
DEFAULT_PATROL_M = {"officer": 2000.0, "vehicle": 6000.0, "tracker": 6000.0}
MAX_DEVICES = 20_000
TOP_KEYS = (
    "name", "description", "seed", "duration", "speed", "repeat", "city", "places", "agent", "units", "sensors",
    "incidents", "faults",
)
_GROUP_KEYS = {
    "units": ("type", "id", "count", "route", "patrol_m", "start", "speed_mps", "rate_hz", "shift", "capabilities",
              "supervisors"),
    "sensors": ("type", "id", "count", "at", "heading", "clock_error_ms", "range_m", "misread_rate"),
}
INCIDENT_KEYS = ("at", "type", "unit", "place", "plate", "route", "speed_mps", "decel_g", "on")
FAULT_KEYS = (
    "at", "type", "unit", "units", "for", "down", "up", "cycles", "offset", "offset_m", "sensor", "reconnect_after",
    "count",
)
BUILTIN_PACKAGE = "firmware_sim.scenarios"


class ScenarioError(ConfigError):
    """A scenario that cannot be run: says where (file:line), which field and what is wrong."""

    def __init__(self, source: str, line: int | None, path: str, message: str) -> None:
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {path}: {message}" if path else f"{where}: {message}")
        self.source, self.line, self.path, self.message = source, line, path, message


# -- YAML with line numbers ------------------------------------------------------------


class _Map(dict[Any, Any]):
    """A YAML mapping that remembers its line and each value's line."""

    line: int = 0
    lines: dict[Any, int]


class _List(list[Any]):
    """A YAML sequence that remembers its line and each item's line."""

    line: int = 0
    lines: list[int]


class _Loader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML ships no type hints
    """Safe YAML, plus line numbers on every mapping and sequence; duplicate keys are
    errors; only true/false are booleans (YAML 1.2), so `on`, `no` and `yes` stay text."""

    source = "<scenario>"


yaml_12_booleans(_Loader)


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> _Map:
    def fail(line: int, message: str) -> ScenarioError:
        return ScenarioError(loader.source, line, "", message)

    result: _Map = line_numbered_map(loader, node, _Map(), fail)
    return result


def _construct_list(loader: _Loader, node: yaml.SequenceNode) -> _List:
    out = _List(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.lines = [child.start_mark.line + 1 for child in node.value]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_list)


def _parse_yaml(text: str, source: str) -> Any:
    loader = _Loader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise ScenarioError(source, line, "", f"not valid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ScenarioError(source, None, "", f"not valid YAML: {exc}") from None
    finally:
        loader.dispose()


# -- typed reading with a location --------------------------------------------------------


@dataclass(frozen=True)
class _At:
    """Where a value is: file, line and field path; `fail` raises a `ScenarioError` there."""

    source: str
    line: int
    path: str

    def fail(self, message: str) -> ScenarioError:
        return ScenarioError(self.source, self.line, self.path, message)

    def key(self, container: _Map, key: str) -> _At:
        line = container.lines.get(key, container.line) if isinstance(container, _Map) else self.line
        return _At(self.source, line, f"{self.path}.{key}" if self.path else key)

    def item(self, container: _List, index: int) -> _At:
        line = container.lines[index] if isinstance(container, _List) else self.line
        return _At(self.source, line, f"{self.path}[{index}]")


class _Fields:
    """Reads the fields of one YAML mapping; `done()` rejects keys nobody asked for."""

    def __init__(self, value: Any, at: _At, what: str, keys: Iterable[str] = ()) -> None:
        if not isinstance(value, _Map):
            raise at.fail(f"{what} must be a mapping of fields, got {_kind(value)}")
        self.map, self.at, self._seen = value, at, set[str]()
        if keys:
            self.done(keys)

    def has(self, key: str) -> bool:
        return key in self.map

    def where(self, key: str) -> _At:
        return self.at.key(self.map, key)

    def get(self, key: str, convert: Callable[[Any, _At], Any], default: Any = None) -> Any:
        self._seen.add(key)
        if key not in self.map or self.map[key] is None:
            return default
        return convert(self.map[key], self.where(key))

    def need(self, key: str, convert: Callable[[Any, _At], Any]) -> Any:
        self._seen.add(key)
        if key not in self.map or self.map[key] is None:
            raise self.at.fail(f"missing required field {key!r}")
        return convert(self.map[key], self.where(key))

    def done(self, allowed_extra: Iterable[str] = ()) -> None:
        known = self._seen | set(allowed_extra)
        for key in self.map:
            if key not in known:
                hint = difflib.get_close_matches(key, sorted(known), n=1)
                tip = f" (did you mean {hint[0]!r}?)" if hint else f" (known: {', '.join(sorted(known))})"
                raise self.where(key).fail(f"unknown field{tip}")


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, str):
        return f"the text {value!r}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _text(value: Any, at: _At) -> str:
    if not isinstance(value, str) or not value.strip():
        raise at.fail(f"must be text, got {_kind(value)} (quote it in YAML)")
    return value.strip()


def _one_line(value: Any, at: _At) -> str:
    text = _text(value, at)
    if "\n" in text:
        raise at.fail("must be one line")
    return text


def _ident(value: Any, at: _At) -> str:
    text = _text(value, at)
    try:
        return check_id(text)
    except InvalidId as exc:
        raise at.fail(str(exc)) from None


def _number(lo: float, hi: float, *, integer: bool = False) -> Callable[[Any, _At], Any]:
    def convert(value: Any, at: _At) -> float | int:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise at.fail(f"must be {'an integer' if integer else 'a number'}, got {_kind(value)}")
        if integer and value != int(value):
            raise at.fail(f"must be an integer, got {value}")
        if not lo <= value <= hi:
            raise at.fail(f"must be between {lo:g} and {hi:g}, got {value:g}")
        return int(value) if integer else float(value)

    return convert


def _flag(value: Any, at: _At) -> bool:
    if not isinstance(value, bool):
        raise at.fail(f"must be true or false, got {_kind(value)}")
    return value


_DURATION = re.compile(r"(?P<sign>[-+])?\s*(?P<parts>(?:\d+(?:\.\d+)?\s*(?:ms|h|m|s)\s*)+)")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any, *, signed: bool = False) -> float:
    """Seconds from a number or text like `90`, `90s`, `2m30s`, `1h`, `500ms` (`-5m` if
    `signed`). Raises ValueError with what is wrong."""
    if isinstance(value, bool):
        raise ValueError(f"must be a duration (e.g. 90, 90s, 2m30s), got {_kind(value)}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.fullmatch(value.strip())):
        seconds = sum(float(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(m["parts"]))
        if m["sign"] == "-":
            seconds = -seconds
    else:
        raise ValueError(f"must be a duration (e.g. 90, 90s, 2m30s, 1h), got {_kind(value)}")
    if not math.isfinite(seconds):
        raise ValueError("must be finite")
    if seconds < 0 and not signed:
        raise ValueError(f"must not be negative, got {value}")
    return seconds


def _duration(*, signed: bool = False, positive: bool = False) -> Callable[[Any, _At], float]:
    def convert(value: Any, at: _At) -> float:
        try:
            seconds = parse_duration(value, signed=signed)
        except ValueError as exc:
            raise at.fail(str(exc)) from None
        if positive and seconds <= 0:
            raise at.fail(f"must be longer than zero, got {value}")
        return seconds

    return convert


def _choice(options: tuple[str, ...]) -> Callable[[Any, _At], str]:
    def convert(value: Any, at: _At) -> str:
        if value not in options:
            hint = difflib.get_close_matches(str(value), options, n=1)
            tip = f"; did you mean {hint[0]!r}?" if hint else ""
            raise at.fail(f"must be one of {', '.join(options)}, got {value!r}{tip}")
        return str(value)

    return convert


def _list(value: Any, at: _At, *, min_items: int = 0) -> _List:
    if not isinstance(value, _List):
        raise at.fail(f"must be a list, got {_kind(value)}")
    if len(value) < min_items:
        raise at.fail(f"needs at least {min_items} item{'s' if min_items != 1 else ''}")
    return value


def derive_seed(seed: int, *parts: str) -> int:
    """A stable 63-bit seed for one part of a run (same on every machine and Python)."""
    digest = hashlib.blake2b(":".join([str(seed), *parts]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


# -- places --------------------------------------------------------------------------------


class Places:
    """Resolves a place in a scenario: `[lat, lon]`, a name from the scenario's `places`,
    a junction `Street A & Street B`, or a street name (its middle junction)."""

    def __init__(self, city: City, named: Mapping[str, LatLon] | None = None) -> None:
        self.city = city
        self.named = dict(named or {})
        self._streets: dict[str, list[LatLon]] = {}
        for street in city.streets:
            self._streets.setdefault(street.name.casefold(), []).extend(street.points)
        south, west, north, east = city.bounds
        pad = 0.02
        self._box = (south - pad, west - pad, north + pad, east + pad)

    def resolve(self, value: Any, at: _At) -> LatLon:
        if isinstance(value, list):
            return self._point(value, at)
        if not isinstance(value, str) or not value.strip():
            raise at.fail(f"must be a place: [lat, lon], a name from places, 'Street & Street' or a street, "
                          f"got {_kind(value)}")
        name = value.strip()
        if name in self.named:
            return self.named[name]
        if "&" in name:
            a, _, b = (part.strip() for part in name.partition("&"))
            pa, pb = self._street(a, at), self._street(b, at)
            common = sorted(set(pa) & set(pb))
            if not common:
                raise at.fail(f"{a!r} and {b!r} do not meet")
            return common[0]
        points = self._street(name, at)
        return points[len(points) // 2]

    def _street(self, name: str, at: _At) -> list[LatLon]:
        points = self._streets.get(name.casefold())
        if points is None:
            known = sorted({s.name for s in self.city.streets} | set(self.named))
            hint = difflib.get_close_matches(name, known, n=1)
            tip = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise at.fail(f"unknown place {name!r}{tip}")
        return points

    def _point(self, value: list[Any], at: _At) -> LatLon:
        if len(value) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            raise at.fail(f"a point must be [lat, lon] in degrees, got {list(value)!r}")
        lat, lon = float(value[0]), float(value[1])
        south, west, north, east = self._box
        if not (south <= lat <= north and west <= lon <= east):
            raise at.fail(
                f"[{lat}, {lon}] is outside the map ({south:.4f}..{north:.4f} N, {west:.4f}..{east:.4f} E); "
                "points are [lat, lon]"
            )
        return lat, lon


# -- the resolved scenario -----------------------------------------------------------------


@dataclass(frozen=True)
class UnitSpec:
    """One mobile device: an officer's kit, a vehicle unit or a plain tracker."""

    id: str
    type: Literal["officer", "vehicle", "tracker"]
    speed_mps: float
    rate_hz: float
    #: Explicit loop through these points (on streets), or a random patrol of `patrol_m`.
    route: tuple[LatLon, ...] | None
    patrol_m: float
    start: LatLon | None
    shift_start_s: float
    shift_end_s: float | None
    seed: int
    line: int
    group: str
    #: What the unit can do (armed, dog, traffic, first_aid, ...), for the gateway's registry.
    capabilities: tuple[str, ...] = ()
    supervisor: bool = False


@dataclass(frozen=True)
class SensorSpec:
    """One fixed sensor site."""

    id: str
    type: Literal["acoustic", "anpr"]
    site: LatLon
    #: ANPR: which way the camera looks (degrees from north).
    heading: float
    clock_error_ms: float
    range_m: float
    misread_rate: float
    seed: int
    line: int
    group: str


@dataclass(frozen=True)
class Event:
    """A timeline entry: an incident or a fault at `at_s` seconds after the start."""

    at_s: float
    type: str
    line: int
    index: int
    kind: ClassVar[str] = "event"

    @property
    def label(self) -> str:
        return f"{self.kind}s[{self.index}] {self.type}"


@dataclass(frozen=True)
class Incident(Event):
    kind: ClassVar[str] = "incident"
    #: The unit it happens to (panic, man_down, crash, holster, bodycam).
    unit: str | None = None
    place: LatLon | None = None
    plate: str | None = None
    route: tuple[LatLon, ...] = ()
    speed_mps: float = 12.0
    decel_g: float = 8.0
    on: bool = True


@dataclass(frozen=True)
class Fault(Event):
    kind: ClassVar[str] = "fault"
    units: tuple[str, ...] = ()
    for_s: float = 0.0
    down_s: float = 5.0
    up_s: float = 10.0
    cycles: int = 3
    offset_ms: int = 0
    offset_m: float = 300.0
    count: int = 5
    sensor: str | None = None
    reconnect_after_s: float = 5.0

    @property
    def unit(self) -> str:
        return self.units[0] if self.units else ""

    @property
    def end_s(self) -> float:
        """When the fault's effect ends (for faults with a duration)."""
        if self.type == "link_flap":
            return self.at_s + self.cycles * (self.down_s + self.up_s)
        return self.at_s + self.for_s


@dataclass(frozen=True)
class AgentDefaults:
    """Agent settings for every simulated device."""

    rate_hz: float = 1.0
    #: Devices started per real second (staggered connects).
    connect_rate: float = 100.0
    reconnect_max_s: float = 10.0
    #: Outbox re-send interval in real seconds (scaled to sim time by the speed).
    resend_after_s: float = 10.0


@dataclass(frozen=True)
class Scenario:
    """A validated scenario, every group expanded and every place resolved."""

    name: str
    description: str
    source: str
    seed: int
    duration_s: float
    speed: float
    city: City
    units: tuple[UnitSpec, ...]
    sensors: tuple[SensorSpec, ...]
    incidents: tuple[Incident, ...]
    faults: tuple[Fault, ...]
    agent: AgentDefaults = field(default_factory=AgentDefaults)
    #: Repeat the incident timeline every `duration_s` (a demo that runs until stopped).
    repeat: bool = False

    @property
    def device_ids(self) -> tuple[str, ...]:
        return tuple(u.id for u in self.units) + tuple(s.id for s in self.sensors)

    @property
    def devices(self) -> int:
        return len(self.units) + len(self.sensors)

    @property
    def specs(self) -> tuple[UnitSpec | SensorSpec, ...]:
        """Every device: units first, then fixed sensors."""
        return (*self.units, *self.sensors)

    def shard(self, index: int, count: int) -> Scenario:
        """Every `count`-th device from the `index`-th (0-based): one of `count` simulator
        processes sharing the fleet. Each shard starts its devices at `connect_rate /
        count`, so the whole fleet ramps up at the scenario's rate. Only for scenarios
        without incidents and faults (they name devices and act on the whole city)."""
        if not 0 <= index < count:
            raise ConfigError(f"shard must be I/K with 0 <= I < K, got {index}/{count}")
        if self.incidents or self.faults:
            raise ConfigError(f"{self.name}: a scenario with incidents or faults cannot be split into shards")
        return replace(
            self,
            units=self.units[index::count],
            sensors=self.sensors[index::count],
            agent=replace(self.agent, connect_rate=self.agent.connect_rate / count),
        )

    def unit(self, device_id: str) -> UnitSpec | SensorSpec:
        for spec in self.specs:
            if spec.id == device_id:
                return spec
        raise KeyError(device_id)


# -- groups ----------------------------------------------------------------------------------


@dataclass
class _Group:
    """A `units` or `sensors` entry before expansion."""

    fields: _Fields
    index: int
    section: str
    id: str
    count: int | None
    at_list: _List | None = None

    def ids(self, count: int | None = None) -> list[str]:
        n = self.count if count is None else count
        if n is None:
            return [self.id]
        width = max(3, len(str(n)))
        return [f"{self.id}-{i:0{width}d}" for i in range(1, n + 1)]


def _scale(groups: list[_Group], devices: int, at: _At) -> dict[int, int]:
    """New counts for the groups with a `count` so the run has `devices` devices in all."""
    fixed = sum(1 for g in groups if g.count is None)
    counted = [g for g in groups if g.count is not None and g.at_list is None]
    pinned = sum(g.count or 0 for g in groups if g.count is not None and g.at_list is not None)
    share = devices - fixed - pinned
    if not counted:
        raise at.fail(f"--devices {devices}: this scenario has no unit group with a 'count' to scale")
    if share < len(counted):
        raise at.fail(f"--devices {devices} is too few: it has {fixed + pinned} fixed devices and "
                      f"{len(counted)} groups that need at least one each")
    total = sum(g.count or 0 for g in counted)
    exact = [share * (g.count or 0) / total for g in counted]
    counts = [max(1, int(x)) for x in exact]
    order = sorted(range(len(counted)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    i = 0
    while sum(counts) < share:
        counts[order[i % len(order)]] += 1
        i += 1
    while sum(counts) > share:
        j = max(range(len(counts)), key=lambda k: counts[k])
        counts[j] -= 1
    return {id(g): c for g, c in zip(counted, counts, strict=True)}


# -- loading ---------------------------------------------------------------------------------


def builtin_names() -> list[str]:
    """Names of the scenarios shipped with the package."""
    folder = resources.files(BUILTIN_PACKAGE)
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def builtin_scenarios() -> Iterator[tuple[str, str]]:
    """(name, one-line description) of every built-in scenario."""
    for name in builtin_names():
        text = resources.files(BUILTIN_PACKAGE).joinpath(f"{name}.yaml").read_text(encoding="utf-8")
        data = _parse_yaml(text, f"{name}.yaml")
        description = data.get("description", "") if isinstance(data, dict) else ""
        yield name, str(description).strip()


def read_scenario_text(scenario: str | Path) -> tuple[str, str]:
    """(text, source label) of a built-in name or a file path."""
    as_path = Path(scenario)
    if isinstance(scenario, Path) or as_path.suffix in (".yaml", ".yml") or "/" in str(scenario):
        try:
            return as_path.read_text(encoding="utf-8"), str(as_path)
        except FileNotFoundError:
            raise ConfigError(f"scenario file {as_path} not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read scenario file {as_path}: {exc}") from None
    name = str(scenario)
    if name not in builtin_names():
        hint = difflib.get_close_matches(name, builtin_names(), n=1)
        tip = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(
            f"no built-in scenario {name!r}{tip}: 'bluelight sim list' shows them; a file path needs .yaml"
        )
    text = resources.files(BUILTIN_PACKAGE).joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    return text, f"{name}.yaml"


def load_scenario(
    scenario: str | Path,
    *,
    seed: int | None = None,
    devices: int | None = None,
    duration_s: float | None = None,
    speed: float | None = None,
    rate_hz: float | None = None,
    city: City | None = None,
) -> Scenario:
    """Load and validate a built-in scenario (by name) or a file (by path). The keyword
    arguments override the file (the command line's --seed, --devices, --duration, --speed,
    --rate)."""
    text, source = read_scenario_text(scenario)
    return parse_scenario(
        text, source, seed=seed, devices=devices, duration_s=duration_s, speed=speed, rate_hz=rate_hz, city=city
    )


def parse_scenario(
    text: str,
    source: str = "<scenario>",
    *,
    seed: int | None = None,
    devices: int | None = None,
    duration_s: float | None = None,
    speed: float | None = None,
    rate_hz: float | None = None,
    city: City | None = None,
) -> Scenario:
    """Validate scenario YAML `text`; `source` names it in errors."""
    data = _parse_yaml(text, source)
    top = _Fields(data, _At(source, 1, ""), "a scenario", TOP_KEYS)
    name = top.need("name", _ident)
    description = top.get("description", _one_line, "")
    file_seed = top.get("seed", _number(0, 2**63 - 1, integer=True), 1)
    file_duration = top.need("duration", _duration(positive=True))
    file_speed = top.get("speed", _number(0.01, 1000), 1.0)
    repeat = top.get("repeat", _flag, False)
    city = city or top.get("city", _city, None) or City.builtin()
    places = Places(city)
    if top.has("places"):
        places.named.update(top.get("places", lambda v, at: _places(v, at, places), {}))
    agent = top.get("agent", _agent, AgentDefaults())
    seed = file_seed if seed is None else seed
    duration = file_duration if duration_s is None else duration_s
    if duration <= 0:
        raise ConfigError(f"--duration must be > 0 seconds, got {duration:g}")

    groups = top.get("units", lambda v, at: _groups(v, at, "units", UNIT_TYPES), [])
    sensor_groups = top.get("sensors", lambda v, at: _groups(v, at, "sensors", SENSOR_TYPES), [])
    if not groups and not sensor_groups:
        raise top.at.fail("a scenario needs at least one device under 'units' or 'sensors'")
    counts: dict[int, int] = {}
    if devices is not None:
        if not 1 <= devices <= MAX_DEVICES:
            raise ConfigError(f"--devices must be 1-{MAX_DEVICES}, got {devices}")
        counts = _scale([*groups, *sensor_groups], devices, top.at)
    if rate_hz is not None:
        if not 0.001 <= rate_hz <= 100:
            raise ConfigError(f"--rate must be 0.001-100 messages a second, got {rate_hz:g}")
        agent = replace(agent, rate_hz=rate_hz)
    units = [u for g in groups for u in _expand_unit(g, counts.get(id(g)), places, seed, agent)]
    if rate_hz is not None:
        units = [replace(u, rate_hz=rate_hz) for u in units]
    sensors = [s for g in sensor_groups for s in _expand_sensor(g, counts.get(id(g)), places, seed, city)]
    total = len(units) + len(sensors)
    if total > MAX_DEVICES:
        raise top.at.fail(f"{total} devices is more than the simulator's limit of {MAX_DEVICES}")
    seen: dict[str, str] = {}
    specs: list[UnitSpec | SensorSpec] = [*units, *sensors]
    for spec in specs:
        if spec.id in seen:
            raise ScenarioError(source, spec.line, spec.group, f"device id {spec.id!r} is used twice "
                                f"(also by {seen[spec.id]})")
        seen[spec.id] = spec.group
    kinds = {u.id: u.type for u in units} | {s.id: s.type for s in sensors}
    incidents = top.get("incidents", lambda v, at: _incidents(v, at, places, kinds, file_duration), [])
    faults = top.get("faults", lambda v, at: _faults(v, at, kinds, file_duration), [])
    top.done(["places"])
    return Scenario(
        name=name,
        description=description,
        source=source,
        seed=seed,
        duration_s=duration,
        speed=file_speed if speed is None else speed,
        city=city,
        units=tuple(units),
        sensors=tuple(sensors),
        incidents=tuple(sorted(incidents, key=lambda e: (e.at_s, e.index))),
        faults=tuple(sorted(faults, key=lambda e: (e.at_s, e.index))),
        agent=agent,
        repeat=repeat,
    )


def _city(value: Any, at: _At) -> City:
    if value == "builtin":
        return City.builtin()
    path = Path(_text(value, at))
    if not path.is_absolute() and Path(at.source).is_file():
        path = Path(at.source).parent / path
    try:
        return City.from_geojson(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise at.fail(f"map file {path} not found (use 'builtin' or a GeoJSON file)") from None
    except (ValueError, CityError, OSError) as exc:
        raise at.fail(f"map file {path} is not a usable GeoJSON street map: {exc}") from None


def _places(value: Any, at: _At, places: Places) -> dict[str, LatLon]:
    if not isinstance(value, _Map):
        raise at.fail(f"must map names to places, got {_kind(value)}")
    out: dict[str, LatLon] = {}
    for key in value:
        out[key] = places.resolve(value[key], at.key(value, key))
        places.named[key] = out[key]
    return out


def _agent(value: Any, at: _At) -> AgentDefaults:
    f = _Fields(value, at, "agent")
    out = AgentDefaults(
        rate_hz=f.get("rate_hz", _number(0.001, 100), 1.0),
        connect_rate=f.get("connect_rate", _number(1, 10_000), 100.0),
        reconnect_max_s=f.get("reconnect_max", _duration(positive=True), 10.0),
        resend_after_s=f.get("resend_after", _duration(positive=True), 10.0),
    )
    f.done()
    return out


def _groups(value: Any, at: _At, section: str, types: tuple[str, ...]) -> list[_Group]:
    items = _list(value, at)
    out = []
    for i, item in enumerate(items):
        f = _Fields(item, at.item(items, i), f"each entry of {section}", _GROUP_KEYS[section])
        f.need("type", _choice(types))
        ident = f.need("id", _ident)
        count = f.get("count", _number(1, MAX_DEVICES, integer=True))
        at_list = None
        if count is not None and f.has("at") and isinstance(f.map["at"], _List) and section == "sensors":
            at_list = f.map["at"]
            if len(at_list) != count:
                raise f.where("at").fail(f"lists {len(at_list)} places for count {count}: give one per sensor")
        if count is not None:
            try:
                check_id(f"{ident}-{count:04d}")
            except InvalidId:
                raise f.where("id").fail("too long to number (ids are at most 64 characters)") from None
        out.append(_Group(f, i, section, ident, count, at_list))
    return out


def _expand_unit(
    g: _Group, count: int | None, places: Places, seed: int, agent: AgentDefaults
) -> list[UnitSpec]:
    f = g.fields
    kind = f.need("type", _choice(UNIT_TYPES))
    speed = f.get("speed_mps", _number(0, 70), DEFAULT_SPEED[kind])
    rate = f.get("rate_hz", _number(0.001, 100), agent.rate_hz)
    route = f.get("route", lambda v, at: _route(v, at, places))
    patrol = f.get("patrol_m", _number(100, 100_000), DEFAULT_PATROL_M[kind])
    if route is not None and f.has("patrol_m"):
        raise f.where("patrol_m").fail("give either 'route' or 'patrol_m', not both")
    start = f.get("start", places.resolve)
    shift_start, shift_end = f.get("shift", _shift, (0.0, None))
    capabilities = f.get("capabilities", _capabilities, ())
    ids = g.ids(count)
    supervisors = f.get("supervisors", _number(0, len(ids), integer=True), 0)
    f.done(["count"])
    label = f"units[{g.index}]"
    return [
        UnitSpec(
            id=ident, type=kind, speed_mps=speed, rate_hz=rate, route=route, patrol_m=patrol, start=start,
            shift_start_s=shift_start, shift_end_s=shift_end, seed=derive_seed(seed, "unit", ident),
            line=f.map.line, group=label, capabilities=capabilities, supervisor=i < supervisors,
        )
        for i, ident in enumerate(ids)
    ]


def _capabilities(value: Any, at: _At) -> tuple[str, ...]:
    items = _list(value, at)
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", item):
            raise at.item(items, i).fail(f"must be a capability name like 'armed' or 'first_aid', got {item!r}")
        out.append(item)
    return tuple(out)


def registry_data(scenario: Scenario) -> dict[str, Any]:
    """The gateway's unit registry for this scenario's devices (`registry_path`):
    officers and vehicles with their capabilities, sensors with their sites."""
    units = [
        {"id": u.id, "kind": u.type, "capabilities": list(u.capabilities), "supervisor": u.supervisor}
        for u in scenario.units if u.type in ("officer", "vehicle")
    ]
    sensors = [{"id": s.id, "kind": s.type, "lat": s.site[0], "lon": s.site[1]} for s in scenario.sensors]
    return {"units": units, "sensors": sensors}


def hotlist_data(scenario: Scenario, *, expires_ts: int) -> dict[str, Any]:
    """The gateway's ANPR hotlist (`hotlist_path`): the scenario's hotlisted vehicles."""
    plates = sorted({i.plate for i in scenario.incidents if i.type == "hotlist_vehicle" and i.plate})
    return {"hotlist": [{"plate": p, "reason": f"scenario {scenario.name}: vehicle of interest",
                         "expires_ts": expires_ts, "markers": ["stolen"]} for p in plates]}


def _expand_sensor(g: _Group, count: int | None, places: Places, seed: int, city: City) -> list[SensorSpec]:
    f = g.fields
    kind = f.need("type", _choice(SENSOR_TYPES))
    ids = g.ids(count)
    sites: list[LatLon]
    if g.at_list is not None:
        sites = [places.resolve(v, f.where("at").item(g.at_list, i)) for i, v in enumerate(g.at_list)]
        f.get("at", lambda v, at: v)
    elif f.has("at"):
        site = f.get("at", places.resolve)
        if len(ids) > 1:
            raise f.where("at").fail(f"one place for {len(ids)} sensors: give a list of {len(ids)} places")
        sites = [site]
    elif g.count is not None:
        nodes = list(city.nodes)
        sites = [random.Random(derive_seed(seed, "site", i)).choice(nodes) for i in ids]
    else:
        raise f.at.fail("missing required field 'at' (the sensor's place)")
    heading = f.get("heading", _number(0, 360), 0.0)
    clock_error = f.get("clock_error_ms", _number(0, 10_000), 1.0)
    range_m = f.get("range_m", _number(1, 20_000), 1500.0 if kind == "acoustic" else 30.0)
    misread = f.get("misread_rate", _number(0, 1), 0.02)
    if kind == "acoustic" and f.has("heading"):
        raise f.where("heading").fail("only ANPR cameras have a heading")
    if kind == "anpr" and f.has("clock_error_ms"):
        raise f.where("clock_error_ms").fail("only acoustic sensors have a clock error")
    f.done(["count"])
    label = f"sensors[{g.index}]"
    return [
        SensorSpec(
            id=ident, type=kind, site=site, heading=heading, clock_error_ms=clock_error, range_m=range_m,
            misread_rate=misread, seed=derive_seed(seed, "sensor", ident), line=f.map.line, group=label,
        )
        for ident, site in zip(ids, sites, strict=True)
    ]


def _route(value: Any, at: _At, places: Places) -> tuple[LatLon, ...]:
    items = _list(value, at, min_items=2)
    points = tuple(places.resolve(v, at.item(items, i)) for i, v in enumerate(items))
    if len(set(points)) < 2:
        raise at.fail("needs at least 2 different places")
    return points


def _shift(value: Any, at: _At) -> tuple[float, float | None]:
    f = _Fields(value, at, "shift")
    start = f.get("start", _duration(), 0.0)
    end = f.get("end", _duration(positive=True))
    f.done()
    if end is not None and end <= start:
        raise f.where("end").fail(f"ends ({end:g} s) before it starts ({start:g} s)")
    return start, end


def _unit_ref(kinds: Mapping[str, str], allowed: tuple[str, ...] | None = None) -> Callable[[Any, _At], str]:
    def convert(value: Any, at: _At) -> str:
        ident = _text(value, at)
        if ident not in kinds:
            hint = difflib.get_close_matches(ident, list(kinds), n=1)
            tip = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise at.fail(f"unknown unit {ident!r}{tip}")
        if allowed is not None and kinds[ident] not in allowed:
            raise at.fail(f"{ident!r} is a {kinds[ident]}; this needs a {' or '.join(allowed)}")
        return ident

    return convert


def _at_time(limit: float) -> Callable[[Any, _At], float]:
    def convert(value: Any, at: _At) -> float:
        t: float = _duration()(value, at)
        if t > limit:
            raise at.fail(f"{t:g} s is after the end of the scenario ({limit:g} s)")
        return t

    return convert


_INCIDENT_UNIT: dict[str, tuple[str, ...]] = {
    "panic": ("officer",),
    "man_down": ("officer",),
    "holster": ("officer",),
    "bodycam": ("officer",),
    "crash": ("vehicle",),
}


def _incidents(
    value: Any, at: _At, places: Places, kinds: Mapping[str, str], duration: float
) -> list[Incident]:
    items = _list(value, at)
    out = []
    for i, item in enumerate(items):
        f = _Fields(item, at.item(items, i), "each incident", INCIDENT_KEYS)
        kind = f.need("type", _choice(INCIDENT_TYPES))
        when = f.need("at", _at_time(duration))
        incident = Incident(at_s=when, type=kind, line=f.map.line, index=i)
        if kind in _INCIDENT_UNIT:
            incident = replace(incident, unit=f.need("unit", _unit_ref(kinds, _INCIDENT_UNIT[kind])))
        if kind == "gunshot":
            incident = replace(incident, place=f.need("place", places.resolve))
            if "acoustic" not in kinds.values():
                raise f.at.fail("a gunshot needs acoustic sensors to hear it: add some under 'sensors'")
        if kind == "hotlist_vehicle":
            incident = replace(
                incident,
                plate=f.need("plate", _plate),
                route=f.need("route", lambda v, a: _route(v, a, places)),
                speed_mps=f.get("speed_mps", _number(1, 70), 12.0),
            )
            if "anpr" not in kinds.values():
                raise f.at.fail("a hotlisted vehicle needs ANPR cameras to see it: add some under 'sensors'")
        if kind == "crash":
            incident = replace(incident, decel_g=f.get("decel_g", _number(1, 100), 8.0))
        if kind == "bodycam":
            incident = replace(incident, on=f.get("on", _flag, True))
        f.done()
        out.append(incident)
    return out


_PLATE = re.compile(r"[A-Z0-9 ]{2,10}")


def _plate(value: Any, at: _At) -> str:
    text = _text(value, at).upper()
    if not _PLATE.fullmatch(text):
        raise at.fail(f"a plate is 2-10 letters, digits and spaces, got {value!r}")
    return text


#: Fault type -> the unit types it applies to (None: any device; absent: no unit).
_FAULT_UNITS: dict[str, tuple[str, ...] | None] = {
    "link_flap": None, "link_outage": None, "clock_skew": None,
    "gps_jump": ("officer", "vehicle", "tracker"), "gps_loss": ("officer", "vehicle", "tracker"),
    "sensor_dropout": None, "revoked": None, "forged": None, "replay": None, "malformed": None,
}
#: Faults that make a device untrustworthy for good: at most one of them per device.
_IDENTITY_FAULTS = ("revoked", "forged")


def _faults(value: Any, at: _At, kinds: Mapping[str, str], duration: float) -> list[Fault]:
    items = _list(value, at)
    out = []
    identity: dict[str, str] = {}
    for i, item in enumerate(items):
        f = _Fields(item, at.item(items, i), "each fault", FAULT_KEYS)
        kind = f.need("type", _choice(FAULT_TYPES))
        when = f.need("at", _at_time(duration))
        fault = Fault(at_s=when, type=kind, line=f.map.line, index=i)
        if kind in _FAULT_UNITS:
            fault = replace(fault, units=_fault_units(f, kinds, _FAULT_UNITS[kind], many=kind.startswith("link_")))
        if kind in ("link_outage", "broker_outage", "gps_loss", "sensor_dropout"):
            fault = replace(fault, for_s=f.need("for", _duration(positive=True)))
        if kind == "link_flap":
            fault = replace(
                fault,
                down_s=f.get("down", _duration(positive=True), 5.0),
                up_s=f.get("up", _duration(positive=True), 10.0),
                cycles=f.get("cycles", _number(1, 10_000, integer=True), 3),
            )
        if kind == "clock_skew":
            offset = f.need("offset", _duration(signed=True))
            if offset == 0:
                raise f.where("offset").fail("a clock skew of zero is no fault")
            fault = replace(fault, offset_ms=round(offset * 1000))
        if kind == "gps_jump":
            fault = replace(
                fault,
                offset_m=f.get("offset_m", _number(1, 100_000), 300.0),
                for_s=f.get("for", _duration(positive=True), 30.0),
            )
        if kind == "sensor_dropout":
            fault = replace(fault, sensor=f.get("sensor", _choice(_SENSOR_NAMES)))
        if kind == "revoked":
            fault = replace(fault, reconnect_after_s=f.get("reconnect_after", _duration(), 5.0))
        if kind in ("replay", "malformed"):
            fault = replace(fault, count=f.get("count", _number(1, 1000, integer=True), 5))
        if kind in _IDENTITY_FAULTS:
            unit = fault.unit
            if unit in identity:
                raise f.where("unit").fail(f"{unit!r} is already {identity[unit]}: one identity fault per device")
            identity[unit] = f"{kind} (faults[{i}])"
        f.done()
        out.append(fault)
    return out


#: Sensor models a dropout can name (default: every model of the device).
_SENSOR_NAMES = ("gnss", "imu", "body", "vehicle", "acoustic", "anpr")


def _fault_units(
    f: _Fields, kinds: Mapping[str, str], allowed: tuple[str, ...] | None, *, many: bool
) -> tuple[str, ...]:
    ref = _unit_ref(kinds, allowed)
    if many and f.has("units"):
        if f.has("unit"):
            raise f.where("units").fail("give 'unit' or 'units', not both")
        items = _list(f.map["units"], f.where("units"), min_items=1)
        f.get("units", lambda v, at: v)
        return tuple(ref(v, f.where("units").item(items, i)) for i, v in enumerate(items))
    return (f.need("unit", ref),)


__all__ = [
    "FAULT_TYPES", "INCIDENT_TYPES", "SENSOR_TYPES", "UNIT_TYPES", "AgentDefaults", "Event", "Fault", "Incident",
    "Places", "Scenario", "ScenarioError", "SensorSpec", "UnitSpec", "builtin_names", "builtin_scenarios",
    "derive_seed", "load_scenario", "parse_duration", "parse_scenario", "read_scenario_text",
]
