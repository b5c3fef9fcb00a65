"""The durable outbox: every message is signed and committed to SQLite before anything
sends it, and it leaves only when the gateway's signed receipt lists its seq.

Sequence numbers: one counter per sender, starting at 1, +1 per message across all
kinds. A seq ever handed out is in the table (its row is committed with it) or below
`meta.next_seq`, which is written in the same transaction as any deletion (receipts,
drops); on open the next seq is the larger of the two. So it survives restarts and the
deletion of confirmed rows, with one row written per append.

Durability: WAL journal. With `sync="full"` (the default) every append is fsynced
before it returns: an alarm survives a power cut, and a seq that may already have been
sent is never handed out twice (the gateway would reject the second message as a
replay). Measured here 0.3-0.5 ms per append, nothing at 1 Hz. Bookkeeping (sent marks,
confirmations, drops) commits with synchronous=NORMAL: losing it only causes a resend.
`sync="normal"` survives a process crash but not a power cut: nothing is fsynced but
SQLite's WAL checkpoints (every ~1,000 pages written). `sync="off"` (for simulated
fleets, whose devices all share one operating system) never fsyncs: it too survives a
process crash, since the operating system holds what was written, but an operating
system crash may lose or corrupt the file; such an outbox is also locked for its process
alone and checkpoints every 64 WAL pages. 2,000 simulated outboxes at "normal" each
checkpoint every few minutes, and every checkpoint's fsyncs stall the event loop all of
a simulator's devices run on (docs/benchmarks.md, "Fleet scale").

Deferred bookkeeping (`bookkeeping_delay_s > 0`, what the agent uses): sent marks,
confirmations and releases are written at once but committed with the next append, or
by `flush()` (the link calls it at most `bookkeeping_delay_s` later), or at `close()`;
with `sync="normal"` the append and the bookkeeping before it are one commit. Nothing
an append commits is ever deferred, so the durability of messages and seqs is as above;
a crash can forget the last second of bookkeeping, which makes the device re-send
messages the gateway already has (it de-duplicates them) and nothing worse. With 0 every
call commits on its own.

What is due is known in memory where that is cheap: `due()` runs no query while no
row can be due (nothing appended, released or reset since it last found the unsent rows
exhausted, and no resend time reached). The earliest sent time and the earliest
telemetry creation time are cached as lower bounds (a receipt may delete the row that
held them): a stale bound only makes the sender look once too early, or the age bound
run its DELETE once, after which it is read again.

Lanes, in send priority: event (alarms), ack, status, telemetry; seq order within a
lane. A message is due when it was never sent, or sent more than `resend_after_s` x
2^(attempts - 1) ago (per-message backoff, capped at 16x: a gateway or a simulator
that is behind is not buried under re-sends of what it already has; a reconnect makes
every unconfirmed message due at once anyway)
without a receipt.

Overflow policy: when more than `max_rows` messages are held, or telemetry is older
than `max_age_s`, the OLDEST TELEMETRY is deleted, a warning logged with the count,
and the `dropped` counter raised (persisted in `meta`). Events, acks and status are
never dropped; if they alone exceed `max_rows` they are kept and a warning is logged.

Presence and the last will: before each connection the link calls `prepare_online`
then `prepare_will`. Both are signed and held (never due): the online status (retained)
is released by `release(seq)` once that connection is up; the offline will is carried
in CONNECT as the MQTT will and stays held while the connection is up. Allocating the
online status first gives the will the higher seq, so a gateway that orders presence by
seq sees "offline" after the "online" of the same connection. `release_will` (called
before preparing the next pair) turns every held row into an ordinary pending message:
the broker may already have published the will; the gateway de-duplicates by seq.

Not thread-safe: one owner (the agent's event loop) calls it; every call is a short
transaction.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from edge_agent.errors import BluelightError
from edge_agent.wire.envelope import MAX_ENVELOPE_BYTES, Message, Signer, seal
from edge_agent.wire.model import validate_body

log = logging.getLogger(__name__)

#: Outbox durability (see the module doc), strongest first.
SYNC_MODES = ("full", "normal", "off")
#: WAL pages between checkpoints with `sync="off"` (SQLite's default is 1,000).
SIMULATED_WAL_PAGES = 64
#: Send priority: lower goes first.
LANES: dict[str, int] = {"event": 0, "ack": 1, "status": 2, "telemetry": 3}
LANE_NAMES = {v: k for k, v in LANES.items()}
TELEMETRY = LANES["telemetry"]
#: Re-sends back off to at most `resend_after_s` x 2**this.
RESEND_BACKOFF_MAX = 4
#: Unsent rows `due` keeps in memory at most (more, e.g. while offline: read from the table).
UNSENT_CACHE = 256

WILL_BODY: dict[str, Any] = {"state": "offline", "reason": "connection lost"}
ONLINE_BODY: dict[str, Any] = {"state": "online"}
#: `held` column values: 0 pending, 1 the will, 2 an online status waiting for its connection.
_PENDING, _HELD_WILL, _HELD_ONLINE = 0, 1, 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    lane INTEGER NOT NULL,
    kind TEXT NOT NULL,
    data BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    sent_ms INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    held INTEGER NOT NULL DEFAULT 0,
    retain INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_lane_seq ON outbox (lane, seq);
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox (lane, seq) WHERE sent_ms IS NULL AND held = 0;
-- Every index is one more page written per commit; the earliest sent and created times
-- these served are kept in memory now (see `Outbox`).
DROP INDEX IF EXISTS outbox_lane_created;
DROP INDEX IF EXISTS outbox_sent;
"""


