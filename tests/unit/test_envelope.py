"""The signed envelope (COSE_Sign1) and the receiver's full check, `verify_message`.

Pure and fast: keys are generated once per module; the key lookup is a dict.
pycose 1.1 is used as an independent COSE implementation in both directions.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from pycose.algorithms import EdDSA, Es256
from pycose.headers import KID, Algorithm
from pycose.keys.curves import P256, Ed25519
from pycose.keys.ec2 import EC2Key
from pycose.keys.okp import OKPKey
from pycose.messages.sign1message import Sign1Message

from edge_agent.wire.envelope import (
    ALG_EDDSA,
    ALG_ES256,
    ALG_ML_DSA_44,
    COSE_SIGN1_TAG,
    MAX_ENVELOPE_BYTES,
    Envelope,
    KeySigner,
    Message,
    PrivateKey,
    PublicKey,
    decode_payload,
    open_envelope,
    seal,
)
from edge_agent.wire.errors import (
    REASONS,
    BadSignature,
    Malformed,
    Rejected,
    TooLarge,
    TopicMismatch,
    UnknownSender,
    UnsupportedAlgorithm,
    WrongRole,
)
from edge_agent.wire.ids import Role
from edge_agent.wire.model import receipt_body
from edge_agent.wire.verify import verify_message

DOCS = Path(__file__).resolve().parents[2] / "docs"

# -- keys and a pure key lookup -------------------------------------------------------

ES256_A = ec.generate_private_key(ec.SECP256R1())
ES256_B = ec.generate_private_key(ec.SECP256R1())
EDDSA_A = ed25519.Ed25519PrivateKey.generate()
MLDSA_A = mldsa.MLDSA44PrivateKey.generate()
GATEWAY = ec.generate_private_key(ec.SECP256R1())

KEYS_BY_ALG: dict[str, PrivateKey] = {"ES256": ES256_A, "EdDSA": EDDSA_A, "ML-DSA-44": MLDSA_A}

DEVICE = frozenset({Role.DEVICE, Role.OFFICER})
GATEWAY_ONLY = frozenset({Role.GATEWAY})


class Keys:
    """A `KeyLookup` over a dict: id -> (role, public key)."""

    def __init__(self, entries: dict[str, tuple[Role, PublicKey]]) -> None:
        self.entries = entries

    def key_for(self, kid: str, roles: frozenset[Role]) -> PublicKey:
        if kid not in self.entries:
            raise UnknownSender("no certificate registered for this id", sender=kid)
        role, key = self.entries[kid]
        if role not in roles:
            raise WrongRole(f"role {role.value} may not send this", sender=kid)
        return key


KEYS = Keys(
    {
        "dev-a": (Role.DEVICE, ES256_A.public_key()),
        "dev-b": (Role.DEVICE, ES256_B.public_key()),
        "gateway": (Role.GATEWAY, GATEWAY.public_key()),
    }
)


def _sealed(
    body: dict[str, Any] | None = None,
    *,
    sender: str = "dev-a",
    key: PrivateKey = ES256_A,
    kind: str = "telemetry",
    seq: int = 1,
) -> bytes:
    body = {"lat": 51.5, "lon": -0.12} if body is None else body
    return seal(Message(sender, seq, 1_767_225_600_000, kind, body), KeySigner(sender, key))


def _hand_built(protected: dict[int, Any], payload: dict[str, Any], key: PrivateKey) -> bytes:
    """A COSE_Sign1 built without `seal`, so headers and payload can disagree."""
    prot = cbor2.dumps(protected)
    pay = cbor2.dumps(payload)
    signature = KeySigner("x", key).sign_bytes(cbor2.dumps(["Signature1", prot, b"", pay]))
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [prot, {}, pay, signature]))


def _payload(sender: str = "dev-a", kind: str = "telemetry", body: dict[str, Any] | None = None) -> dict[str, Any]:
    body = {"lat": 51.5, "lon": -0.12} if body is None else body
    return {"id": sender, "seq": 7, "ts": 1_767_225_600_000, "kind": kind, "body": body}


def _envelope(parts: list[Any], tag: int = COSE_SIGN1_TAG) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(tag, parts))


# -- strategies -----------------------------------------------------------------------

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)
json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
bodies = st.dictionaries(st.text(max_size=10), json_values, max_size=6)
messages = st.builds(
    Message,
    sender=ids,
    seq=st.integers(min_value=1),
    ts=st.integers(min_value=0),
    kind=st.text(min_size=1, max_size=16),
    body=bodies,
)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- round trip -----------------------------------------------------------------------


@pytest.mark.parametrize("alg", sorted(KEYS_BY_ALG))
@FAST
@given(message=messages)
def test_seal_open_verify_round_trips(alg: str, message: Message) -> None:
    assume(_depth(message.body) <= 16)
    key = KEYS_BY_ALG[alg]
    data = seal(message, KeySigner(message.sender, key))
    envelope = open_envelope(data)
    assert envelope.kid == message.sender
    assert envelope.verify(key.public_key()) == message


def test_round_trip_accepts_bytearray_and_memoryview() -> None:
    data = _sealed()
    for view in (bytearray(data), memoryview(data)):
        envelope = open_envelope(view)  # type: ignore[arg-type]
        assert envelope.verify(ES256_A.public_key()).seq == 1


def test_alg_header_follows_the_key() -> None:
    assert open_envelope(_sealed(key=ES256_A)).alg == ALG_ES256 == -7
    assert open_envelope(_sealed(key=EDDSA_A)).alg == ALG_EDDSA == -8
    assert open_envelope(_sealed(key=MLDSA_A)).alg == ALG_ML_DSA_44 == -48


def test_structure_is_tagged_cose_sign1_with_the_documented_headers() -> None:
    outer = cbor2.loads(_sealed())
    assert isinstance(outer, cbor2.CBORTag)
    assert outer.tag == 18
    protected, unprotected, payload, signature = outer.value
    assert cbor2.loads(protected) == {1: -7, 4: b"dev-a"}
    assert unprotected == {}
    assert set(cbor2.loads(payload)) == {"id", "seq", "ts", "kind", "body"}
    assert len(signature) == 64


def test_es256_signature_is_64_raw_bytes_r_then_s() -> None:
    """RFC 9053 2.1: ES256 signatures are r || s, 32 bytes each, big-endian (not DER)."""
    for _ in range(20):
        protected, _, payload, signature = cbor2.loads(_sealed()).value
        assert len(signature) == 64
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        tbs = cbor2.dumps(["Signature1", protected, b"", payload])
        ES256_A.public_key().verify(encode_dss_signature(r, s), tbs, ec.ECDSA(hashes.SHA256()))


def test_seal_refuses_to_sign_for_another_sender() -> None:
    with pytest.raises(ValueError, match="cannot sign"):
        seal(Message("dev-b", 1, 0, "telemetry", {}), KeySigner("dev-a", ES256_A))


def test_ec_keys_other_than_p256_are_not_accepted() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(UnsupportedAlgorithm):
        seal(Message("dev-a", 1, 0, "telemetry", {}), KeySigner("dev-a", p384))
    with pytest.raises(UnsupportedAlgorithm):
        open_envelope(_sealed()).verify(p384.public_key())


@pytest.mark.parametrize(
    ("field", "value"),
    [("seq", 0), ("seq", -1), ("seq", True), ("seq", 1.0), ("ts", -1), ("ts", False), ("kind", ""), ("body", [])],
)
def test_message_rejects_bad_fields(field: str, value: Any) -> None:
    fields: dict[str, Any] = {"sender": "dev-a", "seq": 1, "ts": 0, "kind": "telemetry", "body": {}}
    fields[field] = value
    with pytest.raises(ValueError, match=field):
        Message(**fields)


# -- tampering --------------------------------------------------------------------------


@pytest.mark.parametrize("alg", sorted(KEYS_BY_ALG))
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_any_flipped_bit_fails_verification(alg: str, data: st.DataObject) -> None:
    key = KEYS_BY_ALG[alg]
    sealed = _sealed(key=key)
    index = data.draw(st.integers(0, len(sealed) - 1), label="index")
    bit = data.draw(st.integers(0, 7), label="bit")
    flipped = bytearray(sealed)
    flipped[index] ^= 1 << bit
    with pytest.raises(Rejected):
        open_envelope(bytes(flipped)).verify(key.public_key())
    keys = Keys({"dev-a": (Role.DEVICE, key.public_key())})
    with pytest.raises(Rejected):
        verify_message("bl/v1/dev-a/up/telemetry", bytes(flipped), keys, DEVICE)


def test_wrong_key_is_bad_signature() -> None:
    with pytest.raises(BadSignature):
        open_envelope(_sealed(key=ES256_A)).verify(ES256_B.public_key())
    with pytest.raises(BadSignature):
        open_envelope(_sealed(key=EDDSA_A)).verify(ed25519.Ed25519PrivateKey.generate().public_key())
    with pytest.raises(BadSignature):
        open_envelope(_sealed(key=MLDSA_A)).verify(mldsa.MLDSA44PrivateKey.generate().public_key())


@pytest.mark.parametrize(
    ("signer", "verifier"),
    [
        (ES256_A, EDDSA_A),
        (ES256_A, MLDSA_A),
        (EDDSA_A, ES256_A),
        (EDDSA_A, MLDSA_A),
        (MLDSA_A, ES256_A),
        (MLDSA_A, EDDSA_A),
    ],
)
def test_key_of_another_algorithm_is_bad_signature(signer: PrivateKey, verifier: PrivateKey) -> None:
    with pytest.raises(BadSignature, match="does not match"):
        open_envelope(_sealed(key=signer)).verify(verifier.public_key())


def test_alg_header_swapped_to_match_another_key_is_bad_signature() -> None:
    """Relabel an ES256 envelope as EdDSA: the header is signed, so nothing verifies."""
    outer = cbor2.loads(_sealed(key=ES256_A))
    _, unprotected, payload, signature = outer.value
    relabelled = cbor2.dumps({1: ALG_EDDSA, 4: b"dev-a"})
    data = _envelope([relabelled, unprotected, payload, signature])
    with pytest.raises(BadSignature):
        open_envelope(data).verify(EDDSA_A.public_key())


def test_wrong_kid_on_the_signers_topic_is_topic_mismatch() -> None:
    """Signed by A with kid B, published on A's topic: kid disagrees with the topic."""
    data = _hand_built({1: ALG_ES256, 4: b"dev-b"}, _payload("dev-a"), ES256_A)
    with pytest.raises(TopicMismatch):
        verify_message("bl/v1/dev-a/up/telemetry", data, KEYS, DEVICE)


