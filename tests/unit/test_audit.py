"""The tamper-evident audit log (`certs.auditchain`, `certs.auditlog`), `bluelight
audit`, and retention (`Store.prune`). Each test builds its own PKI and database under
tmp_path; tampering is done the way an intruder would, with raw SQL on the file."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import orjson
import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bluelight.cli import cli
from certs.auditchain import (
    GENESIS,
    GENESIS_HEAD,
    SIGNATURE_CONTEXT,
    AuditEntry,
    AuditError,
    Head,
    canonical_bytes,
    data_json,
    entry_line,
    iso_ms,
    next_entry,
    verify_chain,
    verify_signature,
)
from certs.auditlog import (
    AuditLog,
    AuditRecord,
    decode_row,
    read_entries,
    recorded_head,
    verify_db,
)
from certs.pki import Pki, new_key
from certs.registry import audit_keys
from certs.signing import load_signer
from edge_agent.config import load_section
from edge_agent.errors import ConfigError
from edge_agent.wire.envelope import ALG_EDDSA, KeySigner
from edge_agent.wire.errors import UnknownSender
from edge_agent.wire.ids import Role
from gateway.core import Accepted
from gateway.settings import GatewaySettings, load_settings
from gateway.store import DAY_MS, Retention, Store

T0 = 1_772_366_400_000  # 2026-03-01T12:00:00Z
ACTIONS = ("alert.sent", "alert.delivered", "ack.accepted", "alert.escalated", "incident.created")


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    p = Pki(tmp_path / "pki")
    p.init()
    return p


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "gateway.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    with Store.open(db_path) as s:
        yield s


@pytest.fixture
def log(store: Store, pki: Pki) -> AuditLog:
    return AuditLog(store.db.conn, load_signer(pki, "gateway"))


def _data(i: int) -> dict[str, Any]:
    return {
        "alert_id": f"alert-{i}", "unit": "van-17", "lat": 51.5 + i / 1000, "lon": -0.12, "eta_s": 90 + i,
        "reasons": ["nearest available", "armed"], "nested": {"ok": True, "none": None, "text": "Ünïcode ✓"},
    }


def _fill(log: AuditLog, n: int) -> list[AuditEntry]:
    return [
        log.append(ACTIONS[i % len(ACTIONS)], "gateway", f"alert-{i}", _data(i), ts=T0 + i * 1000)
        for i in range(1, n + 1)
    ]


def _tamper(path: Path, sql: str, params: tuple[Any, ...] = ()) -> None:
    """What someone with write access to the file can do: drop the triggers, edit."""
    conn = sqlite3.connect(path, isolation_level=None)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    conn.execute(sql, params)
    conn.close()


def _flip_column(path: Path, seq: int, column: str) -> None:
    """Change one byte of one stored field of entry `seq`, keeping its SQL type."""
    conn = sqlite3.connect(path)
    (value,) = conn.execute(f"SELECT {column} FROM audit WHERE seq = ?", (seq,)).fetchone()
    conn.close()
    if isinstance(value, int):
        new: Any = value ^ 0x01
    elif isinstance(value, bytes):
        new = bytes([value[0] ^ 0x01]) + value[1:]
    else:
        at = len(value) // 2
        new = value[:at] + chr(ord(value[at]) ^ 0x01) + value[at + 1 :]
    assert new != value
    _tamper(path, f"UPDATE audit SET {column} = ? WHERE seq = ?", (new, seq))


# -- append, read back, verify ------------------------------------------------------------


def test_appended_entries_verify(log: AuditLog, pki: Pki, db_path: Path) -> None:
    appended = _fill(log, 12)
    assert [e.seq for e in appended] == list(range(1, 13))
    report = verify_db(db_path, audit_keys(pki))
    assert report.ok, report.broken
    assert report.count == 12
    assert report.head == appended[-1].head == log.head() == recorded_head(log.conn)
    assert log.entries() == appended  # read back equal, data included
    assert log.entries(after_seq=10) == appended[10:]


def test_the_format_is_the_documented_one(log: AuditLog, pki: Pki) -> None:
    """What an independent verifier does: deterministic CBOR, SHA-256 chain, signature
    over context || hash with the gateway certificate's key."""
    first, second = _fill(log, 2)
    record = {
        "seq": 1, "ts": T0 + 1000, "action": "alert.delivered", "actor": "gateway", "subject": "alert-1",
        "data": _data(1), "kid": "gateway", "alg": first.alg,
    }
    canonical = cbor2.dumps(record, canonical=True)
    assert first.canonical() == canonical
    assert canonical.startswith(bytes([0xA8, 0x62]) + b"ts")  # map(8), shortest key first
    assert first.hash == hashlib.sha256(GENESIS + canonical).digest()
    assert second.hash == hashlib.sha256(first.hash + second.canonical()).digest()
    key = audit_keys(pki)("gateway")
    assert verify_signature(key, first.alg, first.signature, first.hash)
    assert not verify_signature(key, first.alg, first.signature, second.hash)
    assert SIGNATURE_CONTEXT == b"bluelight audit v1\x00"


