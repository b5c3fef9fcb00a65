"""The gateway's store: SQLite via sqlite-utils, WAL, `synchronous=NORMAL`.

Tables::

    messages  (device_id, seq) PRIMARY KEY, kind, ts (device UTC ms), recv_ts (gateway
              UTC ms), stored_ts (UTC ms the batch was written), skewed, body (JSON text),
              raw (the signed envelope, re-verifiable)
    devices   id, role, first_seen, last_seen, last_seq, stored, state, online,
              status_seq (the status message `state`/`online` come from), clock_skew_ms
    counters  name -> count: `accepted`, every rejection reason, `late`, `gaps`, `skewed`
    meta      key -> value: the gateway's own message sequence numbers (receipts)
    audit, audit_head   the tamper-evident audit log (see certs.auditlog); never pruned

Retention: `prune` deletes messages past their kind's retention (`Retention`, by
`recv_ts`, indexed), a chunk of rows per transaction; `devices.pruned_upto` remembers the highest pruned sequence
number of each device, and `missing` only counts above it (below it, a gap can no
longer be told from a pruned row).

One writer: `write_batch` commits a whole batch in one transaction and must only be
called from one thread at a time (the ingest shell runs it on a dedicated thread).
Readers open their own connection (`Store.open(path, readonly=True)`); WAL lets them
read while the writer writes.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import sqlite_utils

from certs.auditlog import AuditLog, create_tables
from edge_agent.errors import BluelightError
from edge_agent.wire.errors import REASONS, Replayed
from gateway.core import Accepted

#: `missing` lists are cut to this many sequence numbers; `missing_count` is exact.
MISSING_LIMIT = 1000
BUSY_TIMEOUT_MS = 10_000

_INSERT = (
    "INSERT OR IGNORE INTO messages (device_id, seq, kind, ts, recv_ts, stored_ts, skewed, body, raw) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPSERT_DEVICE = """
INSERT INTO devices (id, role, first_seen, last_seen, last_seq, stored, skewed, clock_skew_ms)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(id) DO UPDATE SET
    role = coalesce(excluded.role, devices.role),
    last_seen = max(coalesce(devices.last_seen, 0), excluded.last_seen),
    last_seq = max(coalesce(devices.last_seq, 0), excluded.last_seq),
    stored = devices.stored + excluded.stored,
    skewed = devices.skewed + excluded.skewed,
    clock_skew_ms = coalesce(excluded.clock_skew_ms, devices.clock_skew_ms)