def test_wrong_kid_on_the_claimed_topic_is_bad_signature() -> None:
    """Signed by A with kid B, published on B's topic: B's key does not verify it."""
    for sender in ("dev-a", "dev-b"):
        data = _hand_built({1: ALG_ES256, 4: b"dev-b"}, _payload(sender), ES256_A)
        with pytest.raises(BadSignature):
            verify_message("bl/v1/dev-b/up/telemetry", data, KEYS, DEVICE)


def test_payload_id_differs_from_kid_is_topic_mismatch() -> None:
    """B signs honestly as B, but the payload claims to be from A."""
    data = _hand_built({1: ALG_ES256, 4: b"dev-b"}, _payload("dev-a"), ES256_B)
    with pytest.raises(TopicMismatch, match="payload id"):
        verify_message("bl/v1/dev-b/up/telemetry", data, KEYS, DEVICE)


def test_valid_message_on_another_identitys_topic_is_topic_mismatch() -> None:
    with pytest.raises(TopicMismatch):
        verify_message("bl/v1/dev-b/up/telemetry", _sealed(sender="dev-a"), KEYS, DEVICE)


@pytest.mark.parametrize("topic_kind", ["event", "status", "ack"])
def test_payload_kind_differs_from_topic_kind_is_topic_mismatch(topic_kind: str) -> None:
    with pytest.raises(TopicMismatch, match="kind"):
        verify_message(f"bl/v1/dev-a/up/{topic_kind}", _sealed(kind="telemetry"), KEYS, DEVICE)