def test_canonical_bytes_ignore_key_order_and_float_width() -> None:
    a = canonical_bytes(
        seq=1, ts=0, action="a.b", actor="x", subject="y", data={"b": 1.5, "a": [1, 2.0]}, kid="g", alg=-7
    )
    b = canonical_bytes(
        seq=1, ts=0, action="a.b", actor="x", subject="y", data={"a": [1, 2.0], "b": 1.5}, kid="g", alg=-7
    )
    assert a == b
    assert bytes.fromhex("f93e00") in a  # 1.5 as a half-precision float, the shortest exact form


@pytest.mark.parametrize(
    ("data", "why"),
    [({"x": float("nan")}, "finite"), ({"x": b"raw"}, "bytes"), ({1: "x"}, "text"), ({"x": 2**64}, "64-bit")],
)
def test_data_must_be_json_compatible(log: AuditLog, data: dict[Any, Any], why: str) -> None:
    with pytest.raises(AuditError, match=why):
        log.append("alert.sent", "gateway", "alert-1", data, ts=T0)
    assert log.entries() == []


def test_append_many_is_one_transaction(log: AuditLog) -> None:
    _fill(log, 2)
    records = [AuditRecord("alert.sent", "gateway", "a-1", {}, T0), AuditRecord("Bad Action", "gateway", "a-2")]
    with pytest.raises(AuditError, match="action"):
        log.append_many(records)
    assert len(log.entries()) == 2
    entries = log.append_many([AuditRecord("alert.sent", "op-1", f"a-{i}", {"i": i}, T0 + i) for i in range(5)])
    assert [e.seq for e in entries] == [3, 4, 5, 6, 7]


def test_append_joins_the_callers_transaction(log: AuditLog, store: Store) -> None:
    """The store's writer can record an entry in the same commit as what it is about."""
    conn = store.db.conn
    conn.execute("BEGIN IMMEDIATE")
    log.append("ack.accepted", "officer-1", "alert-1", {"answer": "accepted"}, ts=T0)
    conn.execute("ROLLBACK")
    assert log.entries() == []
    conn.execute("BEGIN IMMEDIATE")
    log.append("ack.accepted", "officer-1", "alert-1", {"answer": "accepted"}, ts=T0)
    conn.execute("COMMIT")
    assert len(log.entries()) == 1


def test_own_connection_and_the_store_share_the_file(pki: Pki, db_path: Path) -> None:
    signer = load_signer(pki, "gateway")
    with Store.open(db_path), AuditLog.open(db_path, signer) as own:
        own.append("policy.loaded", "admin-1", "policy", {"version": 3}, ts=T0)
    with Store.open(db_path) as store:
        assert len(AuditLog(store.db.conn, signer).entries()) == 1


def test_the_application_cannot_change_or_delete_entries(log: AuditLog) -> None:
    _fill(log, 3)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        log.conn.execute("UPDATE audit SET actor = 'someone-else' WHERE seq = 2")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        log.conn.execute("DELETE FROM audit WHERE seq = 3")
    with pytest.raises(sqlite3.IntegrityError, match="forward"):
        log.conn.execute("UPDATE audit_head SET seq = 1")


