"""Identities, topics and data model v1: pure, fast, property-tested."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.wire.errors import Malformed
from edge_agent.wire.ids import SENDING_ROLES, InvalidId, Role, check_id
from edge_agent.wire.model import (
    ALARM_KINDS,
    ANSWERS,
    FIXES,
    STATES,
    parse_ranges,
    receipt_body,
    to_ranges,
    validate_body,
)
from edge_agent.wire.topics import DOWN_KINDS, UP_FILTER, UP_KINDS, Topic, down_filter, shared

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)

# -- identities ---------------------------------------------------------------------------


@pytest.mark.parametrize("good", ["a", "dev-a", "officer.1", "A_b-9", "9" * 64, "gateway"])
def test_valid_ids(good: str) -> None:
    assert check_id(good) == good


@pytest.mark.parametrize(
    "bad", ["", "-dev", ".dev", "_dev", "dev/a", "dev+", "dev#", "$SYS", "dev a", "dev\n", "é", "9" * 65, None, 7]
)
def test_invalid_ids(bad: Any) -> None:
    with pytest.raises(InvalidId, match="invalid id"):
        check_id(bad)


def test_roles() -> None:
    assert {r.value for r in Role} == {"device", "officer", "operator", "installer", "admin", "gateway"}
    assert frozenset({Role.DEVICE, Role.OFFICER}) == SENDING_ROLES


# -- topics ---------------------------------------------------------------------------------


@given(ident=ids, kind=st.sampled_from(sorted(UP_KINDS)))
@settings(max_examples=50)
def test_up_topics_parse_and_print_back(ident: str, kind: str) -> None:
    text = f"bl/v1/{ident}/up/{kind}"
    topic = Topic.parse(text)
    assert (topic.sender, topic.direction, topic.kind) == (ident, "up", kind)
    assert str(topic) == text == str(Topic.up(ident, kind))


@given(ident=ids, kind=st.sampled_from(sorted(DOWN_KINDS)))
@settings(max_examples=30)
def test_down_topics_parse_and_print_back(ident: str, kind: str) -> None:
    text = f"bl/v1/{ident}/down/{kind}"
    topic = Topic.parse(text)
    assert (topic.sender, topic.direction, topic.kind) == (ident, "down", kind)
    assert str(topic) == text == str(Topic.down(ident, kind))


def test_kinds() -> None:
    assert frozenset({"telemetry", "event", "status", "ack"}) == UP_KINDS
    assert frozenset({"alert", "cmd"}) == DOWN_KINDS


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "bl/v1/+/up/telemetry",
        "bl/v1/dev-a/up/+",
        "bl/v1/dev-a/up/#",
        "bl/v1/#",
        "bl/v1/+/up/#",
        "$share/bl-gateway/bl/v1/dev-a/up/telemetry",
        "bl/v2/dev-a/up/telemetry",
        "xx/v1/dev-a/up/telemetry",
        "BL/v1/dev-a/up/telemetry",
        "/bl/v1/dev-a/up/telemetry",
        "bl/v1/dev-a/up/telemetry/",
        "bl/v1/dev-a/up/telemetry/extra",
        "bl/v1/dev-a/telemetry",
        "bl/v1/dev-a/sideways/telemetry",
        "bl/v1/dev-a/UP/telemetry",
        "bl/v1/dev-a/up/alert",
        "bl/v1/dev-a/up/cmd",
        "bl/v1/dev-a/down/telemetry",
        "bl/v1/dev-a/down/ack",
        "bl/v1/dev-a/up/unknown",
        "bl/v1/dev-a/up/Telemetry",
        "bl/v1/dev-a/up/",
        "bl/v1//up/telemetry",
        "bl/v1/-dev/up/telemetry",
        "bl/v1/dev a/up/telemetry",
        "bl/v1/$SYS/up/telemetry",
        f"bl/v1/{'a' * 65}/up/telemetry",
    ],
)
def test_parse_rejects_anything_but_a_concrete_bluelight_topic(bad: str) -> None:
    with pytest.raises(Malformed):
        Topic.parse(bad)


@given(st.text(alphabet="bl/v1updownteyacmvs+#$-.a_", max_size=40))
@settings(max_examples=200)
def test_parse_either_round_trips_or_is_malformed(text: str) -> None:
    try:
        topic = Topic.parse(text)
    except Malformed:
        return
    assert str(topic) == text


@pytest.mark.parametrize(("direction", "kind"), [("up", "alert"), ("down", "telemetry"), ("up", ""), ("down", "x")])
def test_topic_constructor_rejects_kinds_of_the_other_direction(direction: str, kind: str) -> None:
    with pytest.raises(ValueError, match="kind"):
        Topic("dev-a", direction, kind)  # type: ignore[arg-type]


def test_filters() -> None:
    assert UP_FILTER == "bl/v1/+/up/#"
    assert down_filter("dev-a") == "bl/v1/dev-a/down/#"
    assert shared("bl-gateway", UP_FILTER) == "$share/bl-gateway/bl/v1/+/up/#"
    for bad in ("+", "#", "a/b", ""):
        with pytest.raises(InvalidId):
            down_filter(bad)
        with pytest.raises(InvalidId):
            shared(bad, UP_FILTER)


# -- data model -----------------------------------------------------------------------------

MINIMAL: dict[str, dict[str, Any]] = {
    "telemetry": {"lat": 51.5074, "lon": -0.1278},
    "event": {"type": "panic"},
    "status": {"state": "online"},
    "ack": {"alert_id": "al-1", "answer": "accepted"},
    "alert": {
        "alert_id": "al-1",
        "incident_id": "inc-1",
        "action": "attend",
        "lat": 51.5,
        "lon": -0.12,
        "reasons": [],
        "expires_ts": 1_767_225_660_000,
    },
    "cmd": {"type": "config"},
}

FULL: dict[str, dict[str, Any]] = {
    "telemetry": {
        "lat": -33.9,
        "lon": 151.2,
        "acc": 4.5,
        "alt": 12.0,
        "speed": 13.4,
        "heading": 359.5,
        "fix": "3d",
        "sensors": {"battery": 87, "temperature": 21.5, "heart_rate": 72},
    },
    "event": {
        "type": "gunshot",
        "lat": 51.5,
        "lon": -0.12,
        "acc": 25,
        "detail": {"t_detect_ns": 1_767_225_600_000_000_123, "confidence": 0.93},
    },
    "status": {"state": "off_duty", "battery": 12.5, "firmware": "1.4.2", "reason": "end of shift"},
    "ack": {"alert_id": "al-1", "answer": "declined", "reason": "already committed"},
    "alert": {
        **MINIMAL["alert"],
        "acc": 10,
        "reasons": ["nearest available unit", "armed response trained"],
        "alternatives": [{"unit": "officer-2", "eta_s": 240}],
        "route_hint": "approach from the north",
    },
    "cmd": {"type": "receipt", "ranges": [[1, 40], [42, 42]]},
}


@pytest.mark.parametrize("kind", sorted(MINIMAL))
def test_minimal_and_full_bodies_are_valid(kind: str) -> None:
    validate_body(kind, MINIMAL[kind])
    validate_body(kind, FULL[kind])


@pytest.mark.parametrize("kind", sorted(MINIMAL))
def test_unknown_extra_fields_are_ignored(kind: str) -> None:
    validate_body(kind, {**MINIMAL[kind], "future_field": {"nested": [1, "x", None]}, "x-vendor": True})


def test_unknown_kind_is_malformed() -> None:
    with pytest.raises(Malformed, match="unknown kind"):
        validate_body("weather", {})


REQUIRED = [(kind, field) for kind, body in MINIMAL.items() for field in body]


@pytest.mark.parametrize(("kind", "field"), REQUIRED)
def test_each_required_field_is_named_when_missing(kind: str, field: str) -> None:
    body = dict(MINIMAL[kind])
    del body[field]
    with pytest.raises(Malformed) as caught:
        validate_body(kind, body)
    assert f"{kind}.{field}" in caught.value.detail
    assert str(caught.value).startswith("malformed: ")


INVALID_VALUES: list[tuple[str, str, Any]] = [
    ("telemetry", "lat", 90.0001),
    ("telemetry", "lat", -91),
    ("telemetry", "lat", "51.5"),
    ("telemetry", "lat", True),
    ("telemetry", "lat", None),
    ("telemetry", "lon", 180.5),
    ("telemetry", "lon", -181),
    ("telemetry", "acc", -1),
    ("telemetry", "acc", 1e7),
    ("telemetry", "alt", -1001),
    ("telemetry", "alt", 100_001),
    ("telemetry", "speed", -0.1),
    ("telemetry", "speed", 1000.5),
    ("telemetry", "heading", -1),
    ("telemetry", "heading", 360.1),
    ("telemetry", "heading", "N"),
    ("telemetry", "fix", "4d"),
    ("telemetry", "fix", None),
    ("telemetry", "sensors", [1, 2]),
    ("telemetry", "sensors", "battery=3"),
    ("event", "type", ""),
    ("event", "type", 3),
    ("event", "lat", 95),
    ("event", "acc", -5),
    ("event", "detail", "loud"),
    ("status", "state", "asleep"),
    ("status", "state", ""),
    ("status", "state", None),
    ("status", "battery", 101),
    ("status", "battery", -1),
    ("ack", "alert_id", ""),
    ("ack", "alert_id", 12),
    ("ack", "answer", "maybe"),
    ("alert", "alert_id", ""),
    ("alert", "incident_id", None),
    ("alert", "action", 5),
    ("alert", "lat", 90.5),
    ("alert", "reasons", "because"),
    ("alert", "expires_ts", -1),
    ("alert", "expires_ts", "soon"),
    ("cmd", "type", ""),
    ("cmd", "type", None),
]


@pytest.mark.parametrize(("kind", "field", "value"), INVALID_VALUES)
def test_invalid_values_are_named(kind: str, field: str, value: Any) -> None:
    base = FULL[kind] if field in FULL[kind] else MINIMAL[kind]
    body = {**base, field: value}
    if field == "lat" and "lon" not in body:
        body["lon"] = 0
    with pytest.raises(Malformed) as caught:
        validate_body(kind, body)
    assert f"{kind}.{field}" in caught.value.detail


@pytest.mark.parametrize("kind", ["telemetry", "event", "alert"])
def test_lat_and_lon_come_together(kind: str) -> None:
    for only in ("lat", "lon"):
        body = {k: v for k, v in FULL[kind].items() if k not in ("lat", "lon")}
        body[only] = 10
        with pytest.raises(Malformed, match=rf"{kind}\.(lat|lon)"):
            validate_body(kind, body)


@pytest.mark.parametrize(("field", "value"), [("lat", 90), ("lat", -90), ("lon", 180), ("lon", -180)])
def test_position_bounds_are_inclusive(field: str, value: int) -> None:
    validate_body("telemetry", {"lat": 0, "lon": 0, field: value, "heading": 360, "speed": 0, "acc": 0})


@pytest.mark.parametrize("value", sorted(FIXES))
def test_every_fix_is_accepted(value: str) -> None:
    validate_body("telemetry", {"lat": 0, "lon": 0, "fix": value})


@pytest.mark.parametrize("value", sorted(STATES))
def test_every_state_is_accepted(value: str) -> None:
    validate_body("status", {"state": value})


@pytest.mark.parametrize("value", sorted(ANSWERS))
def test_every_answer_is_accepted(value: str) -> None:
    validate_body("ack", {"alert_id": "al-1", "answer": value})


@pytest.mark.parametrize("value", [[], {}, ["3d"], {"3d": 1}])
def test_unhashable_fix_is_malformed_not_a_crash(value: Any) -> None:
    """A signed body with `fix` as an array or map must be rejected as malformed
    (counted), never raise TypeError out of validate_body."""
    with pytest.raises(Malformed, match=r"telemetry\.fix"):
        validate_body("telemetry", {"lat": 0, "lon": 0, "fix": value})


@pytest.mark.parametrize(
    "ranges", [None, "1-3", [[0, 1]], [[3, 2]], [[1]], [[1, 2, 3]], [["1", 2]], [[True, 2]], [[1.0, 2]], [5]]
)
def test_receipt_with_bad_ranges_is_malformed(ranges: Any) -> None:
    body: dict[str, Any] = {"type": "receipt"} if ranges is None else {"type": "receipt", "ranges": ranges}
    with pytest.raises(Malformed, match=r"cmd\.(bad range|ranges)"):
        validate_body("cmd", body)


def test_ranges_are_only_checked_for_receipts() -> None:
    validate_body("cmd", {"type": "config", "ranges": "not checked"})


def test_alarm_kinds() -> None:
    assert frozenset({"event"}) == ALARM_KINDS


# -- receipts: ranges -----------------------------------------------------------------------

seq_sets = st.sets(st.integers(min_value=1, max_value=10_000), max_size=200)


@given(seqs=st.lists(st.integers(min_value=1, max_value=10_000), max_size=200))
@settings(max_examples=100)
def test_to_ranges_covers_exactly_the_input(seqs: list[int]) -> None:
    ranges = to_ranges(seqs)
    covered = {n for lo, hi in ranges for n in range(lo, hi + 1)}
    assert covered == set(seqs)


@given(seqs=seq_sets)
@settings(max_examples=100)
def test_to_ranges_is_sorted_disjoint_and_not_adjacent(seqs: set[int]) -> None:
    ranges = to_ranges(seqs)
    for lo, hi in ranges:
        assert lo <= hi
    for (_, hi), (next_lo, _) in itertools.pairwise(ranges):
        assert next_lo > hi + 1
    assert len(ranges) == len({n for n in seqs if n - 1 not in seqs})


@given(seqs=seq_sets)
@settings(max_examples=100)
def test_receipt_body_is_a_valid_cmd_and_parses_back(seqs: set[int]) -> None:
    body = receipt_body(seqs)
    validate_body("cmd", body)
    assert body["type"] == "receipt"
    parsed = parse_ranges(body["ranges"])
    assert {n for lo, hi in parsed for n in range(lo, hi + 1)} == seqs
    assert parsed == [tuple(r) for r in to_ranges(seqs)]


def test_to_ranges_examples() -> None:
    assert to_ranges([]) == []
    assert to_ranges([5]) == [[5, 5]]
    assert to_ranges([3, 1, 2, 2, 7, 9, 8, 11]) == [[1, 3], [7, 9], [11, 11]]
    assert receipt_body(range(1, 101)) == {"type": "receipt", "ranges": [[1, 100]]}


def test_parse_ranges_accepts_tuples_and_unsorted_input() -> None:
    assert parse_ranges([(4, 6), [1, 2]]) == [(4, 6), (1, 2)]
