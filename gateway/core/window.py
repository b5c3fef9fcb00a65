"""An anti-replay window per sender, like IPsec's (RFC 4303 section 3.4.3): the highest
sequence number seen and a bitmap of which of the last `size` numbers were seen.

Sequence numbers newer than the highest slide the window; a number inside the window is
new exactly once; a number older than the window cannot be judged here and is reported
as `LATE` (the store's unique key decides), so a long backlog sent after an outage is
never lost."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

DEFAULT_WINDOW = 4096


class Verdict(Enum):
    """How a sequence number relates to what the window has seen."""

    NEW = "new"
    SEEN = "seen"
    LATE = "late"


@dataclass(frozen=True, slots=True)
class Observation:
    """The verdict for one sequence number; `gap` is the inclusive range it skipped over."""

    verdict: Verdict
    gap: tuple[int, int] | None = None


_NEW = Observation(Verdict.NEW)
_SEEN = Observation(Verdict.SEEN)
_LATE = Observation(Verdict.LATE)


class ReplayWindow:
    """Highest sequence number plus a bitmap: bit `i` set means `highest - i` was seen."""

    __slots__ = ("_bits", "_mask", "highest", "size")

    def __init__(self, size: int = DEFAULT_WINDOW, *, highest: int = 0) -> None:
        if size < 1:
            raise ValueError(f"window size must be >= 1, got {size}")
        if highest < 0:
            raise ValueError(f"highest must be >= 0, got {highest}")
        self.size = size
        self.highest = highest
        self._mask = (1 << size) - 1
        # Seeded from storage: which numbers at or below `highest` were seen is unknown,
        # so they count as new and the store's unique key decides.
        self._bits = 0

    def classify(self, seq: int) -> Verdict:
        """What `observe(seq)` would say, without recording anything."""
        if seq > self.highest:
            return Verdict.NEW
        offset = self.highest - seq
        if offset >= self.size:
            return Verdict.LATE
        return Verdict.SEEN if (self._bits >> offset) & 1 else Verdict.NEW

    def observe(self, seq: int) -> Observation:
        """Classify `seq` and record it as seen."""
        if seq < 1:
            raise ValueError(f"sequence numbers start at 1, got {seq}")
        highest = self.highest
        if seq > highest:
            shift = seq - highest
            self._bits = 1 if shift >= self.size else ((self._bits << shift) | 1) & self._mask
            self.highest = seq
            if shift > 1:
                return Observation(Verdict.NEW, (highest + 1, seq - 1))
            return _NEW
        offset = highest - seq
        if offset >= self.size:
            return _LATE
        bit = 1 << offset
        if self._bits & bit:
            return _SEEN
        self._bits |= bit
        return _NEW

    def __repr__(self) -> str:
        return f"ReplayWindow(size={self.size}, highest={self.highest}, seen={self._bits.bit_count()})"
