"""The next-best-action policy as data: who to ask for each incident type, how to rank
them, how long to wait for an answer and what to say. A force reads and changes it as
YAML (`gateway/policy/default.yaml`; every field in docs/next-best-action.md); this
module parses it into frozen rules and rejects mistakes at load, naming the file, line,
rule and field:

    policy.yaml:31: incident 'gunshot': 'count' must be an integer >= 1, got 'two'

`parse_policy(text, source)` and `policy_from_mapping(data, source)` are pure;
`load_policy(path)` and `default_policy()` are the thin file-reading shell.
"""

from __future__ import annotations

import difflib
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from edge_agent.config import line_numbered_map, yaml_12_booleans
from gateway.core.streets import DEFAULT_DETOUR, DEFAULT_SPEEDS, UNIT_KINDS, KindSpeed

#: Unit states a rule may ask for (`unknown`: no status heard yet).
UNIT_STATES = frozenset({"available", "committed", "at_scene", "off_duty", "unknown"})
RANKS = frozenset({"eta", "distance"})
TARGETS = frozenset({"incident", "predicted"})
#: Placeholders an `action` or `approach` template may use (see docs/next-best-action.md).
PLACEHOLDERS = frozenset({
    "incident_id", "type", "subject", "where", "unit", "eta_s", "eta_min", "distance_m",
    "approach", "approach_from", "uncertainty_m", "detail",
})
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_TOP_FIELDS = ("version", "speeds", "straight_line_detour", "max_position_age_s", "alternatives_shown",
               "fallback", "incidents")
_SPEED_FIELDS = ("street_mps", "off_street_mps", "by_street_kind")


class PolicyError(ValueError):
    """A policy that cannot be used: says where (file:line), which rule and field, and what
    is wrong."""

    def __init__(self, source: str, message: str, *, rule: str | None = None, field: str | None = None,
                 line: int | None = None) -> None:
        where = f"{source}:{line}" if line else source
        parts = [where]
        if rule is not None:
            parts.append(f"incident {rule!r}")
        if field is not None:
            message = f"{field!r} {message}"
        super().__init__(": ".join([*parts, message]))
        self.source, self.rule, self.field, self.line, self.message = source, rule, field, line, message


@dataclass(frozen=True)
class Rule:
    """What to do for one incident type. See docs/next-best-action.md for each field."""

    name: str
    action: str
    count: int = 1
    states: frozenset[str] = frozenset({"available"})
    kind: str = "any"
    capabilities: frozenset[str] = frozenset()
    any_capabilities: frozenset[str] = frozenset()
    prefer_kind: str | None = None
    prefer_bonus_s: float = 0.0
    supervisor: bool = False
    exclude_subject: bool = True
    rank: str = "eta"
    target: str = "incident"
    ahead_only: bool = False
    timeout_s: float = 60.0
    max_escalations: int = 2
    approach: str | None = None

    def __post_init__(self) -> None:
        problems = _rule_problems(self)
        if problems:
            name, message = problems[0]
            raise ValueError(f"incident {self.name!r}: {name!r} {message}")


@dataclass(frozen=True)
class Policy:
    """A whole policy: speeds for arrival times, global limits and one rule per type."""

    rules: Mapping[str, Rule]
    speeds: Mapping[str, KindSpeed] = field(default_factory=lambda: dict(DEFAULT_SPEEDS))
    straight_line_detour: float = DEFAULT_DETOUR
    max_position_age_s: float = 120.0
    alternatives_shown: int = 3
    fallback: str | None = None
    source: str = "<policy>"

    def __post_init__(self) -> None:
        if self.fallback is not None and self.fallback not in self.rules:
            raise ValueError(f"fallback {self.fallback!r} is not one of the incident rules")

    def rule_for(self, incident_type: str) -> Rule | None:
        """The rule for `incident_type`, else the fallback rule, else None."""
        rule = self.rules.get(incident_type)
        if rule is None and self.fallback is not None:
            return self.rules[self.fallback]
        return rule


