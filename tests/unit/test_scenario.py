"""Scenario files: every built-in validates; every kind of mistake is reported with the
file, the line and the field."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from edge_agent.errors import ConfigError
from firmware_sim.scenario import (
    FAULT_TYPES,
    INCIDENT_TYPES,
    ScenarioError,
    _Loader,
    builtin_names,
    builtin_scenarios,
    derive_seed,
    load_scenario,
    parse_duration,
    parse_scenario,
    read_scenario_text,
)

SCHEMA = json.loads((Path(__file__).parents[2] / "docs/schemas/scenario.json").read_text())

BASE = """\
name: test
description: A small test city.
duration: 10m
places:
  depot: Canal Road & North Avenue
units:
  - type: officer
    id: officer
    count: 3
  - type: vehicle
    id: car-01
    route: [depot, Dock Street & Harbour Lane]
sensors:
  - type: acoustic
    id: mic
    at: Elm Street & Inkerman Lane
  - type: anpr
    id: cam
    at: depot
    heading: 90
incidents:
  - {at: 1m, type: panic, unit: officer-001}
  - {at: 2m, type: gunshot, place: [51.5, -0.12]}
faults:
  - {at: 2m, type: link_outage, unit: car-01, for: 30s}
"""


def mutate(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, 1)


def line_of(text: str, needle: str) -> int:
    for n, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return n
    raise AssertionError(needle)


def test_the_base_scenario_is_valid() -> None:
    s = parse_scenario(BASE, "base.yaml")
    assert [u.id for u in s.units] == ["officer-001", "officer-002", "officer-003", "car-01"]
    assert [x.id for x in s.sensors] == ["mic", "cam"]
    assert s.incidents[0].unit == "officer-001"
    assert s.incidents[0].at_s == 60
    assert s.faults[0].for_s == 30
    assert s.faults[0].units == ("car-01",)
    route = s.units[3].route
    assert route is not None
    assert s.sensors[1].site == route[0]  # the named place resolves
    assert s.speed == 1.0
    assert s.seed == 1


@pytest.mark.parametrize("name", builtin_names())
def test_every_builtin_validates_against_the_loader_and_the_json_schema(name: str) -> None:
    scenario = load_scenario(name)
    assert scenario.name == name
    assert scenario.devices > 0
    text, _ = read_scenario_text(name)
    jsonschema.validate(yaml.load(text, Loader=_Loader), SCHEMA)


def test_the_builtins_are_the_promised_ones() -> None:
    listed = dict(builtin_scenarios())
    assert {"quiet-patrol", "city-shift", "adversarial", "fleet-scale", "demo"} <= set(listed)
    assert all(desc and "\n" not in desc for desc in listed.values())
    assert load_scenario("fleet-scale").devices == 2000
    assert 40 <= load_scenario("demo").devices <= 60
    city = load_scenario("city-shift")
    assert {"panic", "man_down", "gunshot", "hotlist_vehicle", "crash"} <= {i.type for i in city.incidents}
    adversarial = load_scenario("adversarial")
    assert {f.type for f in adversarial.faults} == set(FAULT_TYPES)


def test_the_schema_knows_every_incident_and_fault() -> None:
    text = json.dumps(SCHEMA)
    for kind in (*INCIDENT_TYPES, *FAULT_TYPES):
        assert f'"{kind}"' in text, kind


# Each case: (mutated text, the line's marker (a substring of the line the error is on),
# the field path and a fragment of the message).
CASES = [
    ("missing name", BASE.replace("name: test\n", ""), "description:", "", "missing required field 'name'"),
    ("typo", mutate("units:", "unts:"), "unts:", "unts", "unknown field (did you mean 'units'?)"),
    ("unit type", mutate("type: officer", "type: oficer"), "type: oficer", "units[0].type",
     "must be one of officer, vehicle, tracker, got 'oficer'; did you mean 'officer'?"),
    ("route place", mutate("route: [depot, Dock Street & Harbour Lane]", "route:\n      - depot\n      - Nowhere St"),
     "Nowhere St", "units[1].route[1]", "unknown place 'Nowhere St'"),
    ("junction", mutate("Dock Street & Harbour Lane", "Dock Street & Abbey Street"), "Dock Street & Abbey",
     "units[1].route[1]", "'Dock Street' and 'Abbey Street' do not meet"),
    ("street hint", mutate("Elm Street & Inkerman Lane", "Elm Stret"), "Elm Stret", "sensors[0].at",
     "unknown place 'Elm Stret' (did you mean 'Elm Street'?)"),
    ("point outside", mutate("place: [51.5, -0.12]", "place: [-0.12, 51.5]"), "gunshot", "incidents[1].place",
     "outside the map"),
    ("duration", mutate("duration: 10m", "duration: ten minutes"), "duration:", "duration",
     "must be a duration"),
    ("count", mutate("count: 3", "count: 2.5"), "count: 2.5", "units[0].count", "must be an integer"),
    ("unknown unit", mutate("unit: officer-001}", "unit: officer-009}"), "officer-009", "incidents[0].unit",
     "unknown unit 'officer-009'"),
    ("wrong unit type", mutate("type: panic, unit: officer-001", "type: crash, unit: officer-001"), "crash",
     "incidents[0].unit", "'officer-001' is a officer; this needs a vehicle"),
    ("after the end", mutate("{at: 1m, type: panic", "{at: 11m, type: panic"), "11m", "incidents[0].at",
     "is after the end of the scenario (600 s)"),
    ("fault field", mutate(", for: 30s}", "}"), "link_outage", "faults[0]", "missing required field 'for'"),
    ("fault type", mutate("type: link_outage", "type: link_outgae"), "link_outgae", "faults[0].type",
     "did you mean 'link_outage'?"),
    ("unknown field", mutate("    heading: 90\n", "    heading: 90\n    colour: red\n"), "colour", "sensors[1].colour",
     "unknown field"),
    ("heading on acoustic", mutate("    at: Elm Street & Inkerman Lane\n",
                                   "    at: Elm Street & Inkerman Lane\n    heading: 10\n"),
     "heading: 10", "sensors[0].heading", "only ANPR cameras have a heading"),
    ("duplicate id", mutate("id: mic", "id: car-01"), "type: acoustic", "sensors[0]",
     "device id 'car-01' is used twice"),
    ("bad id", mutate("id: mic", "id: mic/1"), "mic/1", "sensors[0].id", "invalid id"),
    ("shift", mutate("    count: 3\n", "    count: 3\n    shift: {start: 5m, end: 2m}\n"), "shift:",
     "units[0].shift.end", "ends (120 s) before it starts (300 s)"),
    ("route and patrol", mutate("    route: [depot", "    patrol_m: 900\n    route: [depot"), "patrol_m: 900",
     "units[1].patrol_m", "give either 'route' or 'patrol_m', not both"),
    ("identity faults", mutate("  - {at: 2m, type: link_outage", "  - {at: 1m, type: forged, unit: car-01}\n"
                                                                 "  - {at: 2m, type: revoked, unit: car-01}\n"
                                                                 "  - {at: 2m, type: link_outage"),
     "type: revoked", "faults[1].unit", "'car-01' is already forged"),
    ("skew of zero", mutate("type: link_outage, unit: car-01, for: 30s", "type: clock_skew, unit: car-01, offset: 0"),
     "clock_skew", "faults[0].offset", "a clock skew of zero is no fault"),
    ("sensor at list", mutate("    id: mic\n    at: Elm Street & Inkerman Lane\n",
                              "    id: mic\n    count: 3\n    at: [depot, Elm Street]\n"),
     "at: [depot, Elm Street]", "sensors[0].at", "lists 2 places for count 3"),
    ("text wanted", mutate("description: A small test city.", "description: [a, b]"), "description:",
     "description", "must be text, got a list"),
    ("plate", mutate("  - {at: 2m, type: gunshot, place: [51.5, -0.12]}",
                     "  - {at: 2m, type: hotlist_vehicle, plate: 'AB-12', route: [depot, Elm Street]}"),
     "hotlist_vehicle", "incidents[1].plate", "a plate is 2-10 letters"),
]


@pytest.mark.parametrize(("text", "marker", "field", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_mistakes_name_the_file_line_and_field(text: str, marker: str, field: str, message: str) -> None:
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(text, "my.yaml")
    err = caught.value
    line = line_of(text, marker)
    prefix = f"my.yaml:{line}: {field}: " if field else f"my.yaml:{line}: "
    assert str(err).startswith(prefix), str(err)
    assert message in str(err), str(err)
    assert (err.line, err.path) == (line, field)
    assert isinstance(err, ConfigError)  # the CLI prints it as one line


def test_yaml_syntax_errors_name_the_line() -> None:
    text = mutate("units:\n", "units:\n  - [unclosed\n")
    with pytest.raises(ScenarioError, match=r"^my\.yaml:\d+: not valid YAML"):
        parse_scenario(text, "my.yaml")


def test_duplicate_keys_are_errors() -> None:
    text = mutate("duration: 10m\n", "duration: 10m\nduration: 5m\n")
    with pytest.raises(ScenarioError, match=r"^my\.yaml:4: duplicate key 'duration'"):
        parse_scenario(text, "my.yaml")


def test_a_scenario_needs_devices_and_a_mapping() -> None:
    with pytest.raises(ScenarioError, match=r"my\.yaml:1: a scenario must be a mapping of fields"):
        parse_scenario("- 1\n- 2\n", "my.yaml")
    with pytest.raises(ScenarioError, match="needs at least one device"):
        parse_scenario("name: empty\nduration: 1m\n", "my.yaml")


def test_gunshots_need_microphones_and_hotlists_need_cameras() -> None:
    no_mics = BASE.replace("  - type: acoustic\n    id: mic\n    at: Elm Street & Inkerman Lane\n", "")
    with pytest.raises(ScenarioError, match=r"incidents\[1\]: a gunshot needs acoustic sensors"):
        parse_scenario(no_mics, "my.yaml")


def test_yes_no_and_on_stay_text() -> None:
    text = mutate("  - {at: 1m, type: panic, unit: officer-001}",
                  "  - {at: 1m, type: bodycam, unit: officer-001, on: false}\n"
                  "  - {at: 1m, type: hotlist_vehicle, plate: NO, route: [depot, Elm Street]}")
    s = parse_scenario(text, "my.yaml")
    assert s.incidents[0].on is False
    assert next(i for i in s.incidents if i.type == "hotlist_vehicle").plate == "NO"


def test_files_are_read_and_named_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(mutate("count: 3", "count: -1"))
    with pytest.raises(ScenarioError, match=rf"^{path}:9: units\[0\]\.count: must be between 1 and"):
        load_scenario(path)
    with pytest.raises(ConfigError, match="not found"):
        load_scenario(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"no built-in scenario 'city-shfit' \(did you mean 'city-shift'\?\)"):
        load_scenario("city-shfit")


def test_overrides_and_scaling() -> None:
    s = load_scenario("fleet-scale", devices=300, seed=5, duration_s=30, speed=4)
    assert s.devices == 300
    assert s.seed == 5
    assert s.duration_s == 30
    assert s.speed == 4
    assert s.units[0].id == "tracker-001"
    assert s.units[-1].id == "tracker-300"
    city = load_scenario("city-shift", devices=100)
    assert city.devices == 100
    assert {"officer-003", "van-01", "anpr-canal"} <= set(city.device_ids)
    with pytest.raises(ConfigError, match="--devices 3 is too few"):
        load_scenario("city-shift", devices=3)


def test_seeds_are_stable_and_distinct() -> None:
    assert derive_seed(1, "unit", "a") == derive_seed(1, "unit", "a")
    assert len({derive_seed(1, "unit", x) for x in "abcdef"} | {derive_seed(2, "unit", "a")}) == 7
    assert derive_seed(7, "unit", "officer-001") == 3_944_062_748_543_047_450
    first = parse_scenario(BASE, "a.yaml", seed=9)
    again = parse_scenario(BASE, "a.yaml", seed=9)
    assert [u.seed for u in first.units] == [u.seed for u in again.units]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(90, 90.0), (1.5, 1.5), ("90s", 90.0), ("2m30s", 150.0), ("1h", 3600.0), ("500ms", 0.5), ("1h 2m 3s", 3723.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_signed_durations() -> None:
    assert parse_duration("-90s", signed=True) == -90.0
    with pytest.raises(ValueError, match="must not be negative"):
        parse_duration("-90s")
    with pytest.raises(ValueError, match="must be a duration"):
        parse_duration("soon")


def test_patrol_routes_are_reproducible_from_the_seed() -> None:
    from firmware_sim.fleet import unit_routes  # noqa: PLC0415 - the fleet's route planning

    first = unit_routes(load_scenario("city-shift"))
    again = unit_routes(load_scenario("city-shift"))
    other = unit_routes(load_scenario("city-shift", seed=8))
    assert first == again
    assert first != other
    assert len(set(first.values())) > 10  # units do not all walk the same loop from the same point


def test_a_fleet_splits_into_shards_that_cover_it_once() -> None:
    from firmware_sim.scenario import load_scenario  # noqa: PLC0415

    fleet = load_scenario("fleet-scale", devices=10)
    shards = [fleet.shard(i, 3) for i in range(3)]
    ids = [d for s in shards for d in s.device_ids]
    assert sorted(ids) == sorted(fleet.device_ids)
    assert shards[0].agent.connect_rate == fleet.agent.connect_rate / 3
    with pytest.raises(ConfigError):
        fleet.shard(3, 3)
    with pytest.raises(ConfigError):
        load_scenario("city-shift").shard(0, 2)
