"""The outbox: seq allocation, lanes, receipts, bounds, the held will, signatures."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from edge_agent.outbox import SIMULATED_WAL_PAGES, WILL_BODY, Outbox, OutboxError
from edge_agent.wire.envelope import KeySigner, PublicKey
from edge_agent.wire.errors import Malformed, UnknownSender
from edge_agent.wire.ids import Role
from edge_agent.wire.topics import Topic
from edge_agent.wire.verify import verify_message

T0 = 1_700_000_000_000
POS = {"lat": 51.5, "lon": -0.12}
SENDER = "dev-t"


class Keys:
    """A one-key KeyLookup."""

    def __init__(self, kid: str, key: PublicKey) -> None:
        self.kid, self.key = kid, key

    def key_for(self, kid: str, roles: frozenset[Role]) -> PublicKey:
        if kid != self.kid:
            raise UnknownSender("unknown", sender=kid)
        return self.key


@pytest.fixture(scope="module")
def private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def signer(private_key: ec.EllipticCurvePrivateKey) -> KeySigner:
    return KeySigner(SENDER, private_key)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.db"


@pytest.mark.parametrize(("sync", "level"), [("full", 1), ("normal", 1), ("off", 0)])
def test_sync_sets_how_sqlite_syncs_and_what_is_kept_survives(
    path: Path, signer: KeySigner, sync: str, level: int
) -> None:
    """"off" (simulated fleets) never fsyncs, checkpoints included; what was committed is
    still there for the next open (a process crash keeps it)."""
    with Outbox(path, signer, sync=sync, bookkeeping_delay_s=5.0) as ob:  # type: ignore[arg-type]
        assert ob._db.execute("PRAGMA synchronous").fetchone()[0] == level
        ob.append("event", {"type": "panic"}, T0)
        ob.mark_sent([1], T0)
        ob.append("telemetry", POS, T0 + 1)
        assert ob._db.execute("PRAGMA synchronous").fetchone()[0] == level
    with Outbox(path, signer, sync=sync) as ob:  # type: ignore[arg-type]
        assert ob.seqs() == [1, 2]


def test_a_simulated_outbox_is_its_process_own_and_keeps_a_short_wal(path: Path, signer: KeySigner) -> None:
    """sync="off" (thousands of outboxes on one RAM disk): no shared-memory WAL index
    file, no second reader, and the WAL is checkpointed every SIMULATED_WAL_PAGES pages
    instead of growing to SQLite's ~1,000."""
    wal = path.with_name(path.name + "-wal")
    with Outbox(path, signer, sync="off") as ob:
        for i in range(400):
            ob.append("telemetry", POS, T0 + i)
        assert not path.with_name(path.name + "-shm").exists()
        assert ob._db.execute("PRAGMA locking_mode").fetchone()[0] == "exclusive"
        with (
            contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0)) as other,
            pytest.raises(sqlite3.OperationalError, match="locked"),
        ):
            other.execute("SELECT COUNT(*) FROM outbox").fetchone()
        assert wal.stat().st_size <= (SIMULATED_WAL_PAGES + 8) * 4200
    with Outbox(path, signer) as ob:
        assert ob._db.execute("PRAGMA locking_mode").fetchone()[0] == "normal"
        assert len(ob.seqs()) == 400


def test_a_simulated_outbox_keeps_what_it_committed_when_its_process_dies(path: Path, signer: KeySigner) -> None:
    """A simulator killed mid-run (no close, the WAL not checkpointed) loses no appended message."""
    key = signer.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
    script = f"""
import os
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from edge_agent.outbox import Outbox
from edge_agent.wire.envelope import KeySigner
ob = Outbox({str(path)!r}, KeySigner({SENDER!r}, load_pem_private_key({key!r}.encode(), None)), sync="off")
for i in range(150):
    ob.append("telemetry", {POS!r}, {T0} + i)
os._exit(9)
"""
    done = subprocess.run([sys.executable, "-c", script], check=False, cwd=Path(__file__).parents[2])
    assert done.returncode == 9
    with Outbox(path, signer, sync="off") as ob:
        assert ob.seqs() == list(range(1, 151))
        assert ob.append("telemetry", POS, T0 + 150) == 151


def test_an_unknown_sync_mode_is_refused(path: Path, signer: KeySigner) -> None:
    with pytest.raises(ValueError, match="sync must be one of full, normal, off"):
        Outbox(path, signer, sync="fast")  # type: ignore[arg-type]


