"""The audit log's shell: entries in a SQLite database, appended under one transaction
each call, read back in order, verified against the signers' certificates. The format,
chain and signature are `certs.auditchain`'s; which keys may sign is
`certs.registry.audit_keys`.

Two logs use it, in the same format, so `bluelight audit verify` checks either: the
gateway's (in its database, next to `gateway.store`'s tables, signed by the gateway's
key) and the PKI's (`DIR/audit.db`: every certificate issued and every revocation,
signed by the issuing CA's key; see `certs.pki`). It needs no gateway extras (only
`sqlite3` and `certs.auditchain`), so the PKI tooling can use it on any box.

Tables (created by `AuditLog` or `gateway.store`, idempotently)::

    audit       seq INTEGER PRIMARY KEY (1, 2, ...), ts (UTC ms), action, actor, subject,
                data (JSON: compact, keys sorted), kid, alg, hash (32 bytes), signature
    audit_head  one row: the last entry's (seq, hash), written in the same transaction
                as the entries, so a deleted tail shows (the chain alone cannot show it)

Triggers refuse UPDATE and DELETE on `audit` (and moving the head backwards): the
application can only append. That guards against mistakes, not against someone with
write access to the file, who can drop the triggers; the hashes and signatures are what
make that visible.

Threads: an `AuditLog` serialises its own calls with a lock, and each call is one
`BEGIN IMMEDIATE` transaction (or joins the one its connection is already in, so the
store's writer thread can record an entry in the same commit as the data it is about).
Give it the writer's connection (`AuditLog(store.db.conn, signer)`) from the writer
thread, or `AuditLog.open(path, signer)` for a connection of its own (WAL, busy
timeout) that any thread may use.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from certs.auditchain import (
    GENESIS_HEAD,
    AuditEntry,
    AuditError,
    AuditRecord,
    ChainReport,
    Head,
    KeyLookup,
    Unreadable,
    data_json,
    next_entry,
    verify_chain,
)
from edge_agent.wire.envelope import Signer

BUSY_TIMEOUT_MS = 10_000

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS audit (
        seq INTEGER PRIMARY KEY, ts INTEGER NOT NULL, action TEXT NOT NULL, actor TEXT NOT NULL,
        subject TEXT NOT NULL, data TEXT NOT NULL, kid TEXT NOT NULL, alg INTEGER NOT NULL,
        hash BLOB NOT NULL, signature BLOB NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS audit_head (
        id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, hash BLOB NOT NULL)""",
    """CREATE TRIGGER IF NOT EXISTS audit_append_only_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS audit_append_only_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS audit_head_forward_only BEFORE UPDATE ON audit_head
        WHEN NEW.seq < OLD.seq BEGIN SELECT RAISE(ABORT, 'the audit head only moves forward'); END""",
)
_COLUMNS = "seq, ts, action, actor, subject, data, kid, alg, hash, signature"
_INSERT = f"INSERT INTO audit ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"  # noqa: S608 - constant
_SET_HEAD = (
    "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?) "
    "ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash"
)


def create_tables(conn: sqlite3.Connection) -> None:
    """Create the audit tables and triggers if they are not there yet."""
    for statement in SCHEMA:
        conn.execute(statement)


