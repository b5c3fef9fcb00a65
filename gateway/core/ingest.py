"""The gateway's ingest decision for one MQTT message, sans-IO: verify it (topic,
envelope, sender key, role, identity agreement, data model), run it through the
sender's replay window and clock-skew estimator, and return either an `Accepted`
record ready to store or a `Rejection` with its reason code. Every rejection is
counted by reason. The receive time is passed in; nothing here reads a clock."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from edge_agent.wire.errors import REASONS, Malformed, Rejected, Replayed
from edge_agent.wire.ids import SENDING_ROLES, Role
from edge_agent.wire.verify import KeyLookup, verify_message
from gateway.core.skew import DEFAULT_WINDOW_MS, SkewEstimator
from gateway.core.window import DEFAULT_WINDOW, ReplayWindow, Verdict

#: Sequence numbers and timestamps must fit a signed 64-bit store column.
MAX_INT = 2**62


class Accepted(NamedTuple):
    """A verified message, ready to store (a named tuple: immutable and cheap to make).
    `late` means older than the replay window (the store's unique key decides whether it
    is new); `gap` is the range of sequence numbers this one skipped over, if any."""

    device_id: str
    seq: int
    kind: str
    ts: int
    recv_ms: int
    body: Mapping[str, Any]
    body_json: str
    raw: bytes
    skewed: bool
    late: bool = False
    gap: tuple[int, int] | None = None


class Rejection(NamedTuple):
    """A message that was not accepted. For `replayed`, `sender` and `seq` are verified
    facts (the message was stored before, so it is still receipted)."""

    reason: str
    detail: str
    topic: str
    sender: str | None = None
    seq: int | None = None


@dataclass
class IngestCounts:
    """What one `IngestCore` has decided since it was made."""

    accepted: int = 0
    late: int = 0
    gaps: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))

    def total_rejected(self) -> int:
        return sum(self.rejected.values())


class _Sender:
    __slots__ = ("skew", "window")

    def __init__(self, window: int, bound_ms: int, skew_window_ms: int, highest: int = 0) -> None:
        self.window = ReplayWindow(window, highest=highest)
        self.skew = SkewEstimator(bound_ms, window_ms=skew_window_ms)


class IngestCore:
    """Verifies and classifies incoming messages; keeps per-sender replay and skew state."""

    def __init__(
        self,
        keys: KeyLookup,
        *,
        roles: frozenset[Role] = SENDING_ROLES,
        window: int = DEFAULT_WINDOW,
        skew_bound_ms: int = 2000,
        skew_window_ms: int = DEFAULT_WINDOW_MS,
    ) -> None:
        if window < 1:
            raise ValueError(f"replay window must be >= 1, got {window}")
        self._keys = keys
        self._roles = roles
        self._window = window
        self._bound_ms = skew_bound_ms
        self._skew_window_ms = skew_window_ms
        self._senders: dict[str, _Sender] = {}
        self.counts = IngestCounts()

    def seed(self, sender: str, last_seq: int) -> None:
        """Start `sender`'s window at the highest sequence number already stored, so a
        restart does not report the whole history as a gap."""
        if sender not in self._senders and 0 <= last_seq < MAX_INT:
            self._senders[sender] = _Sender(self._window, self._bound_ms, self._skew_window_ms, last_seq)

    def skew_ms(self, sender: str) -> int | None:
        """The sender's current clock-offset estimate (gateway minus device), if known."""
        state = self._senders.get(sender)
        return None if state is None else state.skew.estimate_ms

    def highest(self, sender: str) -> int:
        state = self._senders.get(sender)
        return 0 if state is None else state.window.highest

    def reject(self, reason: str, detail: str, topic: str, sender: str | None = None) -> Rejection:
        """Count a rejection decided outside `ingest` (e.g. by the shell)."""
        self._count(reason)
        return Rejection(reason, detail, topic, sender)

    def _count(self, reason: str) -> None:
        rejected = self.counts.rejected
        rejected[reason] = rejected.get(reason, 0) + 1

    def ingest(self, topic: str, payload: bytes, recv_ms: int) -> Accepted | Rejection:
        """Decide on one message. Never raises for bad input: every failure is a counted
        `Rejection`."""
        try:
            message = verify_message(topic, payload, self._keys, self._roles)
            if message.seq >= MAX_INT or message.ts >= MAX_INT:
                raise Malformed("seq or ts out of range", sender=message.sender)
            try:
                body_json = orjson.dumps(message.body).decode()
            except (TypeError, ValueError) as exc:
                raise Malformed(f"body is not representable as JSON ({exc})", sender=message.sender) from None
        except Rejected as exc:
            self._count(exc.reason)
            return Rejection(exc.reason, exc.detail, topic, exc.sender)
        sender = message.sender
        state = self._senders.get(sender)
        if state is None:
            state = self._senders[sender] = _Sender(self._window, self._bound_ms, self._skew_window_ms)
        seen = state.window.observe(message.seq)
        if seen.verdict is Verdict.SEEN:
            self._count(Replayed.reason)
            return Rejection(Replayed.reason, f"seq {message.seq} already received", topic, sender, message.seq)
        skewed = state.skew.observe(message.ts, recv_ms)
        late = seen.verdict is Verdict.LATE
        self.counts.accepted += 1
        if late:
            self.counts.late += 1
        if seen.gap is not None:
            self.counts.gaps += 1
        return Accepted(
            sender, message.seq, message.kind, message.ts, recv_ms, message.body, body_json, bytes(payload),
            skewed, late, seen.gap,
        )