class OutboxError(BluelightError):
    """The outbox file cannot be used (e.g. it belongs to another identity)."""


@dataclass(frozen=True)
class Row:
    """A signed message waiting for its receipt."""

    seq: int
    kind: str
    data: bytes
    created_ms: int
    attempts: int
    #: Publish retained: only the newest retained status is, so a resend never
    #: replaces a newer retained presence with an older one.
    retain: bool


@dataclass(frozen=True)
class OutboxStats:
    """Counts for logs and health: `pending` is by lane (held presence rows excluded)."""

    pending: Mapping[str, int]
    held: int
    dropped: int
    sent: int
    confirmed: int
    next_seq: int

    @property
    def total(self) -> int:
        return sum(self.pending.values())


@dataclass(eq=False)
class Outbox:
    """SQLite-backed outbox for one sender. Use as a context manager or call `close()`."""

    path: Path | str
    signer: Signer
    max_rows: int = 100_000
    max_age_s: float = 86_400.0
    resend_after_s: float = 10.0
    sync: Literal["full", "normal", "off"] = "full"
    #: Commit bookkeeping with the next append or within this long (0: at once).
    bookkeeping_delay_s: float = 0.0
    #: Called after each append (the link sets it to wake its sender).
    on_append: Callable[[], None] | None = None
    #: Called when deferred bookkeeping starts waiting for a commit (the link schedules
    #: `flush()` `bookkeeping_delay_s` later).
    on_deferred: Callable[[], None] | None = None
    sent: int = field(default=0, init=False)
    confirmed: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {', '.join(SYNC_MODES)}")
        if self.bookkeeping_delay_s < 0:
            raise ValueError("bookkeeping_delay_s must be >= 0")
        #: A deferred bookkeeping transaction is open (not committed yet).
        self._deferred = False
        #: Every unsent row by seq, as `due` selects it, when known (`due` found fewer than
        #: it was asked for, and since then only appends, at most `UNSENT_CACHE` rows, and
        #: sends and confirmations that took rows out), else None: a fresh append is sent
        #: from memory, without reading back the row just written.
        self._unsent: dict[int, tuple[int, int, str, bytes, int, int, int]] | None = None
        self._resend_ms = int(self.resend_after_s * 1000)
        #: Cached earliest resend time of a sent, unconfirmed row (None: none), if known.
        self._next_resend: int | None = None
        self._resend_known = False
        path = Path(self.path)
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None)
        if self.sync == "off":
            # Simulated flash: a RAM disk thousands of outboxes share. Exclusive locking
            # (set before WAL mode) keeps the WAL index in the process's heap instead of
            # a shared-memory file per outbox, and a short WAL keeps each outbox's file
            # pages few and warm: 2,000 WALs of SQLite's default ~1,000 pages are 8 GB of
            # RAM disk, and appends to them cost twice as much.
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self._db.execute(f"PRAGMA wal_autocheckpoint={SIMULATED_WAL_PAGES}")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={self._relaxed}")
        self._db.executescript(_SCHEMA)
        with self._tx():
            owner = self._meta("sender")
            if owner is None:
                self._set_meta("sender", self.sender)
                self._set_meta("next_seq", 1)
                self._set_meta("dropped", 0)
                self._set_meta("last_retained", 0)
        if owner is not None and owner != self.sender:
            self._db.close()
            raise OutboxError(f"outbox {path} belongs to {owner!r}, not {self.sender!r}")
        top = self._db.execute("SELECT MAX(seq) FROM outbox").fetchone()[0]
        self._next_seq = max(int(self._meta("next_seq") or 1), int(top or 0) + 1)
        self._meta_next_seq = int(self._meta("next_seq") or 1)
        #: Lower bound of the creation time of the oldest telemetry row (None: none), if known.
        self._oldest_created: int | None = None
        self._created_known = False
        self._dropped = int(self._meta("dropped") or 0)
        self._last_retained = int(self._meta("last_retained") or 0)
        self._rows = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    # -- plumbing -------------------------------------------------------------
    @property
    def sender(self) -> str:
        return self.signer.kid

    @property
    def _relaxed(self) -> str:
        """SQLite's `synchronous` for everything not fsynced on its own."""
        return "OFF" if self.sync == "off" else "NORMAL"

    def _tx(self, *, durable: bool = False) -> _Transaction:
        """A transaction for an append: it also commits deferred bookkeeping (first, on its
        own, when the append is fsynced: SQLite cannot change `synchronous` inside one)."""
        durable = durable and self.sync == "full"
        joined = False
        if self._deferred:
            self._deferred = False
            if durable:
                self._db.execute("COMMIT")
            else:
                joined = True
        return _Transaction(self._db, durable=durable, begun=joined)

    def _bookkeeping(self) -> _Transaction | _Deferred:
        """A transaction for bookkeeping: committed now, or deferred (see the module doc)."""
        if self.bookkeeping_delay_s <= 0:
            return _Transaction(self._db, durable=False)
        if not self._deferred:
            self._db.execute("BEGIN IMMEDIATE")
            self._deferred = True
            if self.on_deferred is not None:
                self.on_deferred()
        return _DEFERRED

    def flush(self) -> None:
        """Commit deferred bookkeeping now (a no-op if there is none)."""
        if self._deferred:
            self._deferred = False
            self._db.execute("COMMIT")

    def _meta(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _set_meta(self, key: str, value: Any) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    # -- writing --------------------------------------------------------------
    def append(self, kind: str, body: Mapping[str, Any], now_ms: int, *, retain: bool = False) -> int:
        """Validate, sign and commit one message; return its seq. Raises `Malformed`
        (from the data model) or `ValueError` for a message that can never be sent."""
        return self._append(kind, body, now_ms, retain=retain, held=_PENDING)

    def _append(self, kind: str, body: Mapping[str, Any], now_ms: int, *, retain: bool, held: int) -> int:
        lane = LANES.get(kind)
        if lane is None:
            raise ValueError(f"the agent does not send {kind!r} messages")
        validate_body(kind, body)
        seq = self._next_seq
        data = seal(Message(self.sender, seq, now_ms, kind, body), self.signer)
        if len(data) > MAX_ENVELOPE_BYTES:
            raise ValueError(f"{kind} message of {len(data)} bytes exceeds {MAX_ENVELOPE_BYTES}")
        try:
            with self._tx(durable=True):
                self._db.execute(
                    "INSERT INTO outbox (seq, lane, kind, data, created_ms, held, retain) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (seq, lane, kind, data, now_ms, held, int(retain)),
                )
                if retain:
                    self._set_meta("last_retained", seq)
                dropped = self._enforce_bounds(now_ms)
        except sqlite3.Error:
            self._resync()  # a rollback may have taken deferred bookkeeping with it
            raise
        self._next_seq = seq + 1
        self._rows += 1 - dropped
        if held == _PENDING:
            unsent = self._unsent
            if unsent is None or dropped or len(unsent) >= UNSENT_CACHE:
                self._unsent = None
            else:
                unsent[seq] = (seq, lane, kind, data, now_ms, 0, int(retain))
        oldest = self._oldest_created
        if lane == TELEMETRY and held == _PENDING and self._created_known and (oldest is None or now_ms < oldest):
            self._oldest_created = now_ms
        if retain:
            self._last_retained = seq
        if dropped:
            self._dropped += dropped
            log.warning(
                "outbox full (max %d rows, max age %.0f s): dropped the %d oldest telemetry messages (%d in total)",
                self.max_rows,
                self.max_age_s,
                dropped,
                self._dropped,
            )
        if self.on_append is not None:
            self.on_append()
        return seq

    def _save_next_seq(self, next_seq: int) -> None:
        """Before deleting rows (in the same transaction): the seqs they held stay used."""
        if self._meta_next_seq != next_seq:
            self._set_meta("next_seq", next_seq)
            self._meta_next_seq = next_seq

    def _resync(self) -> None:
        """Forget what memory knows about the table after a failed transaction."""
        self._rows = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        self._meta_next_seq = int(self._meta("next_seq") or 1)
        self._unsent = None
        self._resend_known = self._created_known = False

    def _enforce_bounds(self, now_ms: int) -> int:
        """Inside the append transaction: drop the oldest telemetry past the bounds."""
        cutoff = now_ms - int(self.max_age_s * 1000)
        if not self._created_known:
            row = self._db.execute(
                "SELECT MIN(created_ms) FROM outbox INDEXED BY outbox_lane_seq WHERE lane = ? AND held = 0",
                (TELEMETRY,),
            ).fetchone()
            self._oldest_created, self._created_known = (None if row[0] is None else int(row[0])), True
        dropped = 0
        if self._oldest_created is not None and self._oldest_created < cutoff:
            self._save_next_seq(self._next_seq + 1)  # the row being appended may go too
            dropped = self._db.execute(
                "DELETE FROM outbox WHERE lane = ? AND created_ms < ? AND held = 0", (TELEMETRY, cutoff)
            ).rowcount
            self._created_known = False
        over = self._rows + 1 - dropped - self.max_rows
        if over > 0:
            self._save_next_seq(self._next_seq + 1)
            dropped += self._db.execute(
                "DELETE FROM outbox WHERE seq IN "
                "(SELECT seq FROM outbox WHERE lane = ? AND held = 0 ORDER BY seq LIMIT ?)",
                (TELEMETRY, over),
            ).rowcount
            self._created_known = False
            if self._rows + 1 - dropped > self.max_rows:
                log.warning(
                    "outbox holds %d messages (max %d) and no telemetry is left to drop; alarms are kept",
                    self._rows + 1 - dropped,
                    self.max_rows,
                )
        if dropped:
            self._set_meta("dropped", self._dropped + dropped)
            self._resend_known = False
        return dropped

    # -- sending --------------------------------------------------------------
    def due(self, now_ms: int, limit: int) -> list[Row]:
        """Up to `limit` messages to (re)send now, alarms first, seq order per lane."""
        if limit <= 0:
            return []
        resend_at = self.next_resend_ms()
        resend = resend_at is not None and resend_at <= now_ms
        unsent = self._unsent
        if unsent is not None and not unsent and not resend:
            return []
        found: list[Any]
        if unsent is not None:
            found = sorted(unsent.values(), key=_lane_seq)[:limit]
        else:
            found = self._db.execute(
                "SELECT seq, lane, kind, data, created_ms, attempts, retain FROM outbox INDEXED BY outbox_unsent "
                "WHERE sent_ms IS NULL AND held = 0 ORDER BY lane, seq LIMIT ?",
                (limit,),
            ).fetchall()
            # Fewer than asked for: that was every unsent row (until something changes).
            self._unsent = {r[0]: tuple(r) for r in found} if len(found) < limit else None
        if resend:
            # Sent rows go out roughly in seq order, so due resends sit near the front
            # of this index scan, which stops after `limit` matches.
            found += self._db.execute(
                "SELECT seq, lane, kind, data, created_ms, attempts, retain FROM outbox INDEXED BY outbox_lane_seq "
                "WHERE sent_ms <= ? AND held = 0 AND sent_ms + ? * (1 << min(attempts - 1, ?)) <= ? "
                "ORDER BY lane, seq LIMIT ?",
                (now_ms - self._resend_ms, self._resend_ms, RESEND_BACKOFF_MAX, now_ms, limit),
            ).fetchall()
            found.sort(key=lambda r: (r[1], r[0]))
            self._resend_known = False
        return [
            Row(seq, kind, data, created, attempts, bool(retain) and seq == self._last_retained)
            for seq, _lane, kind, data, created, attempts, retain in found[:limit]
        ]

    def mark_sent(self, seqs: Iterable[int], now_ms: int) -> None:
        """Record that these messages went out (a PUBACK is not a receipt)."""
        batch = [(now_ms, s) for s in seqs]
        if not batch:
            return
        with self._bookkeeping():
            self._db.executemany("UPDATE outbox SET sent_ms = ?, attempts = attempts + 1 WHERE seq = ?", batch)
        self.sent += len(batch)
        if self._unsent:
            for _, seq in batch:
                self._unsent.pop(seq, None)
        # (`due` forgot the cached time when it handed out re-sends: their older sent_ms
        # may have been the earliest.)
        # A lower bound: re-sent rows back off further than this.
        at = now_ms + self._resend_ms
        if self._resend_known and (self._next_resend is None or at < self._next_resend):
            self._next_resend = at

    def reset_sent(self) -> int:
        """Make every unconfirmed message due now (after a reconnect)."""
        with self._bookkeeping():
            n = self._db.execute("UPDATE outbox SET sent_ms = NULL WHERE sent_ms IS NOT NULL").rowcount
        self._unsent = None
        self._next_resend, self._resend_known = None, True
        return n

    def next_resend_ms(self) -> int | None:
        """When the earliest sent-but-unconfirmed message becomes due again."""
        if not self._resend_known:
            row = self._db.execute(
                "SELECT MIN(sent_ms + ? * (1 << min(attempts - 1, ?))) FROM outbox WHERE sent_ms IS NOT NULL",
                (self._resend_ms, RESEND_BACKOFF_MAX),
            ).fetchone()
            self._next_resend = None if row[0] is None else int(row[0])
            self._resend_known = True
        return self._next_resend

    def confirm(self, ranges: Iterable[tuple[int, int]]) -> int:
        """Delete exactly the seqs a verified receipt lists; return how many were held."""
        ranges = list(ranges)
        deleted = 0
        with self._bookkeeping():
            self._save_next_seq(self._next_seq)
            for lo, hi in ranges:
                deleted += self._db.execute("DELETE FROM outbox WHERE seq BETWEEN ? AND ?", (lo, hi)).rowcount
        if deleted:
            # The cached earliest times stay lower bounds; an empty outbox has none.
            if self._rows - deleted == 0:
                self._next_resend, self._resend_known = None, True
                self._oldest_created, self._created_known = None, True
            if self._unsent:
                self._unsent = {
                    s: r for s, r in self._unsent.items() if not any(lo <= s <= hi for lo, hi in ranges)
                }
        self._rows -= deleted
        self.confirmed += deleted
        return deleted

    # -- presence and the last will ---------------------------------------------
    def prepare_online(self, now_ms: int) -> int:
        """Append the retained online status for the next connection, held until
        `release(seq)`; call it before `prepare_will` so the will has the higher seq."""
        return self._append("status", ONLINE_BODY, now_ms, retain=True, held=_HELD_ONLINE)

    def prepare_will(self, now_ms: int) -> tuple[int, bytes]:
        """Append the signed offline status the next connection carries as its will; it
        is held (not due) until `release_will`."""
        seq = self._append("status", WILL_BODY, now_ms, retain=False, held=_HELD_WILL)
        row = self._db.execute("SELECT data FROM outbox WHERE seq = ?", (seq,)).fetchone()
        return seq, bytes(row[0])

    def held_will(self) -> tuple[int, bytes] | None:
        """The newest held will, if any."""
        row = self._db.execute(
            "SELECT seq, data FROM outbox WHERE held = ? ORDER BY seq DESC LIMIT 1", (_HELD_WILL,)
        ).fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def release(self, seq: int) -> bool:
        """Make one held row (the online status of a connection now up) pending."""
        with self._bookkeeping():
            released = self._db.execute("UPDATE outbox SET held = 0 WHERE seq = ? AND held != 0", (seq,)).rowcount
        self._unsent = None
        return released == 1

    def release_will(self) -> list[int]:
        """Make every held row (wills, and online statuses whose connection never came
        up) an ordinary pending message; return their seqs."""
        with self._bookkeeping():
            seqs = [r[0] for r in self._db.execute("SELECT seq FROM outbox WHERE held != 0 ORDER BY seq")]
            self._db.execute("UPDATE outbox SET held = 0, sent_ms = NULL WHERE held != 0")
        self._unsent = None
        self._resend_known = False
        return seqs

    # -- looking --------------------------------------------------------------
    def seqs(self, *, kind: str | None = None) -> list[int]:
        """Every seq still held (for tests and diagnostics)."""
        if kind is None:
            return [r[0] for r in self._db.execute("SELECT seq FROM outbox ORDER BY seq")]
        return [r[0] for r in self._db.execute("SELECT seq FROM outbox WHERE kind = ? ORDER BY seq", (kind,))]

    def message(self, seq: int) -> tuple[str, bytes] | None:
        """The kind and signed bytes of a held message, as committed (None: not held)."""
        row = self._db.execute("SELECT kind, data FROM outbox WHERE seq = ?", (seq,)).fetchone()
        return None if row is None else (str(row[0]), bytes(row[1]))

    def stats(self) -> OutboxStats:
        pending = dict.fromkeys(LANES, 0)
        held = 0
        for lane, is_held, count in self._db.execute(
            "SELECT lane, held, COUNT(*) FROM outbox GROUP BY lane, held"
        ).fetchall():
            if is_held:
                held += count
            else:
                pending[LANE_NAMES[lane]] = count
        return OutboxStats(pending, held, self._dropped, self.sent, self.confirmed, self._next_seq)

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def next_seq(self) -> int:
        return self._next_seq


def _lane_seq(row: tuple[Any, ...]) -> tuple[int, int]:
    return row[1], row[0]


class _Deferred:
    """Bookkeeping inside the open deferred transaction: committed later, by `flush()` or
    with the next append. An error leaves what was written uncommitted with the rest."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


_DEFERRED = _Deferred()


class _Transaction:
    """`BEGIN IMMEDIATE` ... `COMMIT` (or `ROLLBACK` on error); `durable` commits with
    synchronous=FULL; `begun` joins a transaction already open (deferred bookkeeping)."""

    def __init__(self, db: sqlite3.Connection, *, durable: bool, begun: bool = False) -> None:
        self._db = db
        self._durable = durable
        self._begun = begun

    def __enter__(self) -> None:
        if self._begun:
            return
        if self._durable:
            self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
        finally:
            if self._durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
