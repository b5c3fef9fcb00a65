"""Ground truth: what really happened in a simulated run, as JSON lines.

    truth = TruthLog(Path("run.truth.jsonl"))    # or TruthLog(None): kept in memory
    truth.record(t_ms, "position", device="veh-1", lat=51.5, lon=-0.12)
    truth.close()

Each line is one JSON object `{"t_ms": <UTC ms>, "kind": <text>, ...fields}`. The
sensor models write: `position` (true position of a unit at each GNSS epoch, with the
fix state and the error the receiver reported), `multipath`, `gnss_jump`, `gnss_lost`,
`dropout`, `suppressed` (a reading lost to a dropout), `fall`, `recovered`, `crash`,
`panic`, `holster`, `bodycam`, `ignition`, `blue_lights`, `tamper`, `acoustic_site`,
`impulse`, `detection`, `anpr_pass`. Scorers compare the gateway's picture against it.
With a file, records go to disk only (a fleet run writes millions); `records()` reads
them back.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self


class TruthLog:
    """Append-only ground-truth records, to a JSON-lines file or (path None) in memory.
    A new log truncates its file unless `append` is set."""

    def __init__(self, path: str | Path | None = None, *, append: bool = False) -> None:
        self.path = Path(path) if path is not None else None
        self._memory: list[dict[str, Any]] = []
        self._file: IO[str] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a" if append else "w", encoding="utf-8")
        self.count = 0

    def record(self, t_ms: int, kind: str, **fields: Any) -> None:
        """Append one record. Field values must be JSON-compatible."""
        rec = {"t_ms": int(t_ms), "kind": kind, **fields}
        self.count += 1
        if self._file is not None:
            self._file.write(json.dumps(rec, separators=(",", ":")) + "\n")
        elif self.path is None:
            self._memory.append(rec)
        else:
            raise ValueError("the truth log is closed")

    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Every record so far (of one `kind` if given), oldest first."""
        if self.path is None:
            rows = list(self._memory)
        else:
            self.flush()
            with self.path.open(encoding="utf-8") as fh:
                rows = [json.loads(line) for line in fh if line.strip()]
        return rows if kind is None else [r for r in rows if r["kind"] == kind]

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


__all__ = ["TruthLog"]
