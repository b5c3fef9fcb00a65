"""Versioned, per-identity MQTT topics: `bl/v1/<id>/up/<kind>` and `bl/v1/<id>/down/<kind>`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edge_agent.wire.errors import Malformed
from edge_agent.wire.ids import InvalidId, check_id

PREFIX = "bl/v1"
UP_KINDS = frozenset({"telemetry", "event", "status", "ack"})
DOWN_KINDS = frozenset({"alert", "cmd"})

#: What the gateway subscribes to (the broker's ACL grants it to the gateway only).
UP_FILTER = f"{PREFIX}/+/up/#"

Direction = Literal["up", "down"]


@dataclass(frozen=True)
class Topic:
    """A parsed topic; construct with `Topic.up`/`Topic.down` or `Topic.parse`."""

    sender: str
    direction: Direction
    kind: str

    def __post_init__(self) -> None:
        check_id(self.sender)
        kinds = UP_KINDS if self.direction == "up" else DOWN_KINDS
        if self.kind not in kinds:
            raise ValueError(f"unknown {self.direction} kind {self.kind!r}")

    @classmethod
    def up(cls, sender: str, kind: str) -> Topic:
        return cls(sender, "up", kind)

    @classmethod
    def down(cls, sender: str, kind: str) -> Topic:
        return cls(sender, "down", kind)

    @classmethod
    def parse(cls, text: str) -> Topic:
        """Parse a concrete topic, raising `Malformed` for anything else."""
        parts = text.split("/")
        if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != PREFIX or parts[3] not in ("up", "down"):
            raise Malformed(f"not a Bluelight topic: {text!r}")
        try:
            return cls(parts[2], "up" if parts[3] == "up" else "down", parts[4])
        except (InvalidId, ValueError) as exc:
            raise Malformed(f"bad topic {text!r}: {exc}") from None

    def __str__(self) -> str:
        return f"{PREFIX}/{self.sender}/{self.direction}/{self.kind}"


def down_filter(identity: str) -> str:
    """What a device or app subscribes to: its own commands and alerts."""
    return f"{PREFIX}/{check_id(identity)}/down/#"


def shared(group: str, topic_filter: str) -> str:
    """An MQTT 5 shared subscription, so several gateways split one stream."""
    return f"$share/{check_id(group)}/{topic_filter}"