def test_unknown_sender_and_wrong_role_come_from_the_key_lookup() -> None:
    data = _hand_built({1: ALG_ES256, 4: b"dev-z"}, _payload("dev-z"), ES256_A)
    with pytest.raises(UnknownSender):
        verify_message("bl/v1/dev-z/up/telemetry", data, KEYS, DEVICE)
    with pytest.raises(WrongRole):
        verify_message("bl/v1/dev-a/up/telemetry", _sealed(), KEYS, GATEWAY_ONLY)


def test_valid_message_verifies_and_invalid_body_is_malformed() -> None:
    message = verify_message("bl/v1/dev-a/up/telemetry", _sealed(), KEYS, DEVICE)
    assert (message.sender, message.seq, message.kind) == ("dev-a", 1, "telemetry")
    with pytest.raises(Malformed, match=r"telemetry\.lat"):
        verify_message("bl/v1/dev-a/up/telemetry", _sealed({"lon": 0}), KEYS, DEVICE)


def test_checks_run_in_the_documented_order() -> None:
    """docs/protocol.md: topic, size, structure, alg, kid vs topic, key, signature,
    payload id, kind, body."""
    sealed = _sealed()
    too_big = b"\x00" * (MAX_ENVELOPE_BYTES + 1)
    with pytest.raises(Malformed, match="topic"):
        verify_message("bl/v1/+/up/telemetry", too_big, KEYS, DEVICE)
    with pytest.raises(TooLarge):
        verify_message("bl/v1/dev-a/up/telemetry", too_big, KEYS, DEVICE)
    with pytest.raises(TopicMismatch):
        verify_message("bl/v1/dev-b/up/event", sealed, Keys({}), DEVICE)
    with pytest.raises(UnknownSender):
        verify_message("bl/v1/dev-a/up/event", sealed, Keys({}), DEVICE)
    forged = bytearray(sealed)
    forged[-1] ^= 1
    with pytest.raises(BadSignature):
        verify_message("bl/v1/dev-a/up/event", bytes(forged), KEYS, DEVICE)
    bad_body_wrong_kind = _sealed({"lat": 91, "lon": 0})
    with pytest.raises(TopicMismatch):
        verify_message("bl/v1/dev-a/up/event", bad_body_wrong_kind, KEYS, DEVICE)


