"""The one-line format `bluelight tail` prints, as pure functions."""

from __future__ import annotations

import datetime as dt
import json

import orjson

from edge_agent.wire.envelope import Message
from edge_agent.wire.errors import Rejected


def clock(ts_ms: int) -> str:
    """`HH:MM:SS.mmm` (UTC) for a UTC millisecond timestamp."""
    try:
        when = dt.datetime.fromtimestamp(ts_ms / 1000, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return "??:??:??.???"
    return f"{when:%H:%M:%S}.{when.microsecond // 1000:03d}"


def message_line(message: Message) -> str:
    """`HH:MM:SS.mmm <id> #<seq> <kind> <compact json body>`, stamped with the device's time."""
    try:
        body = orjson.dumps(dict(message.body), option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:  # integers past 64 bits: the standard library copes
        body = json.dumps(dict(message.body), sort_keys=True, separators=(",", ":"))
    return f"{clock(message.ts)} {message.sender} #{message.seq} {message.kind} {body}"


def rejection_line(topic: str, rejection: Rejected) -> str:
    """`REJECTED <reason> <topic>: <detail>`."""
    return f"REJECTED {rejection.reason} {topic}: {rejection.detail}"
