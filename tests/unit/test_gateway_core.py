"""The gateway's pure core: replay window, gaps, clock skew, receipts, the ingest decision
with every rejection reason (real signatures, a real registry on the session PKI), and
the property that nothing is accepted twice and nothing valid is lost."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import ssl
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certs.pki import Identity, Pki, new_key
from certs.registry import KeyRegistry
from edge_agent.errors import BluelightError, ConfigError
from edge_agent.wire.envelope import MAX_ENVELOPE_BYTES, KeySigner, Message, seal
from edge_agent.wire.errors import REASONS, Rejected
from edge_agent.wire.ids import Role
from edge_agent.wire.topics import UP_KINDS, Topic
from gateway.core import Accepted, IngestCore, ReceiptBook, Rejection, ReplayWindow, SkewEstimator, Verdict
from gateway.core.tail import clock, message_line, rejection_line
from gateway.ingest import BULK_KINDS, SEQ_BLOCK, URGENT_KINDS, Ingest, _serve, lane_filters, route
from gateway.settings import GatewaySettings, load_settings
from gateway.store import Store

NOW = 1_760_000_000_000
BODY = {"lat": 51.5, "lon": -0.12, "acc": 4.0}


# -- helpers ------------------------------------------------------------------
def signer_for(identity: Identity) -> KeySigner:
    key = serialization.load_pem_private_key(identity.key.read_bytes(), password=None)
    return KeySigner(identity.id, key)  # type: ignore[arg-type]


def envelope(signer: KeySigner, seq: int, *, kind: str = "telemetry", ts: int = NOW, body: Any = None) -> bytes:
    return seal(Message(signer.kid, seq, ts, kind, BODY if body is None else body), signer)


def up(device: str, kind: str = "telemetry") -> str:
    return str(Topic.up(device, kind))


@pytest.fixture
def registry(pki: Pki) -> KeyRegistry:
    return KeyRegistry(pki)


@pytest.fixture
def core(registry: KeyRegistry) -> IngestCore:
    return IngestCore(registry, window=64, skew_bound_ms=2000)


@pytest.fixture
def dev_a(pki: Pki) -> KeySigner:
    return signer_for(pki.identity("dev-a"))


def rejected(result: Accepted | Rejection) -> Rejection:
    assert isinstance(result, Rejection), result
    return result


def accepted(result: Accepted | Rejection) -> Accepted:
    assert isinstance(result, Accepted), result
    return result


# -- replay window ----------------------------------------------------------------
def test_window_new_seen_and_late() -> None:
    w = ReplayWindow(8)
    assert w.observe(1).verdict is Verdict.NEW
    assert w.observe(1).verdict is Verdict.SEEN
    assert w.observe(10).verdict is Verdict.NEW
    assert w.observe(3).verdict is Verdict.NEW  # inside the window (10 - 3 < 8), not seen yet
    assert w.observe(3).verdict is Verdict.SEEN
    assert w.observe(2).verdict is Verdict.LATE  # 10 - 2 >= 8: older than the window
    assert w.observe(2).verdict is Verdict.LATE  # the window cannot tell; the store decides
    assert w.highest == 10


def test_window_records_gaps_only_when_jumping_ahead() -> None:
    w = ReplayWindow(64)
    assert w.observe(1).gap is None
    assert w.observe(2).gap is None
    assert w.observe(5).gap == (3, 4)
    assert w.observe(3).gap is None  # a late arrival fills the gap, it does not open one
    assert w.observe(4).verdict is Verdict.NEW


def test_window_large_jump_clears_the_bitmap() -> None:
    w = ReplayWindow(16)
    for seq in range(1, 17):
        w.observe(seq)
    jump = w.observe(1_000_000)
    assert jump.verdict is Verdict.NEW
    assert jump.gap == (17, 999_999)
    assert w.observe(999_999).verdict is Verdict.NEW
    assert w.observe(999_999).verdict is Verdict.SEEN
    assert w.observe(16).verdict is Verdict.LATE


def test_window_slides_bit_by_bit() -> None:
    w = ReplayWindow(4)
    for seq in (1, 2, 3, 4):
        w.observe(seq)
    w.observe(5)  # 1 drops out of the window
    assert w.classify(1) is Verdict.LATE
    assert w.classify(2) is Verdict.SEEN
    assert w.classify(6) is Verdict.NEW
    assert w.classify(2) is Verdict.SEEN  # classify records nothing


def test_seeded_window_leaves_stored_numbers_to_the_store() -> None:
    w = ReplayWindow(64, highest=100)
    assert w.observe(100).verdict is Verdict.NEW  # unknown: the store's unique key decides
    assert w.observe(101).gap is None
    assert w.observe(105).gap == (102, 104)


@pytest.mark.parametrize("bad", [{"size": 0}, {"size": 8, "highest": -1}])
def test_window_rejects_bad_parameters(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        ReplayWindow(**bad)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=500), max_size=300))
def test_window_calls_each_seq_new_exactly_once(seqs: list[int]) -> None:
    w = ReplayWindow(512)  # wider than the span: nothing is late
    new = [s for s in seqs if w.observe(s).verdict is Verdict.NEW]
    assert sorted(new) == sorted(set(seqs))


# -- clock skew -------------------------------------------------------------------
def test_skew_estimate_is_the_smallest_delay() -> None:
    est = SkewEstimator(2000)
    assert est.estimate_ms is None
    assert not est.observe(NOW - 150, NOW)
    assert not est.observe(NOW - 40, NOW + 100)
    assert est.estimate_ms == 140
    assert not est.observe(NOW - 3_600_000, NOW)  # an hour-old backlog message moves nothing
    assert est.estimate_ms == 140


def test_skew_past_the_bound_is_flagged() -> None:
    est = SkewEstimator(2000)
    assert est.observe(NOW - 5000, NOW)  # device clock 5 s behind
    assert est.observe(NOW - 5100, NOW)
    assert est.estimate_ms == 5000


def test_message_from_the_future_is_always_flagged() -> None:
    est = SkewEstimator(2000)
    for i in range(10):
        est.observe(NOW - 100, NOW + i)
    assert not est.observe(NOW + 1000, NOW)  # ahead, but within the bound
    assert est.estimate_ms == -1000
    assert est.observe(NOW + 60_000, NOW)
    assert est.estimate_ms == -1000  # one bad timestamp does not taint the estimate
    assert not est.observe(NOW - 50, NOW + 20)
    only_future = SkewEstimator(2000)
    assert only_future.observe(NOW + 60_000, NOW)
    assert only_future.estimate_ms == -60_000


def test_skew_window_forgets_old_samples() -> None:
    est = SkewEstimator(2000, window_ms=1000)
    assert not est.observe(NOW - 100, NOW)
    assert est.observe(NOW + 5000 - 3000, NOW + 5000)  # the 100 ms sample is 5 s old now
    assert est.estimate_ms == 3000


def test_backlog_after_an_outage_is_not_flagged() -> None:
    """Alarms first (fresh), then thousands of old queued messages: the estimate holds."""
    est = SkewEstimator(2000)
    assert not est.observe(NOW - 30, NOW)
    assert not any(est.observe(NOW - 3_600_000 + i, NOW + i // 10) for i in range(5000))
    assert est.estimate_ms == 30


# -- receipts ------------------------------------------------------------------
def test_receipts_first_at_once_then_at_most_one_per_interval() -> None:
    book = ReceiptBook(500)
    book.add("dev-a", [1, 2])
    assert book.due(NOW) == [("dev-a", [1, 2])]
    book.add("dev-a", [4, 3])
    assert book.due(NOW + 100) == []
    assert book.pending == 1
    assert book.due(NOW + 500) == [("dev-a", [3, 4])]
    book.add("dev-a", [5])
    assert book.due(NOW + 600, flush=True) == [("dev-a", [5])]
    assert book.pending == 0


def test_receipts_match_the_per_device_rule_for_a_fleet() -> None:
    """Against the rule itself (a device is due when it has never had a receipt or had
    its last one `interval` ago), over a random fleet with flushes."""
    rng = random.Random(7)
    book = ReceiptBook(1000, max_seqs=4)
    last: dict[str, int] = {}
    owed: dict[str, set[int]] = {}
    now = NOW
    for step in range(3000):
        now += rng.choice((0, 10, 50, 200))
        for _ in range(rng.randint(0, 5)):
            device, seq = f"dev-{rng.randrange(40)}", step * 10 + rng.randrange(10)
            book.add(device, [seq])
            owed.setdefault(device, set()).add(seq)
        flush = rng.random() < 0.01
        expected = sorted(d for d in owed if flush or d not in last or now - last[d] >= 1000)
        got = book.due(now, flush=flush)
        assert sorted({d for d, _ in got}) == expected
        for device in expected:
            seqs = sorted(owed.pop(device))
            assert [s for d, part in got if d == device for s in part] == seqs
            last[device] = now
        assert book.pending == len(owed)


def test_receipts_are_split_past_max_seqs() -> None:
    book = ReceiptBook(0, max_seqs=3)
    book.add("dev-b", range(1, 8))
    assert book.due(NOW) == [("dev-b", [1, 2, 3]), ("dev-b", [4, 5, 6]), ("dev-b", [7])]


# -- the ingest decision ------------------------------------------------------------
def test_valid_message_is_accepted_with_facts(core: IngestCore, dev_a: KeySigner) -> None:
    data = envelope(dev_a, 1, ts=NOW - 120)
    rec = accepted(core.ingest(up("dev-a"), data, NOW))
    assert (rec.device_id, rec.seq, rec.kind, rec.ts, rec.recv_ms) == ("dev-a", 1, "telemetry", NOW - 120, NOW)
    assert rec.body == BODY
    assert rec.body_json == '{"lat":51.5,"lon":-0.12,"acc":4.0}'
    assert rec.raw == data
    assert not rec.skewed
    assert not rec.late
    assert core.skew_ms("dev-a") == 120
    assert core.counts.accepted == 1
    assert core.counts.total_rejected() == 0


def test_replay_is_rejected_with_its_verified_seq(core: IngestCore, dev_a: KeySigner) -> None:
    data = envelope(dev_a, 7)
    accepted(core.ingest(up("dev-a"), data, NOW))
    again = rejected(core.ingest(up("dev-a"), data, NOW + 5))
    assert (again.reason, again.sender, again.seq) == ("replayed", "dev-a", 7)
    assert core.counts.rejected["replayed"] == 1


def test_seq_older_than_the_window_is_accepted_as_late(core: IngestCore, dev_a: KeySigner) -> None:
    accepted(core.ingest(up("dev-a"), envelope(dev_a, 500), NOW))
    late = accepted(core.ingest(up("dev-a"), envelope(dev_a, 3), NOW))
    assert late.late
    again = accepted(core.ingest(up("dev-a"), envelope(dev_a, 3), NOW))  # the store will call it replayed
    assert again.late
    assert core.counts.late == 2


def test_gap_is_reported_on_the_record(core: IngestCore, dev_a: KeySigner) -> None:
    accepted(core.ingest(up("dev-a"), envelope(dev_a, 1), NOW))
    rec = accepted(core.ingest(up("dev-a"), envelope(dev_a, 4), NOW))
    assert rec.gap == (2, 3)
    assert core.counts.gaps == 1


def test_skewed_message_is_flagged(core: IngestCore, dev_a: KeySigner) -> None:
    rec = accepted(core.ingest(up("dev-a"), envelope(dev_a, 1, ts=NOW + 30_000), NOW))
    assert rec.skewed


def test_seeded_core_does_not_report_history_as_a_gap(core: IngestCore, dev_a: KeySigner) -> None:
    core.seed("dev-a", 41)
    rec = accepted(core.ingest(up("dev-a"), envelope(dev_a, 42), NOW))
    assert rec.gap is None
    assert core.highest("dev-a") == 42


def _truncated(signer: KeySigner) -> bytes:
    data = envelope(signer, 1)
    return data[: len(data) // 2]


def oversized(signer: KeySigner, seq: int = 1) -> bytes:
    """A correctly signed COSE_Sign1 past the size limit (`seal` refuses to make one)."""
    protected = cbor2.dumps({1: signer.alg, 4: signer.kid.encode()})
    body = {**BODY, "sensors": {"blob": "x" * (MAX_ENVELOPE_BYTES + 10)}}
    payload = Message(signer.kid, seq, NOW, "telemetry", body).payload()
    signature = signer.sign_bytes(cbor2.dumps(["Signature1", protected, b"", payload]))
    return cbor2.dumps(cbor2.CBORTag(18, [protected, {}, payload, signature]))


def _forged(signer: KeySigner) -> bytes:
    return seal(Message("dev-a", 1, NOW, "telemetry", BODY), KeySigner("dev-a", new_key()))


def _other_key_same_kid(pki: Pki) -> bytes:
    other = signer_for(pki.identity("dev-b"))
    return seal(Message("dev-a", 1, NOW, "telemetry", BODY), KeySigner("dev-a", other.key))


def _bad_body(signer: KeySigner) -> bytes:
    return envelope(signer, 1, body={"lat": 91.0, "lon": 0.0})


def _not_cose(_signer: KeySigner) -> bytes:
    return cbor2.dumps({"id": "dev-a", "seq": 1})


def _unknown_algorithm(signer: KeySigner) -> bytes:
    tag = cbor2.loads(envelope(signer, 1))
    protected = cbor2.dumps({1: -999, 4: b"dev-a"})
    return cbor2.dumps(cbor2.CBORTag(18, [protected, {}, tag.value[2], tag.value[3]]))


BAD_INPUTS: list[tuple[str, str, Callable[[KeySigner], bytes]]] = [
    ("random bytes", "malformed", lambda _s: os.urandom(300)),
    ("empty", "malformed", lambda _s: b""),
    ("truncated envelope", "malformed", _truncated),
    ("not a COSE_Sign1", "malformed", _not_cose),
    ("body outside the data model", "malformed", _bad_body),
    ("too large", "too_large", oversized),
    ("forged with a stranger's key", "bad_signature", _forged),
    ("unknown algorithm", "bad_algorithm", _unknown_algorithm),
]


@pytest.mark.parametrize(("name", "reason", "make"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_rejected_by_reason(
    core: IngestCore, dev_a: KeySigner, name: str, reason: str, make: Callable[[KeySigner], bytes]
) -> None:
    result = rejected(core.ingest(up("dev-a"), make(dev_a), NOW))
    assert result.reason == reason, f"{name}: {result}"
    assert core.counts.rejected[reason] == 1
    assert core.counts.accepted == 0


def test_another_devices_key_under_my_kid_is_a_bad_signature(core: IngestCore, pki: Pki) -> None:
    assert rejected(core.ingest(up("dev-a"), _other_key_same_kid(pki), NOW)).reason == "bad_signature"


def test_unknown_sender(core: IngestCore) -> None:
    ghost = KeySigner("ghost-7", new_key())
    result = rejected(core.ingest(up("ghost-7"), envelope(ghost, 1), NOW))
    assert (result.reason, result.sender) == ("unknown_sender", "ghost-7")


def test_operator_may_not_send_uplink(core: IngestCore, pki: Pki) -> None:
    operator = signer_for(pki.identity("operator-1"))
    assert rejected(core.ingest(up("operator-1"), envelope(operator, 1), NOW)).reason == "wrong_role"


@pytest.mark.parametrize("topic", ["bl/v1/dev-b/up/telemetry", "bl/v1/dev-a/up/event"])
def test_topic_mismatch(core: IngestCore, dev_a: KeySigner, topic: str) -> None:
    assert rejected(core.ingest(topic, envelope(dev_a, 1), NOW)).reason == "topic_mismatch"


@pytest.mark.parametrize("topic", ["bl/v1/dev-a/down/cmd", "bl/v1/dev-a/up/bogus", "other/topic", ""])
def test_wrong_topic_is_malformed(core: IngestCore, dev_a: KeySigner, topic: str) -> None:
    assert rejected(core.ingest(topic, envelope(dev_a, 1), NOW)).reason in {"malformed", "topic_mismatch"}


def test_revoked_sender_is_rejected_after_refresh(pki: Pki, issue: Callable[[Role, str], Identity]) -> None:
    ident = issue(Role.DEVICE, "dev-core-revoked")
    signer = signer_for(ident)
    registry = KeyRegistry(pki)
    core = IngestCore(registry)
    accepted(core.ingest(up(ident.id), envelope(signer, 1), NOW))
    pki.revoke(ident.id)
    assert registry.refresh()
    result = rejected(core.ingest(up(ident.id), envelope(signer, 2), NOW))
    assert (result.reason, result.sender) == ("revoked", ident.id)


def test_counts_list_every_reason(core: IngestCore) -> None:
    assert set(core.counts.rejected) == set(REASONS)
    core.ingest("bl/v1/dev-a/up/telemetry", b"\xff", NOW)
    assert sum(core.counts.rejected.values()) == 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(topic=st.sampled_from(["bl/v1/dev-a/up/telemetry", "bl/v1/dev-a/up/status", "x"]), data=st.binary(max_size=600))
def test_garbage_never_raises(core: IngestCore, topic: str, data: bytes) -> None:
    assert isinstance(core.ingest(topic, data, NOW), Rejection)


# -- nothing accepted twice, nothing valid lost -----------------------------------
@cache
def _presigned(root: str) -> dict[int, bytes]:
    signer = signer_for(Pki(Path(root)).identity("dev-b"))
    return {seq: envelope(signer, seq) for seq in range(1, 151)}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seqs=st.lists(st.integers(min_value=1, max_value=150), min_size=1, max_size=200),
    batch=st.integers(min_value=1, max_value=40),
)
def test_any_order_with_duplicates_is_stored_exactly_once(pki: Pki, seqs: list[int], batch: int) -> None:
    """Through the core (window of 16, so many arrive late) and the store's unique key:
    each seq stored once, every duplicate counted `replayed`, every stored seq receipted."""
    messages = _presigned(str(pki.root))
    core = IngestCore(KeyRegistry(pki), window=16)
    with tempfile.TemporaryDirectory() as tmp, Store.open(Path(tmp) / "gw.db") as store:
        receipted: set[int] = set()
        for start in range(0, len(seqs), batch):
            records, replayed, counts = [], [], dict.fromkeys(REASONS, 0)
            for seq in seqs[start : start + batch]:
                result = core.ingest(up("dev-b"), messages[seq], NOW)
                if isinstance(result, Accepted):
                    records.append(result)
                else:
                    assert result.reason == "replayed"
                    counts["replayed"] += 1
                    replayed.append(("dev-b", seq))
            out = store.write_batch(records, rejected=counts, replayed=replayed)
            receipted.update(out.receipts.get("dev-b", []))
        stored = [m["seq"] for m in store.messages("dev-b", limit=1000)]
        stats = store.stats()
    assert stored == sorted(set(seqs))
    assert stats["accepted"] == len(set(seqs))
    assert stats["rejected"]["replayed"] == len(seqs) - len(set(seqs))
    assert receipted == set(seqs)


def test_route_keeps_a_sender_on_one_worker() -> None:
    assert route("bl/v1/dev-a/up/telemetry", 3) == route("bl/v1/dev-a/up/status", 3)
    assert {route(f"bl/v1/dev-{i}/up/event", 2) for i in range(20)} == {0, 1}
    assert route("garbage", 4) == 0


# -- tail's line format ----------------------------------------------------------------
def test_tail_lines() -> None:
    ts = 1_700_000_000_123  # 2023-11-14T22:13:20.123Z
    assert clock(ts) == "22:13:20.123"
    line = message_line(Message("dev-a", 12, ts, "telemetry", {"lon": 2, "lat": 1}))
    assert line == '22:13:20.123 dev-a #12 telemetry {"lat":1,"lon":2}'
    huge = message_line(Message("dev-a", 1, ts, "event", {"type": "x", "n": 2**70}))
    assert huge.endswith('{"n":1180591620717411303424,"type":"x"}')
    assert rejection_line("bl/v1/x/up/event", Rejected("boom")) == "REJECTED rejected bl/v1/x/up/event: boom"


# -- settings --------------------------------------------------------------------------
def test_settings_from_file_env_and_overrides(pki: Pki, tmp_path: Path) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(f'[gateway]\npki_dir = "{pki.root}"\nbroker = "localhost:8883"\nbatch_size = 100\n')
    s = load_settings(
        config,
        environ={"BLUELIGHT_GATEWAY_DB_PATH": str(tmp_path / "gw.db"), "BLUELIGHT_GATEWAY_HTTP_PORT": "9443"},
        overrides={"batch_size": None, "skew_bound_ms": 500},
    )
    assert (s.batch_size, s.http_port, s.skew_bound_ms, s.db_path) == (100, 9443, 500, tmp_path / "gw.db")
    assert (s.broker_host, s.broker_port, s.http_host) == ("localhost", 8883, "127.0.0.1")


@pytest.mark.parametrize(
    ("values", "hint"),
    [
        ({}, "missing --pki"),
        ({"http_port": "many"}, "http_port must be an integer"),
        ({"http_port": 70000}, "http_port must be in"),
        ({"broker": "nohost"}, "--broker must be HOST:PORT"),
        ({"gateway_id": "bad id"}, "invalid id"),
        ({"mqtt_protocol": "4"}, "mqtt_protocol must be one of"),
        ({"queue_bound": 10}, "queue_bound must be in"),
        ({"surprise": 1}, "unknown [gateway] setting"),
    ],
)
def test_bad_settings_are_refused(pki: Pki, tmp_path: Path, values: dict[str, Any], hint: str) -> None:
    base: dict[str, Any] = {"pki_dir": pki.root, "broker": "localhost:1", "db_path": tmp_path / "d"} if values else {}
    with pytest.raises(ConfigError, match=hint.replace("[", r"\[")):
        load_settings(None, environ={}, overrides={**base, **values})


def test_settings_refuse_a_missing_identity(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(BluelightError, match="no certificate for 'gw-x'"):
        load_settings(None, environ={}, overrides={
            "pki_dir": pki.root, "broker": "localhost:1", "db_path": tmp_path / "d", "gateway_id": "gw-x",
        })
    assert GatewaySettings(pki_dir=pki.root, broker="h:1", db_path=tmp_path / "d").gateway_id == "gateway"


def test_the_two_ingest_lanes_read_every_uplink_kind_exactly_once() -> None:
    lanes = [lane_filters("grp", BULK_KINDS), lane_filters("grp", URGENT_KINDS)]
    assert lanes[1] == ["$share/grp/bl/v1/+/up/event", "$share/grp/bl/v1/+/up/ack"]
    kinds = [f.rpartition("/")[2] for lane in lanes for f in lane]
    assert sorted(kinds) == sorted(UP_KINDS)


def test_a_verify_worker_decides_an_urgent_batch_before_finishing_a_bulk_one(pki: Pki, dev_a: KeySigner) -> None:
    settings = GatewaySettings(pki_dir=pki.root, broker="h:1", db_path=Path("unused.db"))
    bulk = [(up("dev-a"), envelope(dev_a, seq), NOW) for seq in range(1, 1201)]
    alarm = [(up("dev-a", "event"), envelope(dev_a, 1201, kind="event", body={"type": "panic"}), NOW)]
    (bulk_here, bulk_there), (urgent_here, urgent_there) = multiprocessing.Pipe(), multiprocessing.Pipe()
    worker = threading.Thread(target=_serve, args=(bulk_there, urgent_there, settings, {}), daemon=True)
    worker.start()
    assert bulk_here.recv() == "ready"
    bulk_here.send(bulk)
    urgent_here.send(alarm)
    assert urgent_here.poll(10)
    answer = urgent_here.recv()
    assert [(r.device_id, r.seq, r.kind) for r in answer.records] == [("dev-a", 1201, "event")]
    assert not bulk_here.poll(0)  # 1,200 signature checks are still being made
    decided = bulk_here.recv()
    assert [r.seq for r in decided.records] == list(range(1, 1201))
    assert not decided.rejected  # overtaken telemetry is late at most, never refused
    bulk_here.send(None)
    worker.join(5)
    assert not worker.is_alive()


async def test_the_gateways_own_sequence_numbers_never_repeat_across_reserved_blocks(pki: Pki, tmp_path: Path) -> None:
    settings = GatewaySettings(pki_dir=pki.root, broker="h:1", db_path=tmp_path / "gw.db")
    with Store.open(settings.db_path) as store:
        ingest = Ingest(settings, store, tls_context=ssl.create_default_context(),
                        signer=signer_for(pki.identity("gateway")))
        ingest._db_thread = ThreadPoolExecutor(1)
        try:
            sizes = [1, 7, 500, 3, SEQ_BLOCK + 5, 250, 1] * 40  # receipt rounds and single alerts, concurrently
            firsts = await asyncio.gather(*(ingest._take_seqs(n) for n in sizes))
        finally:
            ingest._db_thread.shutdown(wait=True)
    taken = [seq for first, n in zip(firsts, sizes, strict=True) for seq in range(first, first + n)]
    assert len(taken) == len(set(taken)) == sum(sizes)
    assert min(taken) >= 1