# -- validation ---------------------------------------------------------------------------------


def template_fields(template: str) -> set[str]:
    """The placeholder names a template uses (`{detail[plate]}` -> `detail`)."""
    names: set[str] = set()
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None:
            names.add(re.split(r"[.\[]", name, maxsplit=1)[0])
    return names


def _template_problem(template: str) -> str | None:
    try:
        names = template_fields(template)
    except ValueError as exc:
        return f"is not a valid template ({exc})"
    unknown = sorted(n for n in names if n not in PLACEHOLDERS)
    if "" in names:
        return "uses an empty placeholder {}; name it, e.g. {where}"
    if unknown:
        return f"uses unknown placeholder {{{unknown[0]}}}; known: {', '.join(sorted(PLACEHOLDERS))}"
    return None


def _rule_problems(rule: Rule) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if not rule.action.strip():
        out.append(("action", "must be a non-empty text"))
    elif (problem := _template_problem(rule.action)) is not None:
        out.append(("action", problem))
    if rule.approach is not None and (problem := _template_problem(rule.approach)) is not None:
        out.append(("approach", problem))
    if rule.count < 1:
        out.append(("count", f"must be an integer >= 1, got {rule.count!r}"))
    if not rule.states or not rule.states <= UNIT_STATES:
        out.append(("states", f"must be a non-empty list of {', '.join(sorted(UNIT_STATES))}"))
    if rule.kind not in {*UNIT_KINDS, "any"}:
        out.append(("kind", f"must be one of any, officer, vehicle, got {rule.kind!r}"))
    if rule.prefer_kind is not None and rule.prefer_kind not in UNIT_KINDS:
        out.append(("prefer_kind", f"must be officer or vehicle, got {rule.prefer_kind!r}"))
    if not 0 <= rule.prefer_bonus_s <= 3600:
        out.append(("prefer_bonus_s", f"must be a number of seconds in [0, 3600], got {rule.prefer_bonus_s!r}"))
    if rule.rank not in RANKS:
        out.append(("rank", f"must be one of {', '.join(sorted(RANKS))}, got {rule.rank!r}"))
    if rule.target not in TARGETS:
        out.append(("target", f"must be one of {', '.join(sorted(TARGETS))}, got {rule.target!r}"))
    if not 1 <= rule.timeout_s <= 3600:
        out.append(("timeout_s", f"must be a number of seconds in [1, 3600], got {rule.timeout_s!r}"))
    if not 0 <= rule.max_escalations <= 20:
        out.append(("max_escalations", f"must be an integer in [0, 20], got {rule.max_escalations!r}"))
    return out


class _Map(dict[Any, Any]):
    """A YAML mapping that remembers the line of each key."""

    lines: dict[Any, int]
    line: int = 0


class _Loader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML ships no type hints
    """Safe YAML with line numbers; duplicate keys are errors; only true/false are
    booleans (YAML 1.2), so `no` and `on` stay text."""

    source = "<policy>"


yaml_12_booleans(_Loader)


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> _Map:
    def fail(line: int, message: str) -> PolicyError:
        return PolicyError(loader.source, message, line=line)

    result: _Map = line_numbered_map(loader, node, _Map(), fail)
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)


