"""Clock skew per sender: the minimum of the `(recv_ms - ts)` samples received in the
last `window_ms` estimates how far the device's clock is behind the gateway's. Transit
and queueing delays only ever add to a sample, so the smallest recent one is the closest
to the true offset, and a backlog with old timestamps sent after an outage does not move
it as long as one fresh message (the agent's `online` status, an alarm) came with it.

A message stamped further in the future than the bound is always flagged, and kept out
of the estimate: one bad timestamp does not taint the sender's other messages."""

from __future__ import annotations

from collections import deque

DEFAULT_WINDOW_MS = 600_000
MAX_SAMPLES = 4096


class SkewEstimator:
    """Estimates one sender's clock offset (a sliding-window minimum) and flags skew
    past `bound_ms`."""

    __slots__ = ("_last", "_window", "bound_ms", "window_ms")

    def __init__(self, bound_ms: int, *, window_ms: int = DEFAULT_WINDOW_MS) -> None:
        if bound_ms < 0:
            raise ValueError(f"skew bound must be >= 0 ms, got {bound_ms}")
        if window_ms < 1:
            raise ValueError(f"skew window must be >= 1 ms, got {window_ms}")
        self.bound_ms = bound_ms
        self.window_ms = window_ms
        # (recv_ms, offset) with offsets rising front to back: the front is the minimum.
        self._window: deque[tuple[int, int]] = deque()
        self._last: int | None = None

    @property
    def estimate_ms(self) -> int | None:
        """Gateway clock minus device clock, in ms (positive: the device is behind).
        Only future-stamped messages so far: the latest of their offsets."""
        return self._window[0][1] if self._window else self._last

    def observe(self, ts: int, recv_ms: int) -> bool:
        """Record one message; return whether it is flagged as skewed."""
        offset = recv_ms - ts
        self._last = offset
        if -offset > self.bound_ms:
            return True
        window = self._window
        while window and window[-1][1] >= offset:
            window.pop()
        window.append((recv_ms, offset))
        horizon = recv_ms - self.window_ms
        while window[0][0] < horizon or len(window) > MAX_SAMPLES:
            window.popleft()
        return abs(window[0][1]) > self.bound_ms