# -- tampering ------------------------------------------------------------------------------


ALTERED = {"hash", "unreadable"}  # the canonical bytes changed, or the row is not even an entry


@pytest.mark.parametrize(
    ("column", "reasons"),
    [
        ("data", ALTERED),
        ("ts", ALTERED),
        ("action", ALTERED),
        ("actor", ALTERED),
        ("subject", ALTERED),
        ("kid", ALTERED),
        ("alg", ALTERED),
        ("hash", {"hash"}),
        ("signature", {"signature"}),
    ],
)
def test_a_changed_byte_in_any_field_names_its_entry(
    log: AuditLog, pki: Pki, db_path: Path, column: str, reasons: set[str]
) -> None:
    _fill(log, 9)
    _flip_column(db_path, 5, column)
    report = verify_db(db_path, audit_keys(pki))
    assert report.broken is not None
    assert report.broken.seq == 5
    assert report.broken.reason in reasons, report.broken
    assert report.count == 4
    assert report.head.seq == 4


def test_changed_data_that_is_still_canonical_json_is_a_hash_mismatch(log: AuditLog, pki: Pki, db_path: Path) -> None:
    _fill(log, 6)
    conn = sqlite3.connect(db_path)
    (text,) = conn.execute("SELECT data FROM audit WHERE seq = 3").fetchone()
    conn.close()
    _tamper(db_path, "UPDATE audit SET data = ? WHERE seq = 3", (text.replace("van-17", "van-18"),))
    report = verify_db(db_path, audit_keys(pki))
    assert report.broken is not None
    assert (report.broken.seq, report.broken.reason) == (3, "hash")
    assert report.broken.describe() == (
        f"entry 3 (alert.escalated at {iso_ms(T0 + 3000)}): hash mismatch — the log was altered at or before this entry"
    )


def test_a_deleted_middle_entry_is_a_gap(log: AuditLog, pki: Pki, db_path: Path) -> None:
    _fill(log, 8)
    _tamper(db_path, "DELETE FROM audit WHERE seq IN (4, 5)")
    report = verify_db(db_path, audit_keys(pki))
    assert report.broken is not None
    assert (report.broken.seq, report.broken.reason) == (4, "gap")
    assert "entries 4 to 5 are gone; the next is 6" in report.broken.describe()


def test_renumbered_entries_do_not_verify(log: AuditLog, pki: Pki, db_path: Path) -> None:
    _fill(log, 6)
    _tamper(db_path, "UPDATE audit SET seq = seq + 100 WHERE seq = 4")
    _tamper(db_path, "UPDATE audit SET seq = 4 WHERE seq = 5")
    _tamper(db_path, "UPDATE audit SET seq = 5 WHERE seq = 104")
    report = verify_db(db_path, audit_keys(pki))
    assert report.broken is not None
    assert (report.broken.seq, report.broken.reason) == (4, "hash")


def test_entries_out_of_order_are_reported(log: AuditLog, pki: Pki) -> None:
    entries = _fill(log, 5)
    report = verify_chain([entries[0], entries[1], entries[3], entries[2]], audit_keys(pki))
    assert report.broken is not None
    assert (report.broken.seq, report.broken.reason) == (3, "gap")
    report = verify_chain([entries[0], entries[1], entries[1]], audit_keys(pki))
    assert report.broken is not None
    assert (report.broken.seq, report.broken.reason) == (3, "reordered")


def test_a_deleted_tail_shows_through_the_head_record(log: AuditLog, pki: Pki, db_path: Path) -> None:
    _fill(log, 7)
    _tamper(db_path, "DELETE FROM audit WHERE seq >= 6")
    report = verify_db(db_path, audit_keys(pki))
    assert report.broken is not None
    assert (report.broken.seq, report.broken.reason) == (6, "truncated")
    with pytest.raises(AuditError, match="ends at entry 5 but its head record names 7"):
        log.append("alert.sent", "gateway", "alert-x", {}, ts=T0)