def test_every_rejection_has_a_distinct_documented_reason() -> None:
    assert len(set(REASONS)) == len(REASONS) == 10
    assert set(REASONS) == {
        "malformed",
        "too_large",
        "bad_algorithm",
        "bad_signature",
        "unknown_sender",
        "revoked",
        "expired",
        "wrong_role",
        "topic_mismatch",
        "replayed",
    }
    protocol = (DOCS / "protocol.md").read_text()
    for reason in REASONS:
        assert f"`{reason}`" in protocol


# -- down topics: receipts from the gateway ---------------------------------------------


def test_gateway_receipt_on_a_device_down_topic_verifies() -> None:
    """The receipt contract: the gateway signs (kid = gateway) a `cmd` published on
    `bl/v1/<device>/down/cmd`; the agent verifies it with roles {gateway}. On a down
    topic the topic id names the recipient, not the signer."""
    receipt = _sealed(receipt_body([1, 2, 3, 5]), sender="gateway", key=GATEWAY, kind="cmd")
    message = verify_message("bl/v1/dev-a/down/cmd", receipt, KEYS, GATEWAY_ONLY)
    assert message.sender == "gateway"
    assert message.body == {"type": "receipt", "ranges": [[1, 3], [5, 5]]}


def test_device_signed_cmd_on_a_down_topic_is_refused() -> None:
    forged = _sealed({"type": "receipt", "ranges": [[1, 99]]}, sender="dev-a", kind="cmd")
    with pytest.raises(WrongRole):
        verify_message("bl/v1/dev-a/down/cmd", forged, KEYS, GATEWAY_ONLY)
    forged_b = _sealed({"type": "receipt", "ranges": [[1, 99]]}, sender="dev-b", key=ES256_B, kind="cmd")
    with pytest.raises(Rejected):
        verify_message("bl/v1/dev-a/down/cmd", forged_b, KEYS, GATEWAY_ONLY)


# -- malformed input ------------------------------------------------------------------


