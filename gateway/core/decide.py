"""Next-best-action, explained: for one incident, which units to ask, in order, and why,
and every unit passed over and why not. Pure: the snapshot, policy, ETA model and
`now_ms` come in, a `Recommendation` comes out; it never raises for a hard case (nobody
qualifies is an answer, with the reason).

    rec = recommend(incident, units, policy, StreetEta(graph, policy.speeds), now_ms)
    rec.chosen[0].why      # 'nearest available armed vehicle: ETA 95 s (1.1 km); next arv-2 at 140 s'
    rec.passed_over        # (PassedOver('arv-2', 'ranked_lower', 'ETA 140 s vs 95 s', ...), ...)
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_agent.wire.geo import bearing_deg, distance_m
from gateway.core.policy import UNIT_STATES, Policy, Rule
from gateway.core.streets import UNIT_KINDS, Eta, EtaModel

_CAPABILITY = re.compile(r"[a-z][a-z0-9_]{0,31}")
_COMPASS = ("north", "north-east", "east", "south-east", "south", "south-west", "west", "north-west")


def _check_position(lat: float, lon: float, what: str) -> None:
    for name, value, bound in (("lat", lat, 90), ("lon", lon, 180)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not -bound <= value <= bound:
            raise ValueError(f"{what}: {name} must be a number in [-{bound}, {bound}], got {value!r}")


@dataclass(frozen=True)
class UnitView:
    """What the decision knows of one unit: where it says it is, what it is doing and
    what it can do. `position_age_ms` is how old the position is at decision time."""

    id: str
    kind: str
    lat: float
    lon: float
    state: str = "available"
    capabilities: frozenset[str] = frozenset()
    supervisor: bool = False
    speed_mps: float = 0.0
    heading_deg: float = 0.0
    position_age_ms: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"unit id must be a non-empty string, got {self.id!r}")
        if self.kind not in UNIT_KINDS:
            raise ValueError(f"unit {self.id}: kind must be officer or vehicle, got {self.kind!r}")
        if self.state not in UNIT_STATES:
            known = ", ".join(sorted(UNIT_STATES))
            raise ValueError(f"unit {self.id}: state must be one of {known}, got {self.state!r}")
        _check_position(self.lat, self.lon, f"unit {self.id}")
        object.__setattr__(self, "capabilities", frozenset(self.capabilities))
        if not all(isinstance(c, str) and _CAPABILITY.fullmatch(c) for c in self.capabilities):
            raise ValueError(f"unit {self.id}: capabilities must be names, got {sorted(self.capabilities)!r}")
        if self.position_age_ms < 0 or self.speed_mps < 0:
            raise ValueError(f"unit {self.id}: position_age_ms and speed_mps must be >= 0")


@dataclass(frozen=True)
class IncidentView:
    """What the decision knows of one incident. `subject` is the unit it is about (the
    officer who pressed panic), never asked to respond to it. `detail` per type, e.g.
    gunshot `uncertainty_m`; anpr_hit `plate`, `predicted_lat`/`predicted_lon` (or
    `predicted: {lat, lon}`) and `heading_deg`."""

    id: str
    type: str
    lat: float
    lon: float
    t_ms: int
    subject: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"incident id must be a non-empty string, got {self.id!r}")
        if not isinstance(self.type, str) or not self.type:
            raise ValueError(f"incident {self.id}: type must be a non-empty string")
        _check_position(self.lat, self.lon, f"incident {self.id}")
        object.__setattr__(self, "detail", dict(self.detail))

    def predicted(self) -> tuple[float, float] | None:
        """The predicted position in `detail`, if there is a valid one."""
        d = self.detail
        nested = d.get("predicted")
        lat, lon = (nested.get("lat"), nested.get("lon")) if isinstance(nested, Mapping) else (
            d.get("predicted_lat"), d.get("predicted_lon"))
        try:
            _check_position(lat, lon, "predicted")  # type: ignore[arg-type]
        except ValueError:
            return None
        return float(lat), float(lon)  # type: ignore[arg-type]

    def heading(self) -> float | None:
        value = self.detail.get("heading_deg", self.detail.get("heading"))
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return None
        return float(value) % 360.0


@dataclass(frozen=True)
class Choice:
    """One unit to ask, with the facts behind it. `score` is what was ranked (seconds of
    ETA, less any preference bonus; or metres for `rank: distance`)."""

    unit_id: str
    role: str  # responder | supervisor
    eta_s: float
    distance_m: float
    straight_m: float
    state: str
    kind: str
    supervisor: bool
    capabilities_matched: tuple[str, ...]
    score: float
    action: str
    approach: str | None
    reasons: tuple[str, ...]
    why: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "unit_id": self.unit_id, "role": self.role, "eta_s": round(self.eta_s, 1),
            "distance_m": round(self.distance_m), "state": self.state, "kind": self.kind,
            "supervisor": self.supervisor, "capabilities_matched": list(self.capabilities_matched),
            "score": round(self.score, 1),
            "action": self.action, "approach": self.approach, "reasons": list(self.reasons), "why": self.why,
        }


#: Why a unit was passed over (the code the control room can count).
PASS_CODES = ("ranked_lower", "excluded", "subject", "duplicate", "state", "stale", "kind", "capability",
              "behind", "unreachable")


@dataclass(frozen=True)
class PassedOver:
    """A unit not chosen, and why: `code` (one of PASS_CODES) and a short text."""

    unit_id: str
    code: str
    why: str
    eta_s: float | None = None
    score: float | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"unit_id": self.unit_id, "code": self.code, "why": self.why}
        if self.eta_s is not None:
            out["eta_s"] = round(self.eta_s, 1)
        return out


@dataclass(frozen=True)
class Recommendation:
    """The answer for one incident: `chosen` in order (responders, then a supervisor if the
    rule asks for one), `passed_over` (ranked-lower first, by score; then the rest), and a
    `reason` when fewer units were found than the rule asks for (empty otherwise)."""

    incident_id: str
    incident_type: str
    rule: str | None
    lat: float
    lon: float
    made_ms: int
    chosen: tuple[Choice, ...]
    passed_over: tuple[PassedOver, ...]
    reason: str = ""

    @property
    def unit_ids(self) -> tuple[str, ...]:
        return tuple(c.unit_id for c in self.chosen)

    def as_dict(self) -> dict[str, Any]:
        return {
            "incident_id": self.incident_id, "incident_type": self.incident_type, "rule": self.rule,
            "lat": self.lat, "lon": self.lon, "made_ms": self.made_ms,
            "chosen": [c.as_dict() for c in self.chosen],
            "passed_over": [p.as_dict() for p in self.passed_over], "reason": self.reason,
        }


def compass(bearing: float) -> str:
    """Eight-point compass name of a bearing in degrees."""
    return _COMPASS[round((bearing % 360.0) / 45.0) % 8]


class _Values(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "?"


class _Detail(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "?"


class _Formatter(string.Formatter):
    def get_field(self, field_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        try:
            return super().get_field(field_name, args, kwargs)
        except (KeyError, IndexError, AttributeError, TypeError):
            return "?", field_name

    def format_field(self, value: Any, format_spec: str) -> str:
        try:
            return str(super().format_field(value, format_spec))
        except (ValueError, TypeError):
            return str(value)


_FORMATTER = _Formatter()


def render(template: str, values: Mapping[str, Any]) -> str:
    """Fill a policy template; unknown or missing values show as '?' (never raises)."""
    return _FORMATTER.vformat(template, (), _Values(values))


def _fmt_m(metres: float) -> str:
    return f"{metres:.0f} m" if metres < 1000 else f"{metres / 1000:.1f} km"


def _needs(rule: Rule) -> str:
    parts = [f"'{c}'" for c in sorted(rule.capabilities)]
    if rule.any_capabilities:
        parts.append(" or ".join(f"'{c}'" for c in sorted(rule.any_capabilities)))
    kind = "" if rule.kind == "any" else f" {rule.kind}"
    states = "/".join(sorted(rule.states)).replace("_", " ")
    return f"{states}{(' ' + ' '.join(parts)) if parts else ''}{kind or ' unit'}"


def _angle(a: float, b: float) -> float:
    return abs((a - b + 180.0) % 360.0 - 180.0)


@dataclass
class _Candidate:
    unit: UnitView
    eta: Eta | None
    straight_m: float
    score: float = math.inf
    code: str | None = None
    why: str = ""


def _empty(incident: IncidentView, now_ms: int, reason: str, target: tuple[float, float]) -> Recommendation:
    return Recommendation(incident.id, incident.type, None, target[0], target[1], now_ms, (), (), reason)


def recommend(
    incident: IncidentView,
    units: Iterable[UnitView],
    policy: Policy,
    eta_model: EtaModel,
    now_ms: int,
    *,
    exclude: Iterable[str] = (),
) -> Recommendation:
    """Rank `units` for `incident` under `policy`. `exclude`: units not to ask again (they
    declined, timed out or already hold an alert for this incident). Deterministic: ties
    in score go to the lower unit id."""
    rule = policy.rule_for(incident.type)
    target = (incident.lat, incident.lon)
    if rule is None:
        return _empty(incident, now_ms, f"no policy rule for incident type {incident.type!r}", target)
    if rule.target == "predicted":
        target = incident.predicted() or target
    excluded = frozenset(exclude)
    ordered: list[UnitView] = []
    seen: set[str] = set()
    dupes: list[PassedOver] = []
    for unit in sorted(units, key=lambda u: u.id):
        if unit.id in seen:
            dupes.append(PassedOver(unit.id, "duplicate", "listed twice in the snapshot (first one used)"))
            continue
        seen.add(unit.id)
        ordered.append(unit)
    etas = eta_model.etas(ordered, *target)
    heading = incident.heading() if rule.ahead_only else None
    max_age_ms = policy.max_position_age_s * 1000
    cands: list[_Candidate] = []
    for unit in ordered:
        c = _Candidate(unit, etas.get(unit.id), distance_m((unit.lat, unit.lon), target))
        cands.append(c)
        if unit.id in excluded:
            c.code, c.why = "excluded", "already asked for this incident"
        elif rule.exclude_subject and unit.id == incident.subject:
            c.code, c.why = "subject", f"the subject of this {incident.type} (not asked to respond to it)"
        elif unit.state not in rule.states:
            c.code, c.why = "state", unit.state.replace("_", " ")
        elif unit.position_age_ms > max_age_ms:
            c.code = "stale"
            c.why = f"position {unit.position_age_ms / 1000:.0f} s old (max {policy.max_position_age_s:.0f} s)"
        elif c.eta is None:
            c.code, c.why = "unreachable", "no route from its position"
    # The base filters above apply to every role; kind and capabilities only to responders.
    base_ok = [c for c in cands if c.code is None]
    for c in base_ok:
        assert c.eta is not None
        bonus = rule.prefer_bonus_s if rule.prefer_kind == c.unit.kind else 0.0
        c.score = (c.eta.seconds - bonus) if rule.rank == "eta" else c.eta.metres
    responders: list[_Candidate] = []
    for c in base_ok:
        unit = c.unit
        missing = sorted(rule.capabilities - unit.capabilities)
        if rule.kind not in {"any", unit.kind}:
            c.code, c.why = "kind", f"{'a' if unit.kind == 'vehicle' else 'an'} {unit.kind}, not a {rule.kind}"
        elif missing:
            c.code, c.why = "capability", f"no '{missing[0]}' capability"
        elif rule.any_capabilities and not rule.any_capabilities & unit.capabilities:
            c.code, c.why = "capability", "none of " + ", ".join(f"'{x}'" for x in sorted(rule.any_capabilities))
        elif heading is not None and _angle(bearing_deg((incident.lat, incident.lon), (unit.lat, unit.lon)),
                                            heading) > 90:
            bearing = bearing_deg((incident.lat, incident.lon), (unit.lat, unit.lon))
            c.code, c.why = "behind", f"behind the vehicle (bearing {bearing:.0f}° vs its heading {heading:.0f}°)"
        else:
            responders.append(c)

    def key(c: _Candidate) -> tuple[float, str]:
        return round(c.score, 3), c.unit.id

    responders.sort(key=key)
    picked = responders[: rule.count]
    supervisor: _Candidate | None = None
    if rule.supervisor and not any(c.unit.supervisor for c in picked):
        sups = sorted((c for c in base_ok if c.unit.supervisor and c not in picked), key=key)
        supervisor = sups[0] if sups else None
    chosen_ids = {c.unit.id for c in picked} | ({supervisor.unit.id} if supervisor else set())
    values_base = template_values(incident, target)
    runner_up = responders[rule.count] if len(responders) > rule.count else None
    chosen = [_choice(c, "responder", rule, target, values_base, eligible=len(responders), runner_up=runner_up)
              for c in picked]
    if supervisor is not None:
        chosen.append(_choice(supervisor, "supervisor", rule, target, values_base, eligible=0, runner_up=None))
    last = picked[-1] if picked else None
    passed: list[PassedOver] = []
    for c in responders[rule.count:]:
        if c.unit.id in chosen_ids:
            continue
        assert c.eta is not None
        assert last is not None
        passed.append(PassedOver(c.unit.id, "ranked_lower", _versus(rule, c, last), c.eta.seconds, c.score))
    rest = sorted((c for c in cands if c.code is not None and c.unit.id not in chosen_ids),
                  key=lambda c: (c.eta.seconds if c.eta else math.inf, c.unit.id))
    passed.extend(PassedOver(c.unit.id, c.code or "", c.why, c.eta.seconds if c.eta else None) for c in rest)
    passed.extend(dupes)
    reason = _shortfall(rule, incident, picked, supervisor, cands)
    return Recommendation(incident.id, incident.type, rule.name, target[0], target[1], now_ms,
                          tuple(chosen), tuple(passed), reason)


def template_values(incident: IncidentView, target: tuple[float, float]) -> dict[str, Any]:
    """The placeholders of a policy template that depend only on the incident (the unit's
    own, e.g. `{eta_s}`, are added per choice; missing ones render as '?')."""
    return {
        "incident_id": incident.id, "type": incident.type, "subject": incident.subject or "unknown",
        "where": f"{target[0]:.5f}, {target[1]:.5f}", "detail": _Detail(incident.detail),
        "uncertainty_m": _uncertainty(incident.detail),
    }


def _uncertainty(detail: Mapping[str, Any]) -> str:
    value = detail.get("uncertainty_m")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "?"
    return f"{value:.0f}"


def _versus(rule: Rule, c: _Candidate, last: _Candidate) -> str:
    assert c.eta is not None
    assert last.eta is not None
    if rule.rank == "distance":
        return f"route {_fmt_m(c.eta.metres)} vs {_fmt_m(last.eta.metres)}"
    text = f"ETA {c.eta.seconds:.0f} s vs {last.eta.seconds:.0f} s"
    if rule.prefer_kind and c.score - c.eta.seconds != last.score - last.eta.seconds:
        text += f" (score {c.score:.0f} vs {last.score:.0f}: "
        text += f"{rule.prefer_kind}s preferred by {rule.prefer_bonus_s:.0f} s)"
    elif round(c.score, 3) == round(last.score, 3):
        text += " (tie: lower id first)"
    return text


def _choice(c: _Candidate, role: str, rule: Rule, target: tuple[float, float], values_base: Mapping[str, Any], *,
            eligible: int, runner_up: _Candidate | None) -> Choice:
    unit, eta = c.unit, c.eta
    assert eta is not None
    wanted = rule.capabilities | rule.any_capabilities
    matched = tuple(sorted(wanted & unit.capabilities)) if role == "responder" else ()
    from_bearing = bearing_deg(target, (unit.lat, unit.lon))
    values = dict(values_base)
    values.update({
        "unit": unit.id, "eta_s": f"{eta.seconds:.0f}", "eta_min": f"{eta.seconds / 60:.1f}",
        "distance_m": f"{eta.metres:.0f}", "approach_from": compass(from_bearing),
    })
    approach = render(rule.approach, values) if rule.approach else None
    values["approach"] = approach or ""
    action = render(rule.action, values)
    reasons = [f"ETA {eta.seconds:.0f} s ({_fmt_m(eta.metres)} by road, {_fmt_m(c.straight_m)} direct)",
               unit.state.replace("_", " ")]
    if matched:
        reasons.append("has " + ", ".join(matched))
    if role == "supervisor":
        reasons.append("nearest available supervisor")
    elif unit.supervisor:
        reasons.append("is a supervisor")
    if role == "responder" and eligible:
        reasons.append(f"{eligible} eligible unit{'s' if eligible != 1 else ''}")
    if approach:
        reasons.append(approach)
    if role == "supervisor":
        why = f"nearest available supervisor: ETA {eta.seconds:.0f} s ({_fmt_m(eta.metres)})"
    else:
        caps = " ".join(matched)
        what = " ".join(x for x in (unit.state.replace("_", " "), caps, unit.kind) if x)
        why = f"nearest {what}: ETA {eta.seconds:.0f} s ({_fmt_m(eta.metres)})"
        if runner_up is not None and runner_up.eta is not None:
            why += f"; next {runner_up.unit.id} at {runner_up.eta.seconds:.0f} s"
        if rule.prefer_kind == unit.kind and rule.prefer_bonus_s:
            why += f" ({rule.prefer_kind}s preferred by {rule.prefer_bonus_s:.0f} s)"
    return Choice(unit.id, role, eta.seconds, eta.metres, c.straight_m, unit.state, unit.kind, unit.supervisor,
                  matched, c.score, action, approach, tuple(reasons), why)


def _shortfall(rule: Rule, incident: IncidentView, picked: Sequence[_Candidate], supervisor: _Candidate | None,
               cands: Sequence[_Candidate]) -> str:
    parts: list[str] = []
    if len(picked) < rule.count:
        counts = Counter(c.why if c.code in {"state", "capability", "kind"} else c.code
                         for c in cands if c.code is not None)
        summary = ", ".join(f"{n} {why}" for why, n in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0]))))
        head = (f"no {_needs(rule)} for {incident.type}" if not picked
                else f"only {len(picked)} of {rule.count} units qualify for {incident.type}")
        parts.append(f"{head} ({summary or 'no units known'})")
    if rule.supervisor and supervisor is None and not any(c.unit.supervisor for c in picked):
        parts.append("no available supervisor")
    return "; ".join(parts)


__all__ = [
    "PASS_CODES",
    "Choice",
    "IncidentView",
    "PassedOver",
    "Recommendation",
    "UnitView",
    "compass",
    "recommend",
    "render",
    "template_values",
]