def test_a_deleted_head_record_is_reported(log: AuditLog, pki: Pki, db_path: Path) -> None:
    _fill(log, 3)
    _tamper(db_path, "DELETE FROM audit_head")
    report = verify_db(db_path, audit_keys(pki))
    assert report.broken is not None
    assert report.broken.reason == "head"


def test_a_cut_tail_with_a_rewritten_head_needs_a_head_kept_elsewhere(log: AuditLog, pki: Pki, db_path: Path) -> None:
    """The documented limit: someone who deletes the tail and rewrites the head record to
    match leaves a valid shorter log. A head kept off the box reveals it."""
    entries = _fill(log, 6)
    kept_elsewhere = entries[-1].head
    _tamper(db_path, "DELETE FROM audit WHERE seq > 4")
    _tamper(db_path, "UPDATE audit_head SET seq = 4, hash = ?", (entries[3].hash,))
    assert verify_db(db_path, audit_keys(pki)).ok
    conn = sqlite3.connect(db_path)
    report = verify_chain(read_entries(conn), audit_keys(pki), head=kept_elsewhere)
    conn.close()
    assert report.broken is not None
    assert (report.broken.seq, report.broken.reason) == (5, "truncated")


def test_an_entry_signed_by_another_key_is_a_bad_signature(log: AuditLog, pki: Pki, db_path: Path) -> None:
    _fill(log, 3)
    impostor = AuditLog(log.conn, KeySigner("gateway", new_key()))  # same id, not the certified key
    impostor.append("alert.overridden", "op-9", "alert-2", {"to": "van-99"}, ts=T0 + 9000)
    _fill(log, 2)
    report = verify_db(db_path, audit_keys(pki))
    assert report.broken is not None
    assert (report.broken.seq, report.broken.reason) == (4, "signature")
    assert report.broken.describe().startswith(f"entry 4 (alert.overridden at {iso_ms(T0 + 9000)}): bad signature")
    assert verify_db(db_path, None).ok  # the chain itself is intact: only the signature says who


def test_an_entry_signed_by_a_device_is_not_trusted(log: AuditLog, pki: Pki, db_path: Path) -> None:
    pki.issue(Role.DEVICE, "van-17")
    _fill(log, 2)
    AuditLog(log.conn, load_signer(pki, "van-17")).append("alert.sent", "van-17", "x", {}, ts=T0)
    report = verify_db(db_path, audit_keys(pki))
    assert report.broken is not None
    assert (report.broken.seq, report.broken.reason) == (3, "signer")
    assert "role device" in report.broken.detail


def test_an_unknown_signer_is_not_trusted() -> None:
    signer = KeySigner("gateway", new_key())
    entry = next_entry(GENESIS_HEAD, action="alert.sent", actor="g", subject="s", data={}, ts=0, signer=signer)

    def nobody(kid: str) -> Any:
        raise UnknownSender("no certificate registered for this id", sender=kid)

    report = verify_chain([entry], nobody)
    assert report.broken is not None
    assert report.broken.reason == "signer"


# -- any single-byte change is detected (Hypothesis) ----------------------------------------

_SIGNER = KeySigner("gateway", new_key())
_KEY = _SIGNER.key.public_key()
_COLUMNS = ("seq", "ts", "action", "actor", "subject", "data", "kid", "alg", "hash", "signature")


def _chain(n: int) -> list[AuditEntry]:
    head, out = GENESIS_HEAD, []
    for i in range(n):
        entry = next_entry(
            head, action=ACTIONS[i % len(ACTIONS)], actor="gateway", subject=f"alert-{i}", data=_data(i),
            ts=T0 + i, signer=_SIGNER,
        )
        out.append(entry)
        head = entry.head
    return out


_CHAIN = _chain(5)


def _row(entry: AuditEntry) -> list[Any]:
    """The entry as `certs.auditlog` stores it."""
    return [
        entry.seq, entry.ts, entry.action, entry.actor, entry.subject, data_json(entry.data), entry.kid, entry.alg,
        entry.hash, entry.signature,
    ]