MALFORMED_EXAMPLES = [
    b"",
    b"\xd2",
    b"\xd2\x84",
    b"\xa0",
    cbor2.dumps([b"", {}, b"", b""]),
    _envelope([b"", {}, b"", b""], tag=98),
    _envelope([b"\xa0", {}, b""]),
    _envelope([b"\xa0", {}, b"", b"", b""]),
    _envelope(["x", {}, b"", b""]),
    _envelope([b"\xa0", [], b"", b""]),
    _envelope([b"\xff", {}, b"", b""]),
    _envelope([cbor2.dumps([1, 2]), {}, b"", b""]),
    _envelope([cbor2.dumps({1: -7}), {}, b"", b""]),
    _envelope([cbor2.dumps({1: -7, 4: "dev-a"}), {}, b"", b""]),
    _envelope([cbor2.dumps({1: -7, 4: b"dev/a"}), {}, b"", b""]),
    _envelope([cbor2.dumps({1: -7, 4: b"\xff\xfe"}), {}, b"", b""]),
]


@pytest.mark.parametrize("data", MALFORMED_EXAMPLES)
def test_structural_errors_are_malformed(data: bytes) -> None:
    with pytest.raises(Malformed):
        open_envelope(data)


def test_non_bytes_input_is_malformed() -> None:
    with pytest.raises(Malformed):
        open_envelope("d284")  # type: ignore[arg-type]


@pytest.mark.parametrize("alg", [None, -35, -257, 0, 1, "ES256", b"\x26", -7.5])
def test_unknown_algorithm_is_unsupported(alg: Any) -> None:
    header: dict[int, Any] = {4: b"dev-a"} if alg is None else {1: alg, 4: b"dev-a"}
    with pytest.raises(UnsupportedAlgorithm):
        open_envelope(_envelope([cbor2.dumps(header), {}, b"", b""]))


@pytest.mark.parametrize("alg", [[-7], {"x": 1}, -7.0, True])
def test_alg_of_a_non_integer_type_is_unsupported(alg: Any) -> None:
    """COSE alg values are integers here. An unhashable alg (a CBOR array or map) must
    be rejected like any unknown alg, not raise TypeError; -7.0 is not ES256."""
    data = _envelope([cbor2.dumps({1: alg, 4: b"dev-a"}), {}, b"", b""])
    with pytest.raises(UnsupportedAlgorithm):
        open_envelope(data)


def test_oversized_envelope_is_too_large_before_decoding() -> None:
    with pytest.raises(TooLarge):
        open_envelope(b"\xff" * (MAX_ENVELOPE_BYTES + 1))
    # A signer refuses to produce one; a hostile sender can still send one.
    with pytest.raises(ValueError, match="limit"):
        _sealed({"lat": 0, "lon": 0, "pad": "x" * MAX_ENVELOPE_BYTES})
    fields = {"id": "dev-a", "seq": 1, "ts": 0, "kind": "telemetry", "body": {"pad": "x" * MAX_ENVELOPE_BYTES}}
    big = cbor2.dumps(cbor2.CBORTag(18, [cbor2.dumps({1: -7, 4: b"dev-a"}), {}, cbor2.dumps(fields), b"\0" * 64]))
    assert len(big) > MAX_ENVELOPE_BYTES
    with pytest.raises(TooLarge):
        open_envelope(big)
    with pytest.raises(Malformed):
        open_envelope(b"\xff" * MAX_ENVELOPE_BYTES)


def test_envelope_just_under_the_limit_verifies() -> None:
    base = len(_sealed({"pad": ""}))
    data = _sealed({"pad": "x" * (MAX_ENVELOPE_BYTES - base - 8)})
    assert len(data) <= MAX_ENVELOPE_BYTES
    assert open_envelope(data).verify(ES256_A.public_key()).sender == "dev-a"


