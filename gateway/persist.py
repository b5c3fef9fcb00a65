"""The situation's durable state on disk: a SQLite file next to the gateway's store
(`GatewaySettings.state_path`, e.g. `gw.situation.db` beside `gw.db`).

    situation_state  (kind, id) PRIMARY KEY, data (JSON): one row per incident (with its
                     alerts and recommendation), per unit with a state, and one `meta`
                     row (snapshot version, incident counter, replay watermark, geofences)

The records are `gateway.core.snapshot`'s; this module only stores them. `write` applies
a `StateChanges` (upserts and deletes) in one transaction; `load` reads them back into a
snapshot. WAL, `synchronous=NORMAL`: a committed write survives the process being
killed (it may not survive a power cut: the last few hundred milliseconds of changes
can then be lost, as for the store).

A file that cannot be read (not a database, a broken JSON record, another version) is
not the gateway's to repair: `set_aside` renames it (and its `-wal`/`-shm`) to
`<name>.bad-<UTC time>` so it can be looked at, and the gateway starts with an empty
picture.

Threads: a `StateFile` may be used from any thread, one call at a time (a lock
serialises them); the shell calls it on its own DB thread.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from edge_agent.errors import BluelightError
from gateway.core.snapshot import SNAPSHOT_VERSION, Record, StateChanges

BUSY_TIMEOUT_MS = 10_000
#: The file's own format (the records inside carry the snapshot version).
FILE_FORMAT = 1
_SCHEMA = """CREATE TABLE IF NOT EXISTS situation_state (
    kind TEXT NOT NULL, id TEXT NOT NULL, data TEXT NOT NULL, PRIMARY KEY (kind, id)) WITHOUT ROWID"""
_UPSERT = ("INSERT INTO situation_state (kind, id, data) VALUES (?, ?, ?) "
           "ON CONFLICT(kind, id) DO UPDATE SET data = excluded.data")
_DELETE = "DELETE FROM situation_state WHERE kind = ? AND id = ?"
KINDS = {"incident": "incidents", "unit": "units"}


class StateUnreadable(BluelightError):
    """The saved state cannot be read; the message says which file and why."""


class StateFile:
    """The `situation_state` table of one SQLite file."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path) -> StateFile:
        """Open (creating it if missing). Raises `StateUnreadable` if it is not a
        database of this format."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StateUnreadable(f"cannot open the saved situation {path}: {exc}") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            (found,) = conn.execute("PRAGMA user_version").fetchone()
            if found not in (0, FILE_FORMAT):
                raise StateUnreadable(f"the saved situation {path} has file format {found}, not {FILE_FORMAT}")
            conn.execute(_SCHEMA)
            conn.execute(f"PRAGMA user_version = {FILE_FORMAT}")
        except sqlite3.Error as exc:
            conn.close()
            raise StateUnreadable(f"the saved situation {path} is not a readable database: {exc}") from None
        except StateUnreadable:
            conn.close()
            raise
        return cls(conn, path)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def load(self) -> Record | None:
        """The saved snapshot (`gateway.core.snapshot` layout), or None if nothing was
        saved. Raises `StateUnreadable` for a row that is not JSON or of an unknown kind."""
        with self._lock:
            try:
                rows = self._conn.execute("SELECT kind, id, data FROM situation_state").fetchall()
            except sqlite3.Error as exc:
                raise StateUnreadable(f"cannot read the saved situation {self.path}: {exc}") from None
        if not rows:
            return None
        snapshot: dict[str, Any] = {"incidents": {}, "units": {}}
        for kind, row_id, data in rows:
            try:
                value = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                raise StateUnreadable(f"the saved situation {self.path}: {kind} {row_id} is not JSON: {exc}") from None
            if kind == "meta":
                if not isinstance(value, dict):
                    raise StateUnreadable(f"the saved situation {self.path}: the meta record is not an object")
                snapshot["version"] = value.pop("version", None)
                snapshot["meta"] = value
            elif kind in KINDS:
                snapshot[KINDS[kind]][row_id] = value
            else:
                raise StateUnreadable(f"the saved situation {self.path}: unknown record kind {kind!r}")
        if "meta" not in snapshot:
            raise StateUnreadable(f"the saved situation {self.path} has records but no meta record")
        return snapshot

    def write(self, changes: StateChanges) -> int:
        """Apply `changes` in one transaction; returns the rows written or deleted.
        Raises `sqlite3.Error` (nothing is written then)."""
        upserts: list[tuple[str, str, str]] = []
        deletes: list[tuple[str, str]] = []
        for kind, records in (("incident", changes.incidents), ("unit", changes.units)):
            for row_id, record in records.items():
                if record is None:
                    deletes.append((kind, row_id))
                else:
                    upserts.append((kind, row_id, orjson.dumps(record).decode()))
        if changes.meta is not None:
            meta = {**changes.meta, "version": SNAPSHOT_VERSION}
            upserts.append(("meta", "situation", orjson.dumps(meta).decode()))
        if not upserts and not deletes:
            return 0
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(_UPSERT, upserts)
                conn.executemany(_DELETE, deletes)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return len(upserts) + len(deletes)

    def replace(self, snapshot: Record) -> None:
        """Drop every record and write `snapshot` (tests, tools)."""
        with self._lock:
            self._conn.execute("DELETE FROM situation_state")
        self.write(StateChanges(snapshot["meta"], dict(snapshot["incidents"]), dict(snapshot["units"])))


def set_aside(path: Path, *, now_s: float | None = None) -> Path:
    """Rename a state file that cannot be used (and its WAL files) out of the way, so
    the gateway can start a fresh one; returns the new name. The file must be closed."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now_s is None else now_s))
    aside = path.with_name(f"{path.name}.bad-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.bad-{stamp}-{n}")
    for suffix in ("-wal", "-shm"):
        extra = path.with_name(path.name + suffix)
        if extra.exists():
            extra.rename(aside.with_name(aside.name + suffix))
    if path.exists():
        path.rename(aside)
    return aside


__all__ = ["FILE_FORMAT", "StateFile", "StateUnreadable", "set_aside"]