def _flip(value: Any, position: int, mask: int) -> Any | None:
    """`value` with one byte of its stored form xor `mask`; None if that is not storable."""
    if isinstance(value, int):  # SQLite integers are 64-bit two's complement
        raw = bytearray(value.to_bytes(8, "big", signed=True))
        raw[position % 8] ^= mask
        return int.from_bytes(raw, "big", signed=True)
    raw = bytearray(value.encode() if isinstance(value, str) else value)
    raw[position % len(raw)] ^= mask
    if isinstance(value, str):
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return None  # SQLite TEXT would not hold it as text
    return bytes(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.integers(0, len(_CHAIN) - 1),
    column=st.sampled_from(_COLUMNS),
    position=st.integers(0, 10_000),
    mask=st.integers(1, 255),
)
def test_any_single_byte_change_is_detected(k: int, column: str, position: int, mask: int) -> None:
    row = _row(_CHAIN[k])
    index = _COLUMNS.index(column)
    new = _flip(row[index], position, mask)
    assume(new is not None)
    row[index] = new
    entries = [*_CHAIN[:k], decode_row(tuple(row)), *_CHAIN[k + 1 :]]
    if column == "seq":  # the table is ordered by seq
        entries.sort(key=lambda e: e.seq)
    report = verify_chain(entries, lambda kid: _KEY, head=_CHAIN[-1].head)
    assert report.broken is not None, (column, position, mask)
    assert report.broken.seq == k + 1 or (column == "seq" and report.broken.seq <= k + 1)


def test_the_untouched_chain_verifies() -> None:
    report = verify_chain([decode_row(tuple(_row(e))) for e in _CHAIN], lambda kid: _KEY, head=_CHAIN[-1].head)
    assert report.ok
    assert report.head == Head(5, _CHAIN[-1].hash)


def test_ed25519_signers_work_too() -> None:
    signer = KeySigner("gateway", ed25519.Ed25519PrivateKey.generate())
    entry = next_entry(GENESIS_HEAD, action="enrolment", actor="inst-1", subject="van-1", data={}, ts=1, signer=signer)
    assert entry.alg == ALG_EDDSA
    assert verify_chain([entry], lambda kid: signer.key.public_key()).ok


def test_iso_ms_and_entry_line() -> None:
    assert iso_ms(T0 + 5) == "2026-03-01T12:00:00.005Z"
    assert iso_ms(0) == "1970-01-01T00:00:00.000Z"
    line = entry_line(_CHAIN[0])
    assert line.startswith("#1 2026-03-01T12:00:00.000Z alert.sent gateway -> alert-0 {")


# -- the command line --------------------------------------------------------------------------


def _run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), prog_name="bluelight")


def _one_line_error(result: Result, hint: str, exit_code: int = 1) -> str:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert hint in lines[0], lines[0]
    return lines[0]


def test_cli_verify_ok(log: AuditLog, pki: Pki, db_path: Path) -> None:
    entries = _fill(log, 10)
    result = _run("audit", "verify", str(db_path), "--pki", str(pki.root))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"ok: 10 entries, head 10:{entries[-1].hash.hex()}"
    result = _run("audit", "verify", str(db_path))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok: 10 entries")
    assert "signatures not checked" in result.stdout


def test_cli_verify_an_empty_gateway_db(store: Store, db_path: Path, pki: Pki) -> None:
    result = _run("audit", "verify", str(db_path), "--pki", str(pki.root))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"ok: 0 entries, head 0:{'00' * 32}")


def test_cli_verify_names_the_tampered_entry(log: AuditLog, pki: Pki, db_path: Path) -> None:
    _fill(log, 50)
    _flip_column(db_path, 42, "ts")
    line = _one_line_error(_run("audit", "verify", str(db_path), "--pki", str(pki.root)), "entry 42 (", exit_code=3)
    assert "hash mismatch — the log was altered at or before this entry" in line