"""
_UPDATE_STATUS = (
    "UPDATE devices SET state = ?, online = ?, status_seq = ? WHERE id = ? AND coalesce(status_seq, 0) < ?"
)
_COUNT = (
    "INSERT INTO counters (name, count) VALUES (?, ?) "
    "ON CONFLICT(name) DO UPDATE SET count = count + excluded.count"
)
# Gaps above `floor` (the device's `pruned_upto`): what was pruned is not missing.
_MISSING_RANGES = """
SELECT prev + 1 AS lo, seq - 1 AS hi FROM (
    SELECT seq, LAG(seq, 1, :floor) OVER (ORDER BY seq) AS prev FROM messages
    WHERE device_id = :device_id AND seq > :floor
) WHERE seq > prev + 1 ORDER BY lo
"""
#: Rows `prune` looks at per transaction, so it never holds the write lock for long.
PRUNE_CHUNK = 2000
DAY_MS = 86_400_000
# Keyset pagination over the recv_ts index: rows received before the horizon, oldest first.
_PRUNE_SCAN = """
SELECT rowid, device_id, seq, kind, recv_ts FROM messages
WHERE recv_ts < :horizon AND (recv_ts, rowid) > (:ts, :rowid) ORDER BY recv_ts, rowid LIMIT :n
"""
_PRUNED_UPTO = "UPDATE devices SET pruned_upto = max(coalesce(pruned_upto, 0), ?) WHERE id = ?"


class StoreError(BluelightError):
    """The database cannot be opened or used."""


@dataclass(frozen=True)
class Retention:
    """How long stored messages are kept, by the gateway's receive time: raw telemetry
    for `telemetry_days`, every other kind (events, status, acks) for `other_days`.
    The pure "what to delete" rule; `Store.prune` applies it. Audit entries are never
    pruned."""

    telemetry_days: int
    other_days: int

    def __post_init__(self) -> None:
        for name in ("telemetry_days", "other_days"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer > 0, got {value!r}")

    def cutoff(self, kind: str, now_ms: int) -> int:
        """Messages of `kind` received before this UTC ms are due for deletion."""
        days = self.telemetry_days if kind == "telemetry" else self.other_days
        return now_ms - days * DAY_MS

    def expired(self, kind: str, recv_ts: int, now_ms: int) -> bool:
        return recv_ts < self.cutoff(kind, now_ms)

    def horizon(self, now_ms: int) -> int:
        """Nothing received at or after this is due, whatever its kind."""
        return now_ms - min(self.telemetry_days, self.other_days) * DAY_MS


@dataclass
class BatchResult:
    """What one committed batch did. `receipts` maps each device to the sequence numbers
    now known to be stored (new, duplicates, and replays of stored ones)."""

    inserted: int = 0
    duplicates: int = 0
    receipts: dict[str, list[int]] = field(default_factory=dict)


class Store:
    """The gateway's database. Use `Store.open(path)`; close it when done."""

    def __init__(self, db: sqlite_utils.Database, path: Path, *, readonly: bool) -> None:
        self.db = db
        self.path = path
        self.readonly = readonly

    @classmethod
    def open(cls, path: Path, *, readonly: bool = False) -> Store:
        """Open (and for the writer, create) the database. The connection may be moved to
        another thread, but must be used by one thread at a time."""
        path = Path(path)
        try:
            if readonly:
                conn = sqlite3.connect(
                    f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None
                )
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db = sqlite_utils.Database(conn, execute_plugins=False)
            store = cls(db, path, readonly=readonly)
            if not readonly:
                store._create()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the gateway database {path}: {exc}") from None
        return store

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        db = self.db
        db.enable_wal()
        db.execute("PRAGMA synchronous = NORMAL")
        db.create_table(
            "messages",
            {
                "device_id": str, "seq": int, "kind": str, "ts": int, "recv_ts": int, "stored_ts": int,
                "skewed": int, "body": str, "raw": bytes,
            },
            pk=("device_id", "seq"),
            not_null=["device_id", "seq", "kind", "ts", "recv_ts", "stored_ts", "skewed", "body", "raw"],
            if_not_exists=True,
        )
        db.create_table(
            "devices",
            {
                "id": str, "role": str, "first_seen": int, "last_seen": int, "last_seq": int,
                "stored": int, "skewed": int, "state": str, "online": int, "status_seq": int,
                "clock_skew_ms": int, "pruned_upto": int,
            },
            pk="id",
            not_null=["id", "last_seq", "stored", "skewed", "pruned_upto"],
            defaults={"last_seq": 0, "stored": 0, "skewed": 0, "pruned_upto": 0},
            if_not_exists=True,
        )
        devices = db.table("devices")
        if "pruned_upto" not in devices.columns_dict:  # a database from before retention
            devices.add_column("pruned_upto", int, not_null_default=0)
        db.create_table("counters", {"name": str, "count": int}, pk="name", not_null=["count"], if_not_exists=True)
        db.create_table("meta", {"key": str, "value": int}, pk="key", not_null=["value"], if_not_exists=True)
        # For `prune` (recv_ts rises with arrival, so the index grows at its right edge).
        db.execute("CREATE INDEX IF NOT EXISTS messages_recv_ts ON messages (recv_ts)")
        create_tables(db.conn)

    # -- writing (one writer) -------------------------------------------------
    def write_batch(
        self,
        records: Sequence[Accepted],
        *,
        rejected: Mapping[str, int] | None = None,
        replayed: Iterable[tuple[str, int]] = (),
        roles: Mapping[str, str] | None = None,
        skew: Mapping[str, int | None] | None = None,
        counters: Mapping[str, int] | None = None,
    ) -> BatchResult:
        """Store a batch in one transaction. Rows whose (device_id, seq) is already stored
        are counted `replayed`. `rejected` adds rejection counts decided before the store,
        `replayed` lists verified (device, seq) pairs the replay window refused (they are
        receipted too), `counters` adds other counts."""
        roles = roles or {}
        skew = skew or {}
        result = BatchResult()
        receipts: dict[str, set[int]] = {}
        devices: dict[str, list[int]] = {}  # id -> [last_seen, last_seq, stored, skewed]
        statuses: dict[str, tuple[int, str]] = {}
        conn = self.db.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            stored_ms = time.time_ns() // 1_000_000
            cur = conn.cursor()
            for r in records:
                cur.execute(
                    _INSERT,
                    (r.device_id, r.seq, r.kind, r.ts, r.recv_ms, stored_ms, int(r.skewed), r.body_json, r.raw),
                )
                new = cur.rowcount == 1
                dev = devices.get(r.device_id)
                if dev is None:
                    dev = devices[r.device_id] = [0, 0, 0, 0]
                dev[0] = max(dev[0], r.recv_ms)
                dev[1] = max(dev[1], r.seq)
                receipts.setdefault(r.device_id, set()).add(r.seq)
                if not new:
                    result.duplicates += 1
                    continue
                result.inserted += 1
                dev[2] += 1
                dev[3] += r.skewed
                if r.kind == "status":
                    state = r.body.get("state")
                    if isinstance(state, str) and r.seq > statuses.get(r.device_id, (0, ""))[0]:
                        statuses[r.device_id] = (r.seq, state)
            cur.executemany(
                _UPSERT_DEVICE,
                [
                    (device_id, roles.get(device_id), seen, seen, last_seq, stored, skewed, skew.get(device_id))
                    for device_id, (seen, last_seq, stored, skewed) in devices.items()
                ],
            )
            for device_id, (seq, state) in statuses.items():
                cur.execute(_UPDATE_STATUS, (state, int(state != "offline"), seq, device_id, seq))
            for device_id, seq in replayed:
                receipts.setdefault(device_id, set()).add(seq)
            counts = dict(counters or {})
            for reason, n in (rejected or {}).items():
                counts[reason] = counts.get(reason, 0) + n
            counts["accepted"] = counts.get("accepted", 0) + result.inserted
            counts[Replayed.reason] = counts.get(Replayed.reason, 0) + result.duplicates
            counts["skewed"] = counts.get("skewed", 0) + sum(dev[3] for dev in devices.values())
            cur.executemany(_COUNT, [(name, n) for name, n in counts.items() if n])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        result.receipts = {device_id: sorted(seqs) for device_id, seqs in receipts.items()}
        return result

    @staticmethod
    def _reserve_seqs(cur: sqlite3.Cursor, gateway_id: str, n: int) -> int:
        key = f"seq:{gateway_id}"
        cur.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, 0)", (key,))
        cur.execute("UPDATE meta SET value = value + ? WHERE key = ? RETURNING value", (n, key))
        (last,) = cur.fetchone()
        return int(last) - n + 1

    def reserve_seqs(self, gateway_id: str, n: int = 1) -> int:
        """Reserve `n` of the gateway's own sequence numbers (they survive restarts);
        returns the first."""
        conn = self.db.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            first = self._reserve_seqs(conn.cursor(), gateway_id, n)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return first

    def prune(
        self,
        now_ms: int,
        retention: Retention,
        *,
        audit: AuditLog | None = None,
        chunk: int = PRUNE_CHUNK,
    ) -> int:
        """Delete messages past `retention` at `now_ms` (UTC ms); returns how many.

        Rows received before the retention horizon are visited oldest first (the
        `recv_ts` index), `chunk` at a time, one short transaction each, so ingest waits
        at most one chunk; rows of kinds kept longer are stepped over. Each device's
        `pruned_upto` moves up in the same transaction. With `audit`, the run is then
        recorded as one `retention.pruned` entry (also when nothing was due). Call it
        from the writer thread (or its own connection: it only needs the busy timeout)."""
        if chunk < 1:
            raise ValueError("chunk must be >= 1")
        conn = self.db.conn
        deleted: dict[str, int] = {}
        horizon = retention.horizon(now_ms)
        after = (-(2**63), 0)  # (recv_ts, rowid) of the last row looked at
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                params = {"horizon": horizon, "ts": after[0], "rowid": after[1], "n": chunk}
                rows = conn.execute(_PRUNE_SCAN, params).fetchall()
                doomed = [row for row in rows if retention.expired(row[3], row[4], now_ms)]
                conn.executemany("DELETE FROM messages WHERE rowid = ?", [(row[0],) for row in doomed])
                upto: dict[str, int] = {}
                for _, device_id, seq, kind, _ in doomed:
                    upto[device_id] = max(upto.get(device_id, 0), seq)
                    deleted[kind] = deleted.get(kind, 0) + 1
                conn.executemany(_PRUNED_UPTO, [(seq, device_id) for device_id, seq in upto.items()])
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            if len(rows) < chunk:
                break
            after = (rows[-1][4], rows[-1][0])
        total = sum(deleted.values())
        if audit is not None:
            audit.append(
                "retention.pruned",
                audit.kid,
                "messages",
                {
                    "deleted": total,
                    "by_kind": dict(sorted(deleted.items())),
                    "telemetry_days": retention.telemetry_days,
                    "other_days": retention.other_days,
                    "telemetry_before": retention.cutoff("telemetry", now_ms),
                    "other_before": retention.cutoff("event", now_ms),
                },
                ts=now_ms,
            )
        return total

    # -- reading --------------------------------------------------------------
    def last_seqs(self) -> dict[str, int]:
        """Highest stored sequence number per device (to seed the replay windows)."""
        return {row["id"]: row["last_seq"] for row in self.db.query("SELECT id, last_seq FROM devices")}

    def counters(self) -> dict[str, int]:
        return {row["name"]: row["count"] for row in self.db.query("SELECT name, count FROM counters")}

    def stats(self) -> dict[str, Any]:
        """`accepted` and `rejected` (every reason, zero if none), plus other counters."""
        counts = self.counters()
        sql = "SELECT count(*) AS devices, coalesce(sum(stored), 0) AS stored FROM devices"
        totals = next(iter(self.db.query(sql)))
        return {
            "accepted": counts.get("accepted", 0),
            "rejected": {reason: counts.get(reason, 0) for reason in REASONS},
            "late": counts.get("late", 0),
            "gaps": counts.get("gaps", 0),
            "skewed": counts.get("skewed", 0),
            "devices": totals["devices"],
            "stored": totals["stored"],
        }

    def missing(
        self, device_id: str, limit: int = MISSING_LIMIT, *, floor: int | None = None
    ) -> tuple[list[int], int]:
        """Sequence numbers in (pruned_upto, last_seq] never stored for `device_id`: the
        first `limit` of them, and how many there are in all. Below the device's highest
        pruned sequence number (`floor`, read from `devices` if not given) nothing is
        reported: retention deleted rows there, and a gap cannot be told from them."""
        if floor is None:
            rows = list(self.db.query("SELECT pruned_upto FROM devices WHERE id = ?", [device_id]))
            floor = (rows[0]["pruned_upto"] or 0) if rows else 0
        seqs: list[int] = []
        count = 0
        for row in self.db.query(_MISSING_RANGES, {"device_id": device_id, "floor": floor}):
            lo, hi = row["lo"], row["hi"]
            count += hi - lo + 1
            if len(seqs) < limit:
                seqs.extend(range(lo, min(hi, lo + limit - len(seqs) - 1) + 1))
        return seqs, count

    def devices(self, *, missing_limit: int = MISSING_LIMIT) -> list[dict[str, Any]]:
        """Every device with its presence, sequence numbers and what is missing."""
        return [self._device(row, missing_limit) for row in self.db.query("SELECT * FROM devices ORDER BY id")]

    def device(self, device_id: str, *, missing_limit: int = MISSING_LIMIT) -> dict[str, Any] | None:
        rows = list(self.db.query("SELECT * FROM devices WHERE id = ?", [device_id]))
        return self._device(rows[0], missing_limit) if rows else None

    def _device(self, row: Mapping[str, Any], missing_limit: int) -> dict[str, Any]:
        last_seq, stored = row["last_seq"], row["stored"]
        floor = row.get("pruned_upto") or 0  # absent in a database from before retention
        missing, missing_count = (
            ([], 0) if stored >= last_seq else self.missing(row["id"], missing_limit, floor=floor)
        )
        return {
            "id": row["id"],
            "role": row["role"],
            "online": None if row["online"] is None else bool(row["online"]),
            "state": row["state"],
            "last_seen": row["last_seen"],
            "first_seen": row["first_seen"],
            "last_seq": last_seq,
            "stored": stored,
            "missing": missing,
            "missing_count": missing_count,
            "clock_skew_ms": row["clock_skew_ms"],
            "skewed": row["skewed"],
        }

    def messages(self, device_id: str, *, after_seq: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        """Stored messages of one device in sequence order, bodies decoded."""
        rows = self.db.query(
            "SELECT device_id, seq, kind, ts, recv_ts, skewed, body FROM messages "
            "WHERE device_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            [device_id, after_seq, limit],
        )
        return [{**row, "skewed": bool(row["skewed"]), "body": orjson.loads(row["body"])} for row in rows]

    def restart_feed(self, *, fixes_since_ms: int, after_recv_ms: int | None,
                     limit: int = 50_000) -> list[dict[str, Any]]:
        """What a restarted gateway's picture reads back, oldest first (by `recv_ts`): each
        device's latest status (the one `devices.status_seq` names), its latest telemetry
        received at or after `fixes_since_ms`, and events and acks received after
        `after_recv_ms` (None: none), at most `limit` of those. Rows: device_id, seq,
        kind, ts, recv_ts, body (JSON text). Index range scans only."""
        conn = self.db.conn
        rows = conn.execute(
            "SELECT m.device_id, m.seq, m.kind, m.ts, m.recv_ts, m.body FROM devices d "
            "JOIN messages m ON m.device_id = d.id AND m.seq = d.status_seq WHERE d.status_seq IS NOT NULL"
        ).fetchall()
        # SQLite takes the bare columns from the row holding the max()
        rows += [r[:6] for r in conn.execute(
            "SELECT device_id, seq, kind, ts, recv_ts, body, max(recv_ts) FROM messages "
            "WHERE recv_ts >= ? AND kind = 'telemetry' GROUP BY device_id", (fixes_since_ms,)
        )]
        if after_recv_ms is not None:
            rows += conn.execute(
                "SELECT device_id, seq, kind, ts, recv_ts, body FROM messages "
                "WHERE recv_ts > ? AND kind IN ('event', 'ack') ORDER BY recv_ts, device_id, seq LIMIT ?",
                (after_recv_ms, limit),
            ).fetchall()
        keys = ("device_id", "seq", "kind", "ts", "recv_ts", "body")
        return [dict(zip(keys, r, strict=True)) for r in sorted(rows, key=lambda r: (r[4], r[0], r[1]))]

    def raw(self, device_id: str, seq: int) -> bytes | None:
        """The signed envelope as received, for re-verification and audit."""
        rows = list(self.db.query("SELECT raw FROM messages WHERE device_id = ? AND seq = ?", [device_id, seq]))
        return bytes(rows[0]["raw"]) if rows else None
