"""Next-best-action decisions: the truly nearest eligible unit by ETA, every unit passed
over with the reason, deterministic ties, and an answer (never an exception) when
nobody qualifies."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.wire.geo import offset
from gateway.core.decide import IncidentView, UnitView, compass, recommend
from gateway.core.policy import default_policy
from gateway.core.streets import Eta, Placed, StraightLineEta

ORIGIN = (51.5, -0.12)
NOW = 1_767_225_600_000
POLICY = default_policy()


class FixedEta:
    """An ETA model that returns what the test says, per unit id."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds

    def etas(self, units: Sequence[Placed], lat: float, lon: float) -> dict[str, Eta]:
        return {u.id: Eta(self.seconds[u.id], self.seconds[u.id] * 10) for u in units if u.id in self.seconds}


def unit(uid: str, north: float = 0, east: float = 0, **kw: object) -> UnitView:
    lat, lon = offset(ORIGIN, north, east)
    return UnitView(uid, str(kw.pop("kind", "vehicle")), lat, lon, **kw)  # type: ignore[arg-type]


def incident(kind: str = "operator", **kw: object) -> IncidentView:
    return IncidentView("inc-1", kind, ORIGIN[0], ORIGIN[1], NOW, **kw)  # type: ignore[arg-type]


def test_picks_the_nearest_available_by_eta_and_explains_the_rest() -> None:
    units = [
        unit("a", state="committed"), unit("b"), unit("c"), unit("d", state="off_duty"),
        unit("e", position_age_ms=600_000),
    ]
    eta = FixedEta({"a": 30, "b": 95, "c": 240, "d": 10, "e": 5})
    rec = recommend(incident(), units, POLICY, eta, NOW)
    assert rec.unit_ids == ("b",)
    assert rec.reason == ""
    choice = rec.chosen[0]
    assert choice.eta_s == 95
    assert "ETA 95 s" in choice.why
    assert "next c at 240 s" in choice.why
    why = {p.unit_id: (p.code, p.why) for p in rec.passed_over}
    assert why["c"] == ("ranked_lower", "ETA 240 s vs 95 s")
    assert why["a"] == ("state", "committed")
    assert why["d"] == ("state", "off duty")
    assert why["e"][0] == "stale"
    assert "600 s old" in why["e"][1]
    assert rec.passed_over[0].unit_id == "c"  # ranked lower ones first


def test_the_officer_who_pressed_panic_is_not_asked_and_a_supervisor_is() -> None:
    units = [unit("me", kind="officer"), unit("b"), unit("c"), unit("d"), unit("sgt", kind="officer", supervisor=True)]
    eta = FixedEta({"me": 0, "b": 60, "c": 70, "d": 80, "sgt": 300})
    rec = recommend(incident("panic", subject="me"), units, POLICY, eta, NOW)
    assert rec.unit_ids == ("b", "c", "sgt")
    assert [c.role for c in rec.chosen] == ["responder", "responder", "supervisor"]
    assert {p.unit_id: p.code for p in rec.passed_over}["me"] == "subject"
    assert "me" in rec.chosen[0].action  # "officer me pressed panic"


def test_a_supervisor_among_the_responders_is_enough() -> None:
    units = [unit("b", supervisor=True), unit("c"), unit("sgt", supervisor=True)]
    rec = recommend(incident("panic"), units, POLICY, FixedEta({"b": 10, "c": 20, "sgt": 30}), NOW)
    assert rec.unit_ids == ("b", "c")


def test_gunshot_needs_an_armed_vehicle_and_gets_approach_advice() -> None:
    units = [unit("foot", 100, 0, kind="officer", capabilities=frozenset({"armed"})),
             unit("van", 0, 50), unit("arv", 0, -400, capabilities=frozenset({"armed"}))]
    eta = FixedEta({"foot": 20, "van": 10, "arv": 95})
    rec = recommend(incident("gunshot", detail={"uncertainty_m": 14}), units, POLICY, eta, NOW)
    assert rec.unit_ids == ("arv",)
    why = {p.unit_id: p.why for p in rec.passed_over}
    assert why["van"] == "no 'armed' capability"
    assert why["foot"] == "an officer, not a vehicle"
    approach = rec.chosen[0].approach
    assert approach == "approach from the west out of line of sight; located source ±14 m"
    assert approach in rec.chosen[0].reasons
    assert rec.chosen[0].capabilities_matched == ("armed",)