def test_cli_verify_bad_input(tmp_path: Path, pki: Pki) -> None:
    _one_line_error(_run("audit", "verify", str(tmp_path / "nope.db")), "no database at")
    text = tmp_path / "notes.txt"
    text.write_text("not a database at all " * 100)
    _one_line_error(_run("audit", "verify", str(text)), "is not an audit database")
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    _one_line_error(_run("audit", "verify", str(other)), "no audit table")
    with Store.open(tmp_path / "gw.db"):
        pass
    _one_line_error(_run("audit", "verify", str(tmp_path / "gw.db"), "--pki", str(tmp_path / "nopki")), "pki init")
    _one_line_error(_run("audit", "show", str(tmp_path / "nope.db")), "no database at")
    _one_line_error(_run("audit", "show", str(tmp_path / "gw.db"), "--last", "0"), "--last", exit_code=2)


def test_cli_show(log: AuditLog, db_path: Path) -> None:
    _fill(log, 6)
    result = _run("audit", "show", str(db_path), "--last", "2")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["#5", "#6"]
    assert "alert.sent gateway -> alert-5" in lines[0]
    assert len(_run("audit", "show", str(db_path)).stdout.splitlines()) == 6


# -- retention ------------------------------------------------------------------------------------


def _msg(device: str, seq: int, kind: str, recv_ms: int) -> Accepted:
    body: dict[str, Any] = {"lat": 51.5, "lon": -0.1} if kind == "telemetry" else {"type": "panic"}
    return Accepted(device, seq, kind, recv_ms, recv_ms, body, orjson.dumps(body).decode(), b"\x00", False)


NOW = T0 + 400 * DAY_MS
RULE = Retention(telemetry_days=30, other_days=365)


def test_the_retention_rule() -> None:
    assert RULE.cutoff("telemetry", NOW) == NOW - 30 * DAY_MS
    assert RULE.cutoff("event", NOW) == RULE.cutoff("ack", NOW) == NOW - 365 * DAY_MS
    assert RULE.expired("telemetry", NOW - 31 * DAY_MS, NOW)
    assert not RULE.expired("telemetry", NOW - 29 * DAY_MS, NOW)
    assert not RULE.expired("event", NOW - 31 * DAY_MS, NOW)
    assert RULE.expired("status", NOW - 366 * DAY_MS, NOW)
    assert RULE.horizon(NOW) == NOW - 30 * DAY_MS
    with pytest.raises(ValueError, match="> 0"):
        Retention(0, 10)


def test_prune_deletes_old_rows_in_chunks_and_keeps_the_rest(store: Store, log: AuditLog) -> None:
    old, recent = NOW - 40 * DAY_MS, NOW - DAY_MS
    # dev-a: 1-50 old telemetry, 51 an old panic (kept), 52-60 recent telemetry; 61-62 never arrived.
    batch = [_msg("dev-a", s, "telemetry", old + s) for s in range(1, 51)]
    batch += [_msg("dev-a", 51, "event", old + 51)]
    batch += [_msg("dev-a", s, "telemetry", recent + s) for s in range(52, 61)]
    batch += [_msg("dev-a", 63, "telemetry", recent + 63)]
    # dev-b: 1-3 old telemetry, 5 recent: seq 4 is missing, above the horizon.
    batch += [_msg("dev-b", s, "telemetry", old + s) for s in (1, 2, 3)] + [_msg("dev-b", 5, "telemetry", recent)]
    store.write_batch(batch)
    _fill(log, 3)
    before = {d["id"]: (d["missing"], d["missing_count"]) for d in store.devices()}
    assert before == {"dev-a": ([61, 62], 2), "dev-b": ([4], 1)}

    chunks: list[int] = []
    conn = store.db.conn
    conn.set_trace_callback(lambda sql: chunks.append(1) if sql.startswith("BEGIN IMMEDIATE") else None)
    assert store.prune(NOW, RULE, audit=log, chunk=7) == 53
    conn.set_trace_callback(None)
    assert len(chunks) >= 53 // 7  # one short transaction per chunk (+1 for the audit entry)

    kept = [m["seq"] for m in store.messages("dev-a")]
    assert kept == [51, *range(52, 61), 63]
    assert [m["seq"] for m in store.messages("dev-b")] == [5]
    after = {d["id"]: (d["missing"], d["missing_count"]) for d in store.devices()}
    assert after == before  # pruned rows are not "missing"
    device = store.device("dev-a")
    assert device is not None
    assert (device["last_seq"], device["stored"]) == (63, 61)

    entries = log.entries()
    assert len(entries) == 4  # audit rows are never pruned; the run is the fourth entry
    last = entries[-1]
    assert isinstance(last, AuditEntry)
    assert (last.action, last.subject, last.ts) == ("retention.pruned", "messages", NOW)
    assert (last.data["deleted"], last.data["by_kind"]) == (53, {"telemetry": 53})
    assert store.prune(NOW, RULE, audit=log) == 0  # nothing left to do, still recorded
    assert len(log.entries()) == 5
    assert verify_chain(log.entries(), None, head=log.head()).ok