def test_trailing_bytes_after_the_envelope_are_malformed() -> None:
    """An envelope is one CBOR data item (RFC 8949 5.1): bytes after it make the
    input not well-formed, so one signed message has exactly one accepted encoding."""
    with pytest.raises(Malformed):
        open_envelope(_sealed() + b"\x00")


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff",
        cbor2.dumps([1, 2]),
        cbor2.dumps({"id": "dev-a", "seq": 1, "ts": 0, "kind": "telemetry"}),
        cbor2.dumps({"id": "dev-a", "seq": 0, "ts": 0, "kind": "telemetry", "body": {}}),
        cbor2.dumps({"id": "dev/a", "seq": 1, "ts": 0, "kind": "telemetry", "body": {}}),
        cbor2.dumps({"id": "dev-a", "seq": 1, "ts": 0, "kind": "telemetry", "body": []}),
        cbor2.dumps({"id": "dev-a", "seq": 1, "ts": 0, "kind": "telemetry", "body": {"x": b"bytes"}}),
        cbor2.dumps({"id": "dev-a", "seq": 1, "ts": 0, "kind": "telemetry", "body": {"x": math.nan}}),
        cbor2.dumps({"id": "dev-a", "seq": 1, "ts": 0, "kind": "telemetry", "body": {1: "int key"}}),
        cbor2.dumps({"id": "dev-a", "seq": 1, "ts": 0, "kind": "telemetry", "body": {"t": cbor2.CBORTag(99, 1)}}),
    ],
)
def test_signed_but_malformed_payloads_are_malformed(payload: bytes) -> None:
    """A validly signed envelope whose payload is not a data-model message."""
    prot = cbor2.dumps({1: ALG_ES256, 4: b"dev-a"})
    signature = KeySigner("dev-a", ES256_A).sign_bytes(cbor2.dumps(["Signature1", prot, b"", payload]))
    envelope = open_envelope(_envelope([prot, {}, payload, signature]))
    with pytest.raises(Malformed):
        envelope.verify(ES256_A.public_key())


def test_deeply_nested_body_is_malformed() -> None:
    nested: Any = 1
    for _ in range(20):
        nested = [nested]
    with pytest.raises(Malformed):
        decode_payload(cbor2.dumps({"id": "dev-a", "seq": 1, "ts": 0, "kind": "event", "body": {"x": nested}}))


def _only_rejected(data: bytes) -> None:
    """Garbage must end in one of the envelope's own rejections, never another exception."""
    try:
        open_envelope(data).verify(ES256_A.public_key())
    except (Malformed, TooLarge, UnsupportedAlgorithm, BadSignature):
        return
    except Exception as exc:
        pytest.fail(f"{data.hex()} raised {type(exc).__module__}.{type(exc).__name__}, not a Rejected")
    pytest.fail(f"{data.hex()} was accepted")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
@example(cbor2.dumps(cbor2.CBORTag(30, [1, 0])))
@example(cbor2.dumps(cbor2.CBORTag(1, 10**30)))
@example(bytes.fromhex("d2") + bytes.fromhex("9bffffffffffffffff"))
@example(bytes.fromhex("5bffffffffffffffff"))
@example(cbor2.dumps(cbor2.CBORTag(5, [10**9, 1])))
@example(cbor2.dumps(cbor2.CBORTag(4, [10**9, 1])))
def test_random_bytes_only_raise_rejections(data: bytes) -> None:
    _only_rejected(data)
    _only_rejected(b"\xd2\x84" + data)
    _only_rejected(b"\xd2\x84\x4a\xa2\x01\x26\x04\x45dev-a\xa0" + data)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_truncations_are_malformed(data: st.DataObject) -> None:
    sealed = _sealed()
    cut = data.draw(st.integers(0, len(sealed) - 1))
    with pytest.raises(Malformed):
        open_envelope(sealed[:cut])


# -- independent implementation: pycose 1.1 --------------------------------------------


def _pycose_key(private: PrivateKey) -> EC2Key | OKPKey:
    public = private.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        numbers = public.public_numbers()
        return EC2Key(crv=P256, x=numbers.x.to_bytes(32, "big"), y=numbers.y.to_bytes(32, "big"))
    assert isinstance(public, ed25519.Ed25519PublicKey)
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return OKPKey(crv=Ed25519, x=raw)


@pytest.mark.parametrize(("private", "alg"), [(ES256_A, Es256), (EDDSA_A, EdDSA)])
def test_pycose_verifies_what_bluelight_seals(private: PrivateKey, alg: type) -> None:
    message = Message("dev-a", 9, 1_767_225_600_000, "event", {"type": "panic", "lat": 51.5, "lon": -0.12})
    decoded = Sign1Message.decode(seal(message, KeySigner("dev-a", private)))
    assert decoded.phdr == {Algorithm: alg, KID: b"dev-a"}
    assert decoded.uhdr == {}
    decoded.key = _pycose_key(private)
    assert decoded.verify_signature()
    assert decoded.payload is not None
    assert cbor2.loads(decoded.payload)["body"] == {"type": "panic", "lat": 51.5, "lon": -0.12}