def test_seq_starts_at_1_and_survives_reopen_and_deletion(path: Path, signer: KeySigner) -> None:
    with Outbox(path, signer) as ob:
        assert [ob.append("telemetry", POS, T0 + i) for i in range(3)] == [1, 2, 3]
        assert ob.confirm([(1, 3)]) == 3
        assert ob.seqs() == []
    with Outbox(path, signer) as ob:
        assert ob.append("event", {"type": "panic"}, T0 + 10) == 4
        assert ob.append("status", {"state": "online"}, T0 + 11) == 5
        assert ob.seqs() == [4, 5]


def test_outbox_refuses_another_identity(
    path: Path, signer: KeySigner, private_key: ec.EllipticCurvePrivateKey
) -> None:
    Outbox(path, signer).close()
    with pytest.raises(OutboxError, match="belongs to 'dev-t'"):
        Outbox(path, KeySigner("dev-other", private_key))


def test_events_jump_the_telemetry_backlog_and_lanes_keep_seq_order(path: Path, signer: KeySigner) -> None:
    with Outbox(path, signer) as ob:
        telemetry = [ob.append("telemetry", POS, T0 + i) for i in range(50)]
        status = ob.append("status", {"state": "online"}, T0 + 50)
        ack = ob.append("ack", {"alert_id": "a1", "answer": "accepted"}, T0 + 51)
        events = [ob.append("event", {"type": "panic", **POS}, T0 + 52 + i) for i in range(2)]
        due = ob.due(T0 + 100, limit=100)
        assert [r.seq for r in due] == [*events, ack, status, *telemetry]
        assert [r.kind for r in due[:4]] == ["event", "event", "ack", "status"]
        # A small window still starts with the alarms.
        assert [r.seq for r in ob.due(T0 + 100, limit=3)] == [*events, ack]


def test_due_skips_sent_until_resend_after(path: Path, signer: KeySigner) -> None:
    with Outbox(path, signer, resend_after_s=10) as ob:
        a, b = ob.append("telemetry", POS, T0), ob.append("telemetry", POS, T0 + 1)
        ob.mark_sent([a], T0 + 5)
        assert [r.seq for r in ob.due(T0 + 6, 10)] == [b]
        assert ob.next_resend_ms() == T0 + 5 + 10_000
        ob.mark_sent([b], T0 + 6)
        assert ob.due(T0 + 10_000, 10) == []
        resend = ob.due(T0 + 10_005, 10)
        assert [r.seq for r in resend] == [a]
        assert resend[0].attempts == 1
        assert ob.reset_sent() == 2
        assert [r.seq for r in ob.due(T0 + 15_000, 10)] == [a, b]


def test_a_new_event_overtakes_rows_due_for_resend(path: Path, signer: KeySigner) -> None:
    with Outbox(path, signer, resend_after_s=1) as ob:
        old = [ob.append("telemetry", POS, T0 + i) for i in range(5)]
        ob.mark_sent(old, T0)
        event = ob.append("event", {"type": "panic"}, T0 + 5000)
        assert [r.seq for r in ob.due(T0 + 5000, 3)] == [event, *old[:2]]


def test_confirm_deletes_exactly_the_receipted_seqs(path: Path, signer: KeySigner) -> None:
    with Outbox(path, signer) as ob:
        for i in range(10):
            ob.append("telemetry", POS, T0 + i)
        assert ob.confirm([(2, 4), (7, 7)]) == 4
        assert ob.seqs() == [1, 5, 6, 8, 9, 10]
        assert ob.confirm([(2, 4), (50, 60)]) == 0
        assert ob.stats().confirmed == 4
        assert ob.message(3) is None
        kind, data = ob.message(5) or ("", b"")
        keys = Keys(SENDER, signer.key.public_key())
        assert (kind, verify_message(str(Topic.up(SENDER, kind)), data, keys, frozenset({Role.DEVICE})).seq) == (
            "telemetry",
            5,
        )


def test_overflow_drops_oldest_telemetry_only_and_counts_it(
    path: Path, signer: KeySigner, caplog: pytest.LogCaptureFixture
) -> None:
    with Outbox(path, signer, max_rows=10) as ob:
        event = ob.append("event", {"type": "panic"}, T0)
        ack = ob.append("ack", {"alert_id": "a1", "answer": "received"}, T0)
        telemetry = [ob.append("telemetry", POS, T0 + i) for i in range(12)]
        with caplog.at_level(logging.WARNING, logger="edge_agent.outbox"):
            late_event = ob.append("event", {"type": "man_down"}, T0 + 20)
        assert ob.seqs() == sorted([event, ack, *telemetry[5:], late_event])
        assert ob.dropped == 5
        assert ob.stats().pending == {"event": 2, "ack": 1, "status": 0, "telemetry": 7}
        assert "dropped the 1 oldest telemetry" in caplog.text
    with Outbox(path, signer, max_rows=10) as ob:
        assert ob.dropped == 5  # persisted