def test_prune_looks_only_below_the_horizon(store: Store) -> None:
    recent = NOW - DAY_MS
    store.write_batch([_msg("dev-a", s, "telemetry", recent + s) for s in range(1, 101)])
    plan = store.db.conn.execute(
        "EXPLAIN QUERY PLAN SELECT rowid FROM messages WHERE recv_ts < 5 AND (recv_ts, rowid) > (0, 0) "
        "ORDER BY recv_ts, rowid LIMIT 10"
    ).fetchall()
    assert "messages_recv_ts" in str(plan)
    statements: list[str] = []
    store.db.conn.set_trace_callback(statements.append)
    assert store.prune(NOW, RULE, chunk=10) == 0
    store.db.conn.set_trace_callback(None)
    assert sum("FROM messages" in s for s in statements) == 1  # one empty chunk, then stop


def test_prune_then_late_arrivals_and_old_events(store: Store) -> None:
    old = NOW - 400 * DAY_MS
    store.write_batch([_msg("dev-a", 1, "event", old), _msg("dev-a", 2, "ack", old), _msg("dev-a", 4, "event", NOW)])
    assert store.prune(NOW, RULE) == 2
    assert store.device("dev-a")["missing"] == [3]  # type: ignore[index]
    store.write_batch([_msg("dev-a", 3, "telemetry", NOW)])  # arrives late: no longer missing
    assert store.device("dev-a")["missing_count"] == 0  # type: ignore[index]


def test_an_old_database_gets_the_pruned_upto_column(db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    conn.execute("CREATE TABLE devices (id TEXT PRIMARY KEY, last_seq INTEGER NOT NULL DEFAULT 0)")
    conn.close()
    with Store.open(db_path) as store:
        assert "pruned_upto" in store.db.table("devices").columns_dict


def test_retention_settings(pki: Pki, tmp_path: Path) -> None:
    base = {"pki_dir": str(pki.root), "broker": "localhost:8883", "db_path": str(tmp_path / "g.db")}
    s = load_settings(None, environ={}, overrides=base)
    assert (s.retention_days, s.event_retention_days) == (31, 365)
    assert s.retention == Retention(31, 365)
    s = load_settings(
        None, environ={"BLUELIGHT_GATEWAY_RETENTION_DAYS": "7", "BLUELIGHT_GATEWAY_EVENT_RETENTION_DAYS": "90"},
        overrides=base,
    )
    assert s.retention == Retention(7, 90)
    toml = tmp_path / "gw.toml"
    toml.write_text("[gateway]\nretention_days = 14\n")
    assert load_section(toml, "gateway")["retention_days"] == 14
    assert load_settings(toml, environ={}, overrides=base).retention_days == 14
    for key, value in (("retention_days", 0), ("event_retention_days", -1), ("retention_days", "soon")):
        with pytest.raises(ConfigError, match=key):
            load_settings(None, environ={}, overrides={**base, key: value})
    assert GatewaySettings(pki_dir=pki.root, broker="h:1", db_path=tmp_path / "d").retention_days == 31