class AuditLog:
    """Appends signed entries to the `audit` table of a database."""

    def __init__(self, conn: sqlite3.Connection, signer: Signer) -> None:
        """`conn` must be in autocommit mode (`isolation_level=None`, as `Store` opens it)."""
        self.conn = conn
        self.signer = signer
        self._lock = threading.Lock()
        self._owned = False
        try:
            create_tables(conn)
        except sqlite3.Error as exc:
            raise AuditError(f"cannot create the audit tables: {exc}") from None

    @classmethod
    def open(cls, path: Path, signer: Signer) -> AuditLog:
        """An audit log on its own connection to `path` (created if missing): WAL, a busy
        timeout, usable from any thread."""
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        except (OSError, sqlite3.Error) as exc:
            raise AuditError(f"cannot open the audit database {path}: {exc}") from None
        log = cls(conn, signer)
        log._owned = True
        return log

    def close(self) -> None:
        if self._owned:
            self.conn.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def kid(self) -> str:
        return self.signer.kid

    # -- writing --------------------------------------------------------------
    def append(
        self, action: str, actor: str, subject: str, data: Mapping[str, Any] | None = None, *, ts: int
    ) -> AuditEntry:
        """Record one entry (`ts`: UTC ms from the caller's clock) and return it."""
        (entry,) = self.append_many([AuditRecord(action, actor, subject, data or {}, ts)])
        return entry

    def append_many(self, records: Iterable[AuditRecord]) -> list[AuditEntry]:
        """Record entries in one transaction, in order; all or none are stored."""
        with self._lock, self._transaction():
            return self._append(self._head_for_append(), records)

    @contextlib.contextmanager
    def appending(self) -> Iterator[list[AuditRecord]]:
        """Do something and record it in one transaction: checks first that the log can
        be extended (`AuditError` if it was altered, before the caller acts), holds the
        write lock while the block runs, then appends the records the block put in the
        yielded list. If the block raises, nothing is recorded.

            with log.appending() as records:
                cert = issue(...)
                records.append(AuditRecord("enrolment", actor, cert_id, facts, ts))
        """
        with self._lock, self._transaction():
            head = self._head_for_append()
            records: list[AuditRecord] = []
            yield records
            self._append(head, records)

    def _append(self, head: Head, records: Iterable[AuditRecord]) -> list[AuditEntry]:
        entries: list[AuditEntry] = []
        for r in records:
            try:
                entry = next_entry(
                    head, action=r.action, actor=r.actor, subject=r.subject, data=r.data, ts=r.ts,
                    signer=self.signer,
                )
            except ValueError as exc:
                raise AuditError(f"cannot record {r.action!r}: {exc}") from None
            self.conn.execute(
                _INSERT,
                (
                    entry.seq, entry.ts, entry.action, entry.actor, entry.subject, data_json(entry.data),
                    entry.kid, entry.alg, entry.hash, entry.signature,
                ),
            )
            entries.append(entry)
            head = entry.head
        if entries:
            self.conn.execute(_SET_HEAD, (head.seq, head.hash))
        return entries

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        conn = self.conn
        if conn.in_transaction:  # the caller's transaction: it commits or rolls back
            yield
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _head_for_append(self) -> Head:
        """The chain's end, refusing to extend a log whose tail and head record disagree
        (appending would hide a deleted tail)."""
        last = last_entry_head(self.conn)
        recorded = recorded_head(self.conn)
        if recorded is None and last is None:
            return GENESIS_HEAD
        if recorded != last:
            ends = last.seq if last is not None else 0
            names = recorded.seq if recorded is not None else "nothing"
            raise AuditError(
                f"the audit log ends at entry {ends} but its head record names {names}: it was altered; "
                "run 'bluelight audit verify'"
            )
        return last or GENESIS_HEAD

    # -- reading --------------------------------------------------------------
    def head(self) -> Head:
        with self._lock:
            return last_entry_head(self.conn) or GENESIS_HEAD

    def entries(self, *, after_seq: int = 0, limit: int | None = None) -> list[AuditEntry | Unreadable]:
        with self._lock:
            return list(read_entries(self.conn, after_seq=after_seq, limit=limit))


def last_entry_head(conn: sqlite3.Connection) -> Head | None:
    row = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    return _head(row)


def recorded_head(conn: sqlite3.Connection) -> Head | None:
    """The (seq, hash) written with the last append, if any."""
    return _head(conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone())


def _head(row: tuple[Any, Any] | None) -> Head | None:
    if row is None:
        return None
    try:
        return Head(row[0], row[1])
    except ValueError as exc:
        raise AuditError(f"the audit head is malformed: {exc}") from None


def read_entries(
    conn: sqlite3.Connection, *, after_seq: int = 0, limit: int | None = None, last: int | None = None
) -> Iterator[AuditEntry | Unreadable]:
    """Entries in sequence order (`last`: only the final `last`). A row that is not a
    well-formed entry comes back as `Unreadable`, for the verifier to report."""
    if last is not None:
        sql = f"SELECT * FROM (SELECT {_COLUMNS} FROM audit ORDER BY seq DESC LIMIT ?) ORDER BY seq"  # noqa: S608
        rows = conn.execute(sql, (last,))
    else:
        sql = f"SELECT {_COLUMNS} FROM audit WHERE seq > ? ORDER BY seq LIMIT ?"  # noqa: S608 - constant
        rows = conn.execute(sql, (after_seq, -1 if limit is None else limit))
    for row in rows:
        yield decode_row(row)


def decode_row(row: tuple[Any, ...]) -> AuditEntry | Unreadable:
    seq, ts, action, actor, subject, text, kid, alg, digest, signature = row
    try:
        if not isinstance(text, str):
            raise ValueError("data is not text")
        entry = AuditEntry(seq, ts, action, actor, subject, json.loads(text), kid, alg, digest, signature)
        if data_json(entry.data) != text:
            raise ValueError("data is not in its canonical JSON form")
    except (ValueError, TypeError, RecursionError) as exc:
        return Unreadable(seq, str(exc))
    return entry


# -- verifying a database ------------------------------------------------------------------


def open_for_reading(path: Path) -> sqlite3.Connection:
    """A read-only connection to a database that has an audit log (a gateway's database
    or a PKI's `audit.db`), or `AuditError` saying what `path` is instead."""
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"no database at {path}")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        raise AuditError(f"{path} is not an audit database (a gateway's or a PKI's audit.db): {exc}") from None
    if "audit" not in tables or "audit_head" not in tables:
        conn.close()
        what = "its audit table is gone" if "messages" in tables else "no audit table"
        raise AuditError(f"{path} has no audit log ({what})")
    return conn


def verify_db(path: Path, keys: KeyLookup | None) -> ChainReport:
    """Verify the whole audit log in the database at `path` (`keys=None`: the hash chain
    and head only, no signatures)."""
    conn = open_for_reading(path)
    try:
        # No head record means nothing was ever appended: entries without one were not
        # written by `AuditLog`, or their head was deleted.
        return verify_chain(read_entries(conn), keys, head=recorded_head(conn) or GENESIS_HEAD)
    except sqlite3.Error as exc:
        raise AuditError(f"cannot read the audit log in {path}: {exc}") from None
    finally:
        conn.close()