def test_alarms_are_never_dropped_even_past_the_bound(path: Path, signer: KeySigner) -> None:
    with Outbox(path, signer, max_rows=10) as ob:
        for i in range(5):
            ob.append("telemetry", POS, T0 + i)
        events = [ob.append("event", {"type": "panic"}, T0 + 10 + i) for i in range(15)]
        assert ob.seqs(kind="event") == events
        assert ob.seqs(kind="telemetry") == []
        assert ob.dropped == 5


def test_old_telemetry_is_dropped_by_age(path: Path, signer: KeySigner) -> None:
    with Outbox(path, signer, max_age_s=60) as ob:
        old = ob.append("telemetry", POS, T0)
        old_event = ob.append("event", {"type": "panic"}, T0)
        new = ob.append("telemetry", POS, T0 + 61_000)
        assert ob.seqs() == [old_event, new]
        assert old not in ob.seqs()
        assert ob.dropped == 1


def test_held_will_is_not_due_until_released(path: Path, signer: KeySigner) -> None:
    with Outbox(path, signer) as ob:
        t = ob.append("telemetry", POS, T0)
        online = ob.prepare_online(T0 + 1)
        seq, data = ob.prepare_will(T0 + 1)
        assert (online, seq) == (t + 1, t + 2), "the will outranks the online status of its connection"
        assert [r.seq for r in ob.due(T0 + 2, 10)] == [t]
        assert ob.held_will() == (seq, data)
        assert ob.stats().held == 2
        assert ob.release(online)  # the connection is up
        assert [r.seq for r in ob.due(T0 + 2, 10)] == [online, t]
        assert ob.due(T0 + 2, 10)[0].retain
    with Outbox(path, signer) as ob:  # still held across a restart
        assert [r.seq for r in ob.due(T0 + 4, 10)] == [online, t]
        assert ob.release_will() == [seq]
        due = ob.due(T0 + 4, 10)
        assert [r.seq for r in due] == [online, seq, t]
        assert [r.retain for r in due] == [True, False, False]
        assert ob.held_will() is None
        assert ob.stats().held == 0


def test_presence_of_a_connection_that_never_came_up_is_released_with_its_will(path: Path, signer: KeySigner) -> None:
    with Outbox(path, signer) as ob:
        online = ob.prepare_online(T0)
        will, _ = ob.prepare_will(T0)
        assert ob.release_will() == [online, will]  # no gap in seqs for the gateway
        next_online = ob.prepare_online(T0 + 1)
        assert next_online > will
        due = ob.due(T0 + 2, 10)
        assert [r.seq for r in due] == [online, will]
        assert not any(r.retain for r in due), "only the newest online status is published retained"


def test_only_the_newest_retained_status_is_published_retained(path: Path, signer: KeySigner) -> None:
    with Outbox(path, signer) as ob:
        first = ob.append("status", {"state": "online"}, T0, retain=True)
        second = ob.append("status", {"state": "online"}, T0 + 1, retain=True)
        assert {r.seq: r.retain for r in ob.due(T0 + 2, 10)} == {first: False, second: True}


def test_every_stored_row_verifies_with_the_device_key(
    path: Path, signer: KeySigner, private_key: ec.EllipticCurvePrivateKey
) -> None:
    keys = Keys(SENDER, private_key.public_key())
    with Outbox(path, signer) as ob:
        ob.append("telemetry", {**POS, "acc": 5.0, "fix": "3d", "sensors": {"battery": 90.0}}, T0)
        ob.append("event", {"type": "panic", **POS}, T0 + 1)
        ob.append("ack", {"alert_id": "a1", "answer": "accepted"}, T0 + 2)
        ob.prepare_will(T0 + 3)
        ob.release_will()
        rows = ob.due(T0 + 10, 100)
        assert len(rows) == 4
        for row in rows:
            message = verify_message(str(Topic.up(SENDER, row.kind)), row.data, keys, frozenset({Role.DEVICE}))
            assert message.sender == SENDER
            assert message.kind == row.kind
            assert message.seq == row.seq
        will = next(r for r in rows if r.kind == "status")
        status = verify_message(str(Topic.up(SENDER, "status")), will.data, keys, frozenset({Role.DEVICE}))
        assert status.body == WILL_BODY


def test_invalid_bodies_and_kinds_are_refused_without_using_a_seq(path: Path, signer: KeySigner) -> None:
    with Outbox(path, signer) as ob:
        with pytest.raises(Malformed):
            ob.append("telemetry", {"lat": 91, "lon": 0}, T0)
        with pytest.raises(ValueError, match="does not send"):
            ob.append("alert", {}, T0)
        assert ob.append("telemetry", POS, T0) == 1


