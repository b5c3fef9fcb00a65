"""The published JSON Schemas (docs/schemas) are valid Draft 2020-12 and agree with the
receiver's own check, `validate_body` (and `decode_payload` for the envelope payload).

The schemas say what writers must produce; `validate_body` is what receivers enforce.
On the fields `validate_body` checks they agree exactly; on a few optional fields it
does not check (e.g. `status.firmware`), the schema is stricter. So: schema-valid
always implies receiver-valid.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from edge_agent.wire.envelope import decode_payload
from edge_agent.wire.errors import Malformed
from edge_agent.wire.model import ANSWERS, FIXES, STATES, validate_body

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schemas"
KINDS = ("telemetry", "event", "status", "ack", "alert", "cmd")
DRAFT = "https://json-schema.org/draft/2020-12/schema"


def _load(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMAS / f"{name}.json").read_text())
    return schema


@cache
def _registry() -> Registry:
    resources = [Resource.from_contents(_load(path.stem)) for path in sorted(SCHEMAS.glob("*.json"))]
    return Registry().with_resources((resource.id(), resource) for resource in resources)  # type: ignore[misc]


@cache
def _validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(_load(name), registry=_registry())


def _schema_ok(name: str, instance: Any) -> bool:
    return bool(_validator(name).is_valid(instance))


def _model_ok(kind: str, body: dict[str, Any]) -> bool:
    try:
        validate_body(kind, body)
    except Malformed:
        return False
    return True


# -- the schema files themselves ---------------------------------------------------------------


def test_one_schema_per_kind_plus_the_payload() -> None:
    assert {*KINDS, "envelope-payload"} <= {p.stem for p in SCHEMAS.glob("*.json")}


@pytest.mark.parametrize("name", [*KINDS, "envelope-payload"])
def test_schema_is_valid_draft_2020_12(name: str) -> None:
    schema = _load(name)
    assert schema["$schema"] == DRAFT
    assert schema["$id"] == f"urn:bluelight:schema:v1:{name}"
    assert schema["type"] == "object"
    assert schema["title"]
    assert schema["description"]
    assert schema.get("additionalProperties", True) is True, "readers must ignore unknown fields"
    Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("kind", KINDS)
def test_schema_examples_pass_both(kind: str) -> None:
    examples = _load(kind)["examples"]
    assert examples
    for body in examples:
        assert _schema_ok(kind, body), body
        assert _model_ok(kind, body), body


@pytest.mark.parametrize("kind", KINDS)
def test_schema_requires_what_validate_body_requires(kind: str) -> None:
    minimal = VALID[kind][0]
    assert set(_load(kind)["required"]) == set(minimal)


# -- hand-picked bodies: valid for both, invalid for both ------------------------------------------

ALERT = {
    "alert_id": "al-1",
    "incident_id": "inc-1",
    "action": "attend",
    "lat": 51.5,
    "lon": -0.12,
    "reasons": [],
    "expires_ts": 1_767_225_660_000,
}

VALID: dict[str, list[dict[str, Any]]] = {
    "telemetry": [
        {"lat": 0, "lon": 0},
        {"lat": -90, "lon": 180, "acc": 0, "alt": -1000, "speed": 0, "heading": 360, "fix": "none"},
        {"lat": 51.5, "lon": -0.12, "sensors": {}, "x-future": [1, {"a": None}]},
    ],
    "event": [
        {"type": "panic"},
        {"type": "gunshot", "lat": 1, "lon": 2, "acc": 30, "detail": {"confidence": 0.9}},
        {"type": "some_future_type", "acc": 5},
    ],
    "status": [
        {"state": "online"},
        {"state": "offline", "reason": "connection lost"},
        {"state": "at_scene", "battery": 0, "firmware": "1.2.3"},
    ],
    "ack": [
        {"alert_id": "al-1", "answer": "received"},
        {"alert_id": "x", "answer": "declined", "reason": "off duty"},
    ],
    "alert": [
        ALERT,
        {**ALERT, "reasons": ["nearest"], "acc": 3, "alternatives": [{"unit": "o-2"}], "route_hint": "north"},
        {**ALERT, "expires_ts": 0},
    ],
    "cmd": [
        {"type": "config"},
        {"type": "receipt", "ranges": []},
        {"type": "receipt", "ranges": [[1, 1], [3, 10]]},
        {"type": "rotate_cert", "ranges": "ignored for non-receipts"},
    ],
}

INVALID: dict[str, list[dict[str, Any]]] = {
    "telemetry": [
        {},
        {"lat": 0},
        {"lon": 0},
        {"lat": 90.5, "lon": 0},
        {"lat": 0, "lon": -180.5},
        {"lat": "0", "lon": 0},
        {"lat": True, "lon": 0},
        {"lat": None, "lon": 0},
        {"lat": 0, "lon": 0, "acc": -0.5},
        {"lat": 0, "lon": 0, "alt": 100_001},
        {"lat": 0, "lon": 0, "speed": -1},
        {"lat": 0, "lon": 0, "heading": 361},
        {"lat": 0, "lon": 0, "fix": "4d"},
        {"lat": 0, "lon": 0, "fix": None},
        {"lat": 0, "lon": 0, "sensors": [1]},
    ],
    "event": [
        {},
        {"type": ""},
        {"type": 1},
        {"type": "panic", "lat": 1},
        {"type": "panic", "lon": 1},
        {"type": "panic", "lat": 91, "lon": 1},
        {"type": "panic", "acc": -1},
        {"type": "panic", "detail": "bang"},
    ],
    "status": [
        {},
        {"state": ""},
        {"state": "sleeping"},
        {"state": "ONLINE"},
        {"state": "online", "battery": 100.5},
        {"state": "online", "battery": "full"},
    ],
    "ack": [
        {"answer": "accepted"},
        {"alert_id": "al-1"},
        {"alert_id": "", "answer": "accepted"},
        {"alert_id": "al-1", "answer": "yes"},
    ],
    "alert": [
        {k: v for k, v in ALERT.items() if k != "expires_ts"},
        {k: v for k, v in ALERT.items() if k != "reasons"},
        {k: v for k, v in ALERT.items() if k != "lon"},
        {**ALERT, "action": ""},
        {**ALERT, "reasons": "nearest"},
        {**ALERT, "expires_ts": -1},
        {**ALERT, "expires_ts": "soon"},
        {**ALERT, "lat": -90.1},
    ],
    "cmd": [
        {},
        {"type": ""},
        {"type": "receipt"},
        {"type": "receipt", "ranges": "1-5"},
        {"type": "receipt", "ranges": [[0, 5]]},
        {"type": "receipt", "ranges": [[1]]},
        {"type": "receipt", "ranges": [[1, 2, 3]]},
        {"type": "receipt", "ranges": [["1", 2]]},
        {"type": "receipt", "ranges": [[True, 2]]},
        {"type": "receipt", "ranges": [[1.5, 2]]},
    ],
}


@pytest.mark.parametrize(("kind", "index"), [(k, i) for k, bodies in VALID.items() for i in range(len(bodies))])
def test_valid_bodies_pass_both(kind: str, index: int) -> None:
    body = VALID[kind][index]
    assert _schema_ok(kind, body), list(_validator(kind).iter_errors(body))
    assert _model_ok(kind, body)


@pytest.mark.parametrize(("kind", "index"), [(k, i) for k, bodies in INVALID.items() for i in range(len(bodies))])
def test_invalid_bodies_fail_both(kind: str, index: int) -> None:
    body = INVALID[kind][index]
    assert not _schema_ok(kind, body), f"schema accepts {body}"
    assert not _model_ok(kind, body), f"validate_body accepts {body}"


def test_what_json_schema_cannot_say() -> None:
    """lo <= hi in a receipt range is checked by receivers only; writers must keep it."""
    body = {"type": "receipt", "ranges": [[5, 3]]}
    assert _schema_ok("cmd", body)
    assert not _model_ok("cmd", body)


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("status", {"state": "online", "firmware": 3}),
        ("status", {"state": "online", "reason": ["x"]}),
        ("ack", {"alert_id": "a", "answer": "accepted", "reason": 0}),
        ("alert", {**ALERT, "reasons": [1]}),
        ("alert", {**ALERT, "alternatives": "none"}),
        ("alert", {**ALERT, "expires_ts": 1.5}),
    ],
)
def test_schema_is_stricter_on_optional_fields_receivers_do_not_check(kind: str, body: dict[str, Any]) -> None:
    assert not _schema_ok(kind, body)


# -- property: on checked fields, both always agree -----------------------------------------------

ABSENT = object()


def _num(lo: float, hi: float) -> tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]:
    good = st.integers(int(lo), int(hi)) | st.floats(lo, hi)
    bad = (
        st.floats(hi, 1e300, exclude_min=True)
        | st.floats(-1e300, lo, exclude_max=True)
        | st.integers(min_value=int(hi) + 1)
        | st.text(max_size=3)
        | st.booleans()
        | st.none()
        | st.lists(st.integers(), max_size=2)
    )
    return good, bad


def _text(allowed: frozenset[str] | None = None) -> tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]:
    if allowed is None:
        good: st.SearchStrategy[Any] = st.text(min_size=1, max_size=8)
        bad: st.SearchStrategy[Any] = st.just("") | st.integers() | st.none() | st.booleans()
    else:
        good = st.sampled_from(sorted(allowed))
        bad = st.text(max_size=8).filter(lambda s: s not in allowed) | st.integers() | st.none()
    return good, bad


def _only_good(good: st.SearchStrategy[Any]) -> tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]:
    return good, good


def _kind_of(expected: type) -> tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]:
    good: st.SearchStrategy[Any] = (
        st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3)
        if expected is dict
        else st.lists(st.text(max_size=5), max_size=3)
    )
    other = st.text(max_size=3) | st.integers() | st.none() | st.booleans()
    bad = other | (st.lists(st.integers(), max_size=2) if expected is dict else st.dictionaries(st.text(), st.none()))
    return good, bad


POSITION = {"lat": _num(-90, 90), "lon": _num(-180, 180), "acc": _num(0, 1e6)}
ranges_good = st.lists(
    st.tuples(st.integers(1, 1000), st.integers(0, 1000)).map(lambda t: [t[0], t[0] + t[1]]), max_size=4
)
ranges_bad = (
    st.text(max_size=3)
    | st.none()
    | st.lists(
        st.lists(st.integers(max_value=0), min_size=2, max_size=2)
        | st.lists(st.integers(1, 9), max_size=1)
        | st.lists(st.integers(1, 9), min_size=3, max_size=4)
        | st.just([1.5, 2])
        | st.just(["1", 2]),
        min_size=1,
        max_size=3,
    )
)

FIELDS: dict[str, dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]]] = {
    "telemetry": {
        **POSITION,
        "alt": _num(-1000, 100_000),
        "speed": _num(0, 1000),
        "heading": _num(0, 360),
        "fix": (st.sampled_from(sorted(FIXES)), st.sampled_from(["", "4D", "gps"]) | st.integers() | st.none()),
        "sensors": _kind_of(dict),
    },
    "event": {"type": _text(), **POSITION, "detail": _kind_of(dict)},
    "status": {
        "state": _text(STATES),
        "battery": _num(0, 100),
        "firmware": _only_good(st.text(max_size=8)),
        "reason": _only_good(st.text(max_size=8)),
    },
    "ack": {"alert_id": _text(), "answer": _text(ANSWERS), "reason": _only_good(st.text(max_size=8))},
    "alert": {
        "alert_id": _text(),
        "incident_id": _text(),
        "action": _text(),
        **POSITION,
        "reasons": (st.lists(st.text(max_size=8), max_size=3), st.text(max_size=3) | st.none() | st.integers()),
        "expires_ts": (
            st.integers(0, 2**63),
            st.integers(max_value=-1) | st.integers(min_value=2**63 + 1) | st.text(max_size=3) | st.none(),
        ),
        "alternatives": _only_good(st.lists(st.dictionaries(st.text(max_size=4), st.integers()), max_size=2)),
        "route_hint": _only_good(st.text(max_size=8)),
    },
    "cmd": {
        "type": (st.sampled_from(["receipt", "receipt", "config", "rotate_cert"]), _text()[1]),
        "ranges": (ranges_good, ranges_bad),
    },
}


@st.composite
def bodies(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for field, (good, bad) in FIELDS[kind].items():
        choice = draw(st.sampled_from(["good", "good", "good", "bad", "absent"]), label=field)
        if choice == "good":
            body[field] = draw(good)
        elif choice == "bad":
            body[field] = draw(bad)
    if draw(st.booleans()):
        body["x-unknown"] = draw(st.none() | st.integers() | st.text(max_size=3))
    return body


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_schema_and_validate_body_agree(kind: str, data: st.DataObject) -> None:
    body = data.draw(bodies(kind))
    assert _schema_ok(kind, body) == _model_ok(kind, body), body


# -- the envelope payload ------------------------------------------------------------------------


def _decode_ok(payload: dict[str, Any]) -> bool:
    try:
        message = decode_payload(cbor2.dumps(payload))
    except Malformed:
        return False
    return message.kind in KINDS and _model_ok(message.kind, dict(message.body))


PAYLOAD = {"id": "dev-a", "seq": 1, "ts": 0, "kind": "status", "body": {"state": "online"}}


@pytest.mark.parametrize(
    ("payload", "ok"),
    [
        (PAYLOAD, True),
        ({**PAYLOAD, "future": {"x": 1}}, True),
        ({**PAYLOAD, "kind": "telemetry", "body": {"lat": 1, "lon": 2}}, True),
        ({**PAYLOAD, "seq": 2**70, "ts": 1_767_225_600_000}, True),
        ({k: v for k, v in PAYLOAD.items() if k != "id"}, False),
        ({k: v for k, v in PAYLOAD.items() if k != "body"}, False),
        ({**PAYLOAD, "id": "dev/a"}, False),
        ({**PAYLOAD, "id": ""}, False),
        ({**PAYLOAD, "id": "x" * 65}, False),
        ({**PAYLOAD, "seq": 0}, False),
        ({**PAYLOAD, "seq": "1"}, False),
        ({**PAYLOAD, "seq": True}, False),
        ({**PAYLOAD, "ts": -1}, False),
        ({**PAYLOAD, "kind": "weather"}, False),
        ({**PAYLOAD, "body": []}, False),
        ({**PAYLOAD, "body": {"state": "dozing"}}, False),
        ({**PAYLOAD, "kind": "telemetry"}, False),
    ],
)
def test_payload_schema_agrees_with_decode_payload(payload: dict[str, Any], ok: bool) -> None:
    assert _schema_ok("envelope-payload", payload) is ok
    assert _decode_ok(payload) is ok


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_payload_schema_checks_the_body_by_kind(kind: str, data: st.DataObject) -> None:
    body = data.draw(bodies(kind))
    payload = {"id": "dev-a", "seq": 3, "ts": 5, "kind": kind, "body": body}
    assert _schema_ok("envelope-payload", payload) == _model_ok(kind, body) == _decode_ok(payload)