def test_pycose_rejects_a_bluelight_envelope_with_a_flipped_payload_byte() -> None:
    outer = cbor2.loads(_sealed())
    protected, unprotected, payload, signature = outer.value
    tampered = bytearray(payload)
    tampered[-1] ^= 1
    decoded = Sign1Message.decode(_envelope([protected, unprotected, bytes(tampered), signature]))
    decoded.key = _pycose_key(ES256_A)
    assert not decoded.verify_signature()


def _pycose_sealed(private: PrivateKey, alg: type, payload: dict[str, Any]) -> bytes:
    numbers_key: EC2Key | OKPKey
    if isinstance(private, ec.EllipticCurvePrivateKey):
        d = private.private_numbers().private_value.to_bytes(32, "big")
        numbers_key = EC2Key(crv=P256, d=d)
    else:
        assert isinstance(private, ed25519.Ed25519PrivateKey)
        raw = private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        numbers_key = OKPKey(crv=Ed25519, d=raw)
    msg = Sign1Message(phdr={Algorithm: alg, KID: b"dev-a"}, payload=cbor2.dumps(payload))
    msg.key = numbers_key
    encoded: bytes = msg.encode()
    return encoded


@pytest.mark.parametrize(("private", "alg"), [(ES256_A, Es256), (EDDSA_A, EdDSA)])
def test_bluelight_verifies_what_pycose_signs(private: PrivateKey, alg: type) -> None:
    payload = _payload("dev-a", "telemetry", {"lat": 51.5, "lon": -0.12, "fix": "3d"})
    data = _pycose_sealed(private, alg, payload)
    message = open_envelope(data).verify(private.public_key())
    assert message == Message("dev-a", 7, 1_767_225_600_000, "telemetry", payload["body"])
    keys = Keys({"dev-a": (Role.DEVICE, private.public_key())})
    assert verify_message("bl/v1/dev-a/up/telemetry", data, keys, DEVICE) == message


def test_pycose_signed_message_fails_with_the_wrong_key() -> None:
    data = _pycose_sealed(ES256_A, Es256, _payload())
    with pytest.raises(BadSignature):
        open_envelope(data).verify(ES256_B.public_key())


# -- the worked example in docs/protocol.md ----------------------------------------------


def _doc_block(name: str) -> str:
    text = (DOCS / "protocol.md").read_text()
    found = re.search(rf"<!-- example:{name} -->\s*```[a-z]*\n(.*?)```", text, re.DOTALL)
    assert found, f"docs/protocol.md lacks the {name} block"
    return found.group(1)


def test_the_documented_example_verifies() -> None:
    data = bytes.fromhex("".join(_doc_block("envelope").split()))
    public = serialization.load_pem_public_key(_doc_block("public-key").encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    envelope = open_envelope(data)
    assert isinstance(envelope, Envelope)
    message = envelope.verify(public)
    assert message.sender == "dev-a"
    assert message.kind == "telemetry"
    keys = Keys({"dev-a": (Role.DEVICE, public)})
    assert verify_message("bl/v1/dev-a/up/telemetry", data, keys, DEVICE) == message
    protected, _, payload, _ = cbor2.loads(data).value
    sig_structure = bytes.fromhex("".join(_doc_block("sig-structure").split()))
    assert sig_structure == cbor2.dumps(["Signature1", protected, b"", payload])


def test_the_documented_sender_code_makes_envelopes_bluelight_accepts() -> None:
    namespace: dict[str, Any] = {}
    exec(_doc_block("sender"), namespace)
    data = namespace["seal"](ES256_A, "dev-a", 5, 1_767_225_600_000, "status", {"state": "online"})
    message = verify_message("bl/v1/dev-a/up/status", data, KEYS, DEVICE)
    assert message == Message("dev-a", 5, 1_767_225_600_000, "status", {"state": "online"})