class _Reader:
    """Reads typed fields out of one mapping, raising `PolicyError` with rule, field, line."""

    def __init__(self, data: Mapping[str, Any], source: str, rule: str | None, allowed: tuple[str, ...],
                 prefix: str = "") -> None:
        self.data, self.source, self.rule, self.prefix = data, source, rule, prefix
        for key in data:
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                known = f"did you mean {hint[0]!r}?" if hint else f"known: {', '.join(allowed)}"
                raise self.error(str(key), f"is not a known field ({known})")

    def line(self, key: str) -> int | None:
        lines = getattr(self.data, "lines", None)
        if isinstance(lines, dict) and key in lines:
            return int(lines[key])
        line = getattr(self.data, "line", None)
        return int(line) if isinstance(line, int) and line else None

    def error(self, key: str, message: str) -> PolicyError:
        return PolicyError(self.source, message, rule=self.rule, field=self.prefix + key, line=self.line(key))

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        if not self.has(key):
            return default
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            bound = f">= {lo}" if hi >= 10**6 else f"in [{lo}, {hi}]"
            raise self.error(key, f"must be an integer {bound}, got {value!r}")
        return value

    def number(self, key: str, default: float, lo: float, hi: float, what: str = "a number") -> float:
        if not self.has(key):
            return default
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            raise self.error(key, f"must be {what} in [{lo:g}, {hi:g}], got {value!r}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        if not self.has(key):
            return default
        value = self.data[key]
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value

    def choice(self, key: str, default: str | None, allowed: frozenset[str]) -> str | None:
        if not self.has(key):
            return default
        value = self.data[key]
        if not isinstance(value, str) or value not in allowed:
            raise self.error(key, f"must be one of {', '.join(sorted(allowed))}, got {value!r}")
        return value

    def text(self, key: str, *, required: bool = False) -> str | None:
        if not self.has(key):
            if required:
                raise self.error(key, "is required")
            return None
        value = self.data[key]
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"must be a non-empty text, got {value!r}")
        problem = _template_problem(value)
        if problem is not None:
            raise self.error(key, problem)
        return value

    def names(self, key: str, default: frozenset[str], allowed: frozenset[str] | None = None) -> frozenset[str]:
        if not self.has(key):
            return default
        value = self.data[key]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and _NAME.fullmatch(v) for v in value):
            raise self.error(key, f"must be a list of names (lower case, digits, '_'), got {value!r}")
        if allowed is not None:
            bad = sorted(set(value) - allowed)
            if bad:
                raise self.error(key, f"has unknown value {bad[0]!r}; known: {', '.join(sorted(allowed))}")
            if not value:
                raise self.error(key, "must not be empty")
        return frozenset(value)

    def mapping(self, key: str) -> Mapping[str, Any] | None:
        if not self.has(key):
            return None
        value = self.data[key]
        if not isinstance(value, Mapping):
            raise self.error(key, f"must be a mapping, got {value!r}")
        return value


_RULE_FIELDS = tuple(f for f in Rule.__dataclass_fields__ if f != "name")


def _rule(name: str, data: Any, source: str, line: int | None) -> Rule:
    if not isinstance(data, Mapping):
        raise PolicyError(source, f"must be a mapping of fields, got {data!r}", rule=name, line=line)
    r = _Reader(data, source, name, _RULE_FIELDS)
    rule = Rule(
        name=name,
        action=r.text("action", required=True) or "",
        count=r.integer("count", 1, 1, 10**9),
        states=r.names("states", frozenset({"available"}), UNIT_STATES),
        kind=r.choice("kind", "any", frozenset({*UNIT_KINDS, "any"})) or "any",
        capabilities=r.names("capabilities", frozenset()),
        any_capabilities=r.names("any_capabilities", frozenset()),
        prefer_kind=r.choice("prefer_kind", None, UNIT_KINDS),
        prefer_bonus_s=r.number("prefer_bonus_s", 0.0, 0, 3600, "a number of seconds"),
        supervisor=r.boolean("supervisor", False),
        exclude_subject=r.boolean("exclude_subject", True),
        rank=r.choice("rank", "eta", RANKS) or "eta",
        target=r.choice("target", "incident", TARGETS) or "incident",
        ahead_only=r.boolean("ahead_only", False),
        timeout_s=r.number("timeout_s", 60.0, 1, 3600, "a number of seconds"),
        max_escalations=r.integer("max_escalations", 2, 0, 20),
        approach=r.text("approach"),
    )
    if rule.count > 20:
        raise r.error("count", f"must be an integer in [1, 20], got {rule.count}")
    if rule.prefer_bonus_s and rule.prefer_kind is None:
        raise r.error("prefer_bonus_s", "needs 'prefer_kind' (which kind gets the bonus)")
    if rule.prefer_bonus_s and rule.rank != "eta":
        raise r.error("prefer_bonus_s", "is seconds of ETA: it needs 'rank: eta'")
    return rule