def test_anpr_ranks_by_eta_to_the_predicted_position_and_skips_units_behind() -> None:
    ahead_lat, ahead_lon = offset(ORIGIN, 0, 800)
    units = [unit("behind", 0, -100), unit("ahead", 0, 600, kind="officer"), unit("far", 0, 1500)]
    detail = {"plate": "AB12CDE", "predicted_lat": ahead_lat, "predicted_lon": ahead_lon, "heading_deg": 90}
    rec = recommend(incident("anpr_hit", detail=detail), units, POLICY, StraightLineEta(POLICY.speeds), NOW)
    assert (rec.lat, rec.lon) == (ahead_lat, ahead_lon)
    assert rec.unit_ids == ("far", "ahead")  # the vehicle 700 m away beats the officer 200 m away on foot
    assert "AB12CDE" in rec.chosen[0].action
    assert {p.unit_id: p.code for p in rec.passed_over}["behind"] == "behind"


def test_crash_wants_any_of_first_aid_or_traffic() -> None:
    units = [unit("plain"), unit("medic", capabilities=frozenset({"first_aid"})),
             unit("traffic", capabilities=frozenset({"traffic"}))]
    rec = recommend(incident("crash"), units, POLICY, FixedEta({"plain": 1, "medic": 50, "traffic": 40}), NOW)
    assert rec.unit_ids == ("traffic",)
    assert {p.unit_id: p.why for p in rec.passed_over}["plain"] == "none of 'first_aid', 'traffic'"


def test_nobody_qualifies_is_an_answer_with_the_reason() -> None:
    units = [unit("a", state="committed"), unit("b", state="committed"), unit("c")]
    rec = recommend(incident("gunshot"), units, POLICY, FixedEta({"a": 1, "b": 2, "c": 3}), NOW)
    assert rec.chosen == ()
    assert rec.reason == "no available 'armed' vehicle for gunshot (2 committed, 1 no 'armed' capability)"
    assert recommend(incident("gunshot"), [], POLICY, FixedEta({}), NOW).reason.endswith("(no units known)")


def test_fewer_than_asked_and_no_supervisor_are_said() -> None:
    rec = recommend(incident("panic"), [unit("b")], POLICY, FixedEta({"b": 5}), NOW)
    assert rec.unit_ids == ("b",)
    assert "only 1 of 2 units qualify" in rec.reason
    assert "no available supervisor" in rec.reason


def test_excluded_units_are_not_asked_again() -> None:
    rec = recommend(incident(), [unit("a"), unit("b")], POLICY, FixedEta({"a": 1, "b": 2}), NOW, exclude={"a"})
    assert rec.unit_ids == ("b",)
    assert rec.passed_over[0].code == "excluded"


def test_unreachable_units_are_passed_over() -> None:
    rec = recommend(incident(), [unit("a"), unit("b")], POLICY, FixedEta({"b": 200}), NOW)
    assert rec.unit_ids == ("b",)
    assert {p.unit_id: p.code for p in rec.passed_over}["a"] == "unreachable"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_deterministic_ties_by_id_whatever_the_order(etas: list[int], rnd: object) -> None:
    units = [unit(f"u{i:02d}") for i in range(len(etas))]
    model = FixedEta({u.id: float(s) for u, s in zip(units, etas, strict=True)})
    shuffled = list(units)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    a = recommend(incident(), units, POLICY, model, NOW)
    b = recommend(incident(), shuffled, POLICY, model, NOW)
    assert a == b
    best = min(etas)
    assert a.unit_ids == (f"u{etas.index(best):02d}",)


def test_unknown_type_without_fallback_is_an_answer() -> None:
    policy = type(POLICY)(rules={"crash": POLICY.rules["crash"]})
    rec = recommend(incident("tamper"), [unit("a")], policy, FixedEta({"a": 1}), NOW)
    assert rec.chosen == ()
    assert rec.reason == "no policy rule for incident type 'tamper'"


@pytest.mark.parametrize(("bearing", "name"), [(0, "north"), (44, "north-east"), (181, "south"), (350, "north")])
def test_compass(bearing: float, name: str) -> None:
    assert compass(bearing) == name


def test_views_refuse_bad_values() -> None:
    with pytest.raises(ValueError, match="kind"):
        UnitView("a", "horse", 51.5, -0.1)
    with pytest.raises(ValueError, match="lat"):
        UnitView("a", "officer", 91, -0.1)
    with pytest.raises(ValueError, match="state"):
        UnitView("a", "officer", 51.5, -0.1, state="napping")
