"""When to tell a device what is stored: the receipts the gateway owes, per device.

A device gets at most one receipt per `interval_ms` (the first one at once), so a busy
fleet costs the gateway a bounded number of signatures per second however small its
batches are; a receipt never lists more than `max_seqs` sequence numbers (further ones
go in the next receipt of the same round), which keeps it far below the envelope limit."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

DEFAULT_INTERVAL_MS = 2000
DEFAULT_MAX_SEQS = 1024


class ReceiptBook:
    """Stored-but-not-yet-receipted sequence numbers per device.

    `due` costs what it returns, not the size of the fleet: devices owed a receipt whose
    interval has passed wait in `_ready`; a device just receipted waits in `_cooling`
    (in the order it was receipted, so the front is the next to come off) until its
    interval has passed."""

    __slots__ = ("_cooling", "_cooling_until", "_pending", "_ready", "interval_ms", "max_seqs")

    def __init__(self, interval_ms: int = DEFAULT_INTERVAL_MS, *, max_seqs: int = DEFAULT_MAX_SEQS) -> None:
        if interval_ms < 0:
            raise ValueError(f"receipt interval must be >= 0 ms, got {interval_ms}")
        if max_seqs < 1:
            raise ValueError(f"a receipt lists at least one seq, got {max_seqs}")
        self.interval_ms = interval_ms
        self.max_seqs = max_seqs
        self._pending: dict[str, set[int]] = {}
        #: Devices owed a receipt that may have it now (a dict as an ordered set).
        self._ready: dict[str, None] = {}
        #: (ms from which the device may have its next receipt, device), oldest first.
        self._cooling: deque[tuple[int, str]] = deque()
        self._cooling_until: dict[str, int] = {}

    def add(self, device: str, seqs: Iterable[int]) -> None:
        """These sequence numbers of `device` are now stored."""
        pending = self._pending.get(device)
        if pending is None:
            pending = self._pending[device] = set()
        pending.update(seqs)
        if not pending:
            del self._pending[device]
        elif device not in self._cooling_until:
            self._ready[device] = None

    @property
    def pending(self) -> int:
        """How many devices are owed a receipt."""
        return len(self._pending)

    def due(self, now_ms: int, *, flush: bool = False) -> list[tuple[str, list[int]]]:
        """Take the receipts to send now: `(device, sorted seqs)`, possibly several per
        device when more than `max_seqs` are pending. `flush` ignores the interval."""
        cooling, until = self._cooling, self._cooling_until
        while cooling and cooling[0][0] <= now_ms:
            at, device = cooling.popleft()
            if until.get(device) == at:  # (a flush may have receipted it again since)
                del until[device]
                if device in self._pending:
                    self._ready[device] = None
        devices = list(self._pending) if flush else list(self._ready)
        self._ready.clear()
        out: list[tuple[str, list[int]]] = []
        next_ms = now_ms + self.interval_ms
        for device in devices:
            seqs = sorted(self._pending.pop(device))
            out.extend((device, seqs[i : i + self.max_seqs]) for i in range(0, len(seqs), self.max_seqs))
            until[device] = next_ms
            cooling.append((next_ms, device))
        return out
