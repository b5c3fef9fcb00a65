"""The next-best-action policy: the default loads and says what the design asks for;
every mistake is refused with the file, line, rule and field; the JSON Schema agrees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from gateway.core.policy import PolicyError, Rule, default_policy, load_policy, parse_policy

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = (ROOT / "gateway" / "policy" / "default.yaml").read_text(encoding="utf-8")

MINIMAL = """\
version: 1
incidents:
  gunshot:
    action: "attend {where}"
    count: {count}
"""


def test_default_policy_loads_and_covers_the_design() -> None:
    p = default_policy()
    assert {"panic", "man_down", "gunshot", "anpr_hit", "crash", "coverage_gap", "geofence_breach",
            "operator"} <= set(p.rules)
    panic = p.rules["panic"]
    assert (panic.count, panic.supervisor, panic.exclude_subject) == (2, True, True)
    gunshot = p.rules["gunshot"]
    assert gunshot.capabilities == {"armed"}
    assert gunshot.kind == "vehicle"
    assert gunshot.approach is not None
    assert "{approach_from}" in gunshot.approach
    assert p.rules["anpr_hit"].target == "predicted"
    assert p.rules["crash"].any_capabilities == {"first_aid", "traffic"}
    assert p.rule_for("tamper") is p.rules["operator"]  # the fallback
    assert p.speeds["officer"].street_mps < 2.5 < p.speeds["vehicle"].street_mps


def test_load_policy_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "force.yaml"
    path.write_text(MINIMAL.replace("{count}", "3"))
    assert load_policy(path).rules["gunshot"].count == 3
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml")


def test_the_error_names_file_line_rule_and_field() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(MINIMAL.replace("{count}", "two"), "policy.yaml")
    assert str(info.value) == "policy.yaml:5: incident 'gunshot': 'count' must be an integer >= 1, got 'two'"
    assert (info.value.rule, info.value.field, info.value.line) == ("gunshot", "count", 5)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("count: 2", "count: 0"), "incident 'panic': 'count' must be an integer >= 1, got 0"),
        (("count: 2", "count: true"), "'count' must be an integer >= 1, got True"),
        (("timeout_s: 30\n    max_escalations: 3", "timeout_s: -1\n    max_escalations: 3"),
         "incident 'gunshot': 'timeout_s' must be a number of seconds in [1, 3600], got -1"),
        (("kind: vehicle", "kind: horse"), "incident 'gunshot': 'kind' must be one of any, officer, vehicle"),
        (("capabilities: [armed]", "capabilities: [Armed!]"), "'capabilities' must be a list of names"),
        (("supervisor: true", "supervisor: yes"), "incident 'panic': 'supervisor' must be true or false, got 'yes'"),
        (("count: 2\n    supervisor", "cuont: 2\n    supervisor"),
         "'cuont' is not a known field (did you mean 'count'?)"),
        (("target: predicted", "target: somewhere"), "'target' must be one of incident, predicted"),
        (("max_escalations: 3", "max_escalations: 99"), "'max_escalations' must be an integer in [0, 20]"),
        (("{approach_from}", "{aproach_from}"), "'approach' uses unknown placeholder {aproach_from}"),
        (("Attend {where} now", "Attend {where now"), "'action' is not a valid template"),
        (("fallback: operator", "fallback: nothing"), "'fallback' must be one of"),
        (("version: 1", "version: 2"), "'version' must be 1, got 2"),
        (("street_mps: 1.8", "street_mps: 0"), "'speeds.officer.street_mps' must be a speed in m/s"),
        (("states", "states"), None),
        (("prefer_bonus_s: 30", "prefer_bonus_s: 30\n    rank: distance"), "'prefer_bonus_s' is seconds of ETA"),
        (("    count: 1\n    kind: vehicle\n    any", "    count: 1\n    count: 2\n    kind: vehicle\n    any"),
         "duplicate key 'count'"),
    ],
)
def test_mistakes_are_specific(edit: tuple[str, str], message: str | None) -> None:
    old, new = edit
    assert old in DEFAULT or message is None
    text = DEFAULT.replace(old, new, 1)
    if message is None:
        parse_policy(text, "policy.yaml")
        return
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "policy.yaml")
    assert message in str(info.value)
    assert str(info.value).startswith("policy.yaml:")


def test_states_must_be_known() -> None:
    text = MINIMAL.replace("{count}", "1\n    states: [available, asleep]")
    with pytest.raises(PolicyError, match="'states' has unknown value 'asleep'"):
        parse_policy(text, "p.yaml")


def test_not_yaml_or_not_a_mapping() -> None:
    with pytest.raises(PolicyError, match=r"p.yaml:\d+: not valid YAML"):
        parse_policy("version: 1\nincidents: [\n", "p.yaml")
    with pytest.raises(PolicyError, match="a policy is a mapping"):
        parse_policy("- 1\n", "p.yaml")
    with pytest.raises(PolicyError, match="'incidents' must map at least one"):
        parse_policy("version: 1\nincidents: {}\n", "p.yaml")


def test_rules_made_in_code_are_checked_too() -> None:
    with pytest.raises(ValueError, match="'count' must be an integer >= 1"):
        Rule("x", "attend", count=0)


def test_json_schema_accepts_the_default_and_is_valid() -> None:
    schema = json.loads((ROOT / "docs" / "schemas" / "policy.json").read_text())
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema)
    assert not list(validator.iter_errors(yaml.safe_load(DEFAULT)))
    bad = yaml.safe_load(DEFAULT)
    bad["incidents"]["gunshot"]["count"] = "two"
    assert list(validator.iter_errors(bad))
