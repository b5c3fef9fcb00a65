"""Data model v1: what each message kind's body must hold (see docs/data-model.md).

Readers ignore fields they do not know; `validate_body` checks only what it knows.
Units: metres, m/s, degrees (heading from true north), UTC milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from edge_agent.wire.errors import Malformed

FIXES = frozenset({"none", "2d", "3d"})
STATES = frozenset({"online", "offline", "available", "committed", "at_scene", "off_duty"})
ANSWERS = frozenset({"received", "accepted", "declined", "arrived"})
#: Events that are alarms: they jump ahead of telemetry and are never dropped.
ALARM_KINDS = frozenset({"event"})


def _number(body: Mapping[str, Any], key: str, lo: float, hi: float, *, required: bool) -> None:
    if key not in body:
        if required:
            raise Malformed(f"{key} is required")
        return
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise Malformed(f"{key} must be a number in [{lo}, {hi}], got {value!r}")


def _text(body: Mapping[str, Any], key: str, allowed: frozenset[str] | None = None) -> None:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise Malformed(f"{key} is required and must be a non-empty string")
    if allowed is not None and value not in allowed:
        raise Malformed(f"{key} must be one of {', '.join(sorted(allowed))}, got {value!r}")


def _position(body: Mapping[str, Any], *, required: bool) -> None:
    _number(body, "lat", -90, 90, required=required)
    _number(body, "lon", -180, 180, required=required)
    if ("lat" in body) != ("lon" in body):
        raise Malformed("lat and lon come together")
    _number(body, "acc", 0, 1e6, required=False)


def _telemetry(body: Mapping[str, Any]) -> None:
    _position(body, required=True)
    _number(body, "alt", -1000, 100_000, required=False)
    _number(body, "speed", 0, 1000, required=False)
    _number(body, "heading", 0, 360, required=False)
    if "fix" in body and (not isinstance(body["fix"], str) or body["fix"] not in FIXES):
        raise Malformed(f"fix must be one of none, 2d, 3d, got {body['fix']!r}")
    if "sensors" in body and not isinstance(body["sensors"], dict):
        raise Malformed("sensors must be a map of readings")


def _event(body: Mapping[str, Any]) -> None:
    _text(body, "type")
    _position(body, required=False)
    if "detail" in body and not isinstance(body["detail"], dict):
        raise Malformed("detail must be a map")


def _status(body: Mapping[str, Any]) -> None:
    _text(body, "state", STATES)
    _number(body, "battery", 0, 100, required=False)


def _ack(body: Mapping[str, Any]) -> None:
    _text(body, "alert_id")
    _text(body, "answer", ANSWERS)


def _alert(body: Mapping[str, Any]) -> None:
    _text(body, "alert_id")
    _text(body, "incident_id")
    _text(body, "action")
    _position(body, required=True)
    if not isinstance(body.get("reasons"), list):
        raise Malformed("reasons is required and must be a list")
    _number(body, "expires_ts", 0, 2**63, required=True)


def _cmd(body: Mapping[str, Any]) -> None:
    _text(body, "type")
    if body["type"] == "receipt":
        parse_ranges(body.get("ranges"))


_VALIDATORS: dict[str, Callable[[Mapping[str, Any]], None]] = {
    "telemetry": _telemetry,
    "event": _event,
    "status": _status,
    "ack": _ack,
    "alert": _alert,
    "cmd": _cmd,
}


def validate_body(kind: str, body: Mapping[str, Any]) -> None:
    """Raise `Malformed` naming the field if `body` does not fit data model v1 for `kind`."""
    validator = _VALIDATORS.get(kind)
    if validator is None:
        raise Malformed(f"unknown kind {kind!r}")
    try:
        validator(body)
    except Malformed as exc:
        raise Malformed(f"{kind}.{exc.detail}") from None


def to_ranges(seqs: Iterable[int]) -> list[list[int]]:
    """Compress sequence numbers into sorted inclusive `[lo, hi]` ranges."""
    ranges: list[list[int]] = []
    for seq in sorted(set(seqs)):
        if ranges and ranges[-1][1] + 1 == seq:
            ranges[-1][1] = seq
        else:
            ranges.append([seq, seq])
    return ranges


def parse_ranges(value: Any) -> list[tuple[int, int]]:
    """Validate a receipt's `ranges` field."""
    if not isinstance(value, list):
        raise Malformed("ranges must be a list of [lo, hi] pairs")
    out: list[tuple[int, int]] = []
    for item in value:
        if (
            not isinstance(item, list | tuple)
            or len(item) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in item)
            or not 1 <= item[0] <= item[1]
        ):
            raise Malformed(f"bad range {item!r}: want [lo, hi] with 1 <= lo <= hi")
        out.append((item[0], item[1]))
    return out


def receipt_body(seqs: Iterable[int]) -> dict[str, Any]:
    """The body of a `cmd` receipt: the gateway has stored these sequence numbers."""
    return {"type": "receipt", "ranges": to_ranges(seqs)}