def test_stats_by_lane(path: Path, signer: KeySigner) -> None:
    with Outbox(path, signer) as ob:
        ob.append("telemetry", POS, T0)
        ob.append("event", {"type": "panic"}, T0)
        ob.prepare_will(T0)
        ob.mark_sent([1], T0)
        stats = ob.stats()
        assert stats.pending == {"event": 1, "ack": 0, "status": 0, "telemetry": 1}
        assert (stats.held, stats.sent, stats.next_seq, stats.total) == (1, 1, 4, 2)


def _committed_sent_marks(path: Path) -> list[int]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [r[0] for r in db.execute("SELECT seq FROM outbox WHERE sent_ms IS NOT NULL ORDER BY seq")]
    finally:
        db.close()


def test_deferred_bookkeeping_commits_with_the_next_append_or_flush(path: Path, signer: KeySigner) -> None:
    deferred: list[int] = []
    with Outbox(path, signer, bookkeeping_delay_s=5.0) as ob:
        ob.on_deferred = lambda: deferred.append(1)
        a = ob.append("telemetry", POS, T0)
        ob.mark_sent([a], T0 + 1)
        assert deferred == [1]
        assert _committed_sent_marks(path) == []  # not committed yet, visible to the owner
        assert ob.due(T0 + 2, 10) == []
        b = ob.append("telemetry", POS, T0 + 1000)  # one commit for the append and the mark
        assert _committed_sent_marks(path) == [a]
        ob.mark_sent([b], T0 + 1001)
        ob.flush()
        assert _committed_sent_marks(path) == [a, b]
        ob.confirm([(a, a)])
    with Outbox(path, signer) as ob:  # close() committed the receipt
        assert ob.seqs() == [b]


def test_seqs_are_never_reused_after_receipts_and_restarts(path: Path, signer: KeySigner) -> None:
    with Outbox(path, signer, bookkeeping_delay_s=5.0) as ob:
        seqs = [ob.append("telemetry", POS, T0 + i) for i in range(5)]
        ob.confirm([(1, 5)])
        assert ob.seqs() == []
    with Outbox(path, signer) as ob:
        assert ob.next_seq == seqs[-1] + 1
        ob.append("telemetry", POS, T0 + 9)
    with Outbox(path, signer) as ob:  # not in meta yet: from the table
        assert ob.next_seq == seqs[-1] + 2


def test_resends_back_off_per_message(path: Path, signer: KeySigner) -> None:
    with Outbox(path, signer, resend_after_s=10) as ob:
        a = ob.append("telemetry", POS, T0)
        ob.mark_sent([a], T0)
        assert [r.seq for r in ob.due(T0 + 10_000, 10)] == [a]
        ob.mark_sent([a], T0 + 10_000)  # second attempt: due after 20 s
        assert ob.due(T0 + 29_999, 10) == []
        assert [r.seq for r in ob.due(T0 + 30_000, 10)] == [a]
        assert ob.next_resend_ms() is not None


def test_fresh_appends_are_sent_from_memory_in_lane_order(path: Path, signer: KeySigner) -> None:
    with Outbox(path, signer, bookkeeping_delay_s=5.0) as ob:
        assert ob.due(T0, 10) == []  # every unsent row is known now: none
        t1 = ob.append("telemetry", POS, T0 + 1)
        t2 = ob.append("telemetry", POS, T0 + 2)
        alarm = ob.append("event", {"type": "panic"}, T0 + 3)
        rows = ob.due(T0 + 4, 2)
        assert [r.seq for r in rows] == [alarm, t1]  # alarms first, then seq order
        assert rows[0].data == ob._db.execute("SELECT data FROM outbox WHERE seq = ?", (alarm,)).fetchone()[0]
        ob.mark_sent([r.seq for r in rows], T0 + 4)
        assert [r.seq for r in ob.due(T0 + 5, 10)] == [t2]
        ob.mark_sent([t2], T0 + 5)
        t4 = ob.append("telemetry", POS, T0 + 6)
        assert ob.confirm([(t4, t4)]) == 1  # a receipt for a row not sent yet takes it out
        assert ob.due(T0 + 7, 10) == []
        ob.flush()
        # what memory said matches the table
        unsent = ob._db.execute("SELECT seq FROM outbox WHERE sent_ms IS NULL AND held = 0").fetchall()
        assert unsent == []


def test_fresh_append_cache_is_bounded(path: Path, signer: KeySigner) -> None:
    from edge_agent.outbox import UNSENT_CACHE  # noqa: PLC0415

    with Outbox(path, signer, bookkeeping_delay_s=5.0) as ob:
        assert ob.due(T0, 10) == []
        seqs = [ob.append("telemetry", POS, T0 + i) for i in range(UNSENT_CACHE + 5)]
        assert ob._unsent is None  # offline for long: read from the table again
        assert [r.seq for r in ob.due(T0 + 10_000, 3)] == seqs[:3]