def _speeds(data: Mapping[str, Any] | None, source: str) -> dict[str, KindSpeed]:
    speeds = dict(DEFAULT_SPEEDS)
    if data is None:
        return speeds
    top = _Reader(data, source, None, tuple(sorted(UNIT_KINDS)), "speeds.")
    for kind in sorted(UNIT_KINDS):
        section = top.mapping(kind)
        if section is None:
            continue
        r = _Reader(section, source, None, _SPEED_FIELDS, f"speeds.{kind}.")
        base = speeds[kind]
        by_street: dict[str, float] = dict(base.by_street_kind)
        streets = r.mapping("by_street_kind")
        if streets is not None:
            sr = _Reader(streets, source, None, tuple(str(k) for k in streets), f"speeds.{kind}.by_street_kind.")
            by_street = {str(k): sr.number(str(k), 0, 0.1, 100, "a speed in m/s") for k in streets}
        speeds[kind] = KindSpeed(
            r.number("street_mps", base.street_mps, 0.1, 100, "a speed in m/s"),
            r.number("off_street_mps", base.off_street_mps, 0.1, 100, "a speed in m/s"),
            by_street,
        )
    return speeds


def policy_from_mapping(data: Any, source: str = "<policy>") -> Policy:
    """Validate a parsed policy document and build the `Policy`; raises `PolicyError`."""
    if not isinstance(data, Mapping):
        raise PolicyError(source, "a policy is a mapping with 'version' and 'incidents'")
    top = _Reader(data, source, None, _TOP_FIELDS)
    if data.get("version") != 1:
        raise top.error("version", f"must be 1, got {data.get('version')!r}")
    incidents = top.mapping("incidents")
    if not incidents:
        raise top.error("incidents", "must map at least one incident type to a rule")
    rules: dict[str, Rule] = {}
    lines = getattr(incidents, "lines", {})
    for name, body in incidents.items():
        line = lines.get(name)
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise PolicyError(source, f"incident type {name!r} must be a name (lower case, digits, '_')", line=line)
        rules[name] = _rule(name, body, source, line)
    fallback = top.choice("fallback", None, frozenset(rules))
    return Policy(
        rules=rules,
        speeds=_speeds(top.mapping("speeds"), source),
        straight_line_detour=top.number("straight_line_detour", DEFAULT_DETOUR, 1.0, 5.0),
        max_position_age_s=top.number("max_position_age_s", 120.0, 1, 86_400, "a number of seconds"),
        alternatives_shown=top.integer("alternatives_shown", 3, 0, 20),
        fallback=fallback,
        source=source,
    )


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Parse and validate a YAML policy; raises `PolicyError` naming file, line, rule, field."""
    loader = _Loader(text)
    loader.source = source
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(source, f"not valid YAML: {problem}", line=line) from None
    finally:
        loader.dispose()
    return policy_from_mapping(data, source)


# -- the thin shell: reading files ---------------------------------------------------------------


def load_policy(path: Path) -> Policy:
    """Read and validate a policy file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(str(path), f"cannot read the policy ({exc.strerror or exc})") from None
    return parse_policy(text, path.name)


def default_policy() -> Policy:
    """The policy shipped with Bluelight (`gateway/policy/default.yaml`)."""
    text = resources.files("gateway").joinpath("policy/default.yaml").read_text(encoding="utf-8")
    return parse_policy(text, "default.yaml")


__all__ = [
    "PLACEHOLDERS",
    "RANKS",
    "TARGETS",
    "UNIT_STATES",
    "Policy",
    "PolicyError",
    "Rule",
    "default_policy",
    "load_policy",
    "parse_policy",
    "policy_from_mapping",
    "template_fields",
]
