"""The signed envelope: a tagged COSE_Sign1 (RFC 9052) over a CBOR payload.

    COSE_Sign1 = #6.18([protected: bstr .cbor {1: alg, 4: kid}, unprotected: {},
                        payload: bstr .cbor {"id", "seq", "ts", "kind", "body"},
                        signature: bstr])

The signature covers `["Signature1", protected, h'', payload]`. ES256 signatures are
raw `r || s` (64 bytes), as COSE requires. See docs/protocol.md.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from edge_agent.wire.errors import (
    BadSignature,
    Malformed,
    TooLarge,
    UnsupportedAlgorithm,
)
from edge_agent.wire.ids import InvalidId, check_id

COSE_SIGN1_TAG = 18
HEADER_ALG = 1
HEADER_KID = 4

ALG_ES256 = -7
ALG_EDDSA = -8
ALG_ML_DSA_44 = -48
ALG_NAMES = {ALG_ES256: "ES256", ALG_EDDSA: "EdDSA", ALG_ML_DSA_44: "ML-DSA-44"}

#: Largest envelope anyone accepts; a bigger one is rejected before decoding.
MAX_ENVELOPE_BYTES = 64 * 1024

_P256_BYTES = 32

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | mldsa.MLDSA44PrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | mldsa.MLDSA44PublicKey


@dataclass(frozen=True)
class Message:
    """One message of the data model, before signing or after verification."""

    sender: str
    seq: int
    ts: int
    kind: str
    body: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_id(self.sender)
        if not isinstance(self.seq, int) or isinstance(self.seq, bool) or self.seq < 1:
            raise ValueError(f"seq must be an integer >= 1, got {self.seq!r}")
        if not isinstance(self.ts, int) or isinstance(self.ts, bool) or self.ts < 0:
            raise ValueError(f"ts must be UTC milliseconds >= 0, got {self.ts!r}")
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError("kind must be a non-empty string")
        if not isinstance(self.body, Mapping):
            raise ValueError("body must be a map")

    def payload(self) -> bytes:
        """The CBOR payload bytes that get signed."""
        return cbor2.dumps(
            {"id": self.sender, "seq": self.seq, "ts": self.ts, "kind": self.kind, "body": dict(self.body)}
        )


class Signer(Protocol):
    """Signs for one identity; the key stays inside."""

    @property
    def kid(self) -> str: ...

    @property
    def alg(self) -> int: ...

    def sign_bytes(self, data: bytes) -> bytes: ...


@dataclass(frozen=True)
class KeySigner:
    """A `Signer` over an in-memory private key (P-256, Ed25519 or ML-DSA-44)."""

    kid: str
    key: PrivateKey

    @property
    def alg(self) -> int:
        return algorithm_for(self.key)

    def sign_bytes(self, data: bytes) -> bytes:
        if isinstance(self.key, ec.EllipticCurvePrivateKey):
            r, s = decode_dss_signature(self.key.sign(data, _ES256_HASH))
            return r.to_bytes(_P256_BYTES, "big") + s.to_bytes(_P256_BYTES, "big")
        return self.key.sign(data)


def algorithm_for(key: PrivateKey | PublicKey) -> int:
    """The COSE algorithm a key signs with; only P-256 among EC curves."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise UnsupportedAlgorithm(f"EC curve {key.curve.name} is not accepted; use P-256")
        return ALG_ES256
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return ALG_EDDSA
    if isinstance(key, mldsa.MLDSA44PrivateKey | mldsa.MLDSA44PublicKey):
        return ALG_ML_DSA_44
    raise UnsupportedAlgorithm(f"unsupported key type {type(key).__name__}")


_SIG1_PREFIX = b"\x84\x6aSignature1"  # array(4), text(10) "Signature1"
_ES256_HASH = ec.ECDSA(hashes.SHA256())


def _bstr_head(length: int) -> bytes:
    """The CBOR head of a byte string of `length` bytes (major type 2, shortest form)."""
    if length < 24:
        return bytes([0x40 | length])
    if length < 0x100:
        return bytes([0x58, length])
    if length < 0x10000:
        return b"\x59" + length.to_bytes(2, "big")
    return b"\x5a" + length.to_bytes(4, "big")


def _sig_structure(protected: bytes, payload: bytes) -> bytes:
    """`["Signature1", protected, h'', payload]`, encoded by hand: it is on every
    message's hot path and its encoding is fixed by RFC 9052."""
    return b"".join((_SIG1_PREFIX, _bstr_head(len(protected)), protected, b"\x40", _bstr_head(len(payload)), payload))


@functools.lru_cache(maxsize=8192)
def _protected_bytes(alg: int, kid: str) -> bytes:
    """The protected header of a sender: the same bytes on every message it sends."""
    return cbor2.dumps({HEADER_ALG: alg, HEADER_KID: kid.encode()})


#: Tag 18 (COSE_Sign1) and array(4): the head of every sealed message.
_SIGN1_HEAD = b"\xd2\x84"


def seal(message: Message, signer: Signer) -> bytes:
    """Sign `message` and return the tagged COSE_Sign1 bytes."""
    if signer.kid != message.sender:
        raise ValueError(f"signer {signer.kid!r} cannot sign for {message.sender!r}")
    protected = _protected_bytes(signer.alg, signer.kid)
    payload = message.payload()
    signature = signer.sign_bytes(_sig_structure(protected, payload))
    # 18([protected, {}, payload, signature]), encoded by hand as cbor2 would (shortest
    # heads): on every message's hot path.
    sealed = b"".join((
        _SIGN1_HEAD, _bstr_head(len(protected)), protected, b"\xa0",
        _bstr_head(len(payload)), payload, _bstr_head(len(signature)), signature,
    ))  # fmt: skip
    if len(sealed) > MAX_ENVELOPE_BYTES:
        raise ValueError(f"message is {len(sealed)} bytes sealed; the limit is {MAX_ENVELOPE_BYTES}")
    return sealed


@dataclass(frozen=True)
class Envelope:
    """A structurally valid COSE_Sign1 whose signature has not been checked yet."""

    alg: int
    kid: str
    protected: bytes
    payload: bytes
    signature: bytes

    def verify(self, key: PublicKey) -> Message:
        """Check the signature with `key` and decode the payload; raise `Rejected` subclasses."""
        if algorithm_for(key) != self.alg:
            raise BadSignature(
                f"header alg {ALG_NAMES.get(self.alg, self.alg)} does not match the sender's key",
                sender=self.kid,
            )
        tbs = _sig_structure(self.protected, self.payload)
        try:
            if isinstance(key, ec.EllipticCurvePublicKey):
                if len(self.signature) != 2 * _P256_BYTES:
                    raise InvalidSignature
                r = int.from_bytes(self.signature[:_P256_BYTES], "big")
                s = int.from_bytes(self.signature[_P256_BYTES:], "big")
                key.verify(encode_dss_signature(r, s), tbs, _ES256_HASH)
            else:
                key.verify(self.signature, tbs)
        except InvalidSignature:
            raise BadSignature("signature does not verify", sender=self.kid) from None
        return decode_payload(self.payload, sender=self.kid)


def _cbor_loads(data: bytes, what: str, sender: str | None = None) -> Any:
    """Decode exactly one CBOR item: trailing bytes would give one signed message two encodings."""
    stream = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(stream).decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, ArithmeticError, RecursionError, MemoryError) as exc:
        raise Malformed(f"{what} is not valid CBOR ({exc.__class__.__name__})", sender=sender) from None
    if stream.tell() != len(data):
        raise Malformed(f"{what} has {len(data) - stream.tell()} trailing bytes", sender=sender)
    return value


def open_envelope(data: bytes) -> Envelope:
    """Parse the COSE_Sign1 structure of `data` (no signature check yet)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise Malformed("envelope must be bytes")
    if len(data) > MAX_ENVELOPE_BYTES:
        raise TooLarge(f"envelope is {len(data)} bytes; the limit is {MAX_ENVELOPE_BYTES}")
    outer = _cbor_loads(bytes(data), "envelope")
    if not isinstance(outer, cbor2.CBORTag) or outer.tag != COSE_SIGN1_TAG:
        raise Malformed("envelope is not a tagged COSE_Sign1 (tag 18)")
    parts = outer.value
    if not isinstance(parts, list | tuple) or len(parts) != 4:
        raise Malformed("COSE_Sign1 must be an array of 4 items")
    protected, unprotected, payload, signature = parts
    if not all(isinstance(x, bytes) for x in (protected, payload, signature)):
        raise Malformed("COSE_Sign1 protected header, payload and signature must be byte strings")
    if not isinstance(unprotected, dict):
        raise Malformed("COSE_Sign1 unprotected header must be a map")
    alg, kid = _protected_header(protected)
    return Envelope(alg, kid, protected, payload, signature)


@functools.lru_cache(maxsize=4096)
def _protected_header(protected: bytes) -> tuple[int, str]:
    """(alg, kid) from a protected header. Each sender sends the same few bytes every
    time, so decoded headers are cached (bounded; failures are not cached)."""
    header = _cbor_loads(protected, "protected header")
    if not isinstance(header, dict):
        raise Malformed("protected header must be a map")
    alg, kid_bytes = header.get(HEADER_ALG), header.get(HEADER_KID)
    if not isinstance(alg, int) or isinstance(alg, bool) or alg not in ALG_NAMES:
        raise UnsupportedAlgorithm(f"algorithm {alg!r} is not accepted")
    if not isinstance(kid_bytes, bytes):
        raise Malformed("protected header has no kid")
    try:
        kid = check_id(kid_bytes.decode("utf-8"))
    except (UnicodeDecodeError, InvalidId):
        raise Malformed("kid is not a valid identity") from None
    return alg, kid


def decode_payload(payload: bytes, *, sender: str | None = None) -> Message:
    """Decode a verified payload into a `Message`, raising `Malformed` on any shape error."""
    fields = _cbor_loads(payload, "payload", sender)
    if not isinstance(fields, dict):
        raise Malformed("payload must be a map", sender=sender)
    missing = [k for k in ("id", "seq", "ts", "kind", "body") if k not in fields]
    if missing:
        raise Malformed(f"payload lacks {', '.join(missing)}", sender=sender)
    body = fields["body"]
    if not isinstance(body, dict) or not _is_plain(body):
        raise Malformed("body must be a map of plain values (no bytes, tags or NaN)", sender=sender)
    try:
        return Message(fields["id"], fields["seq"], fields["ts"], fields["kind"], body)
    except (ValueError, InvalidId) as exc:
        raise Malformed(f"payload: {exc}", sender=sender) from None


_SCALARS = (str, int, bool, type(None))


def _is_plain(value: Any) -> bool:
    """JSON-compatible data only (maps with text keys, lists, text, numbers, booleans,
    null; no bytes, tags or non-finite floats; nesting at most 16 deep), so every stored
    body can be served as JSON. Iterative: it runs on every message."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind in _SCALARS:
            continue
        if kind is float:
            if not math.isfinite(item):
                return False
        elif depth >= 16:
            return False
        elif kind is dict:
            for key, child in item.items():
                if type(key) is not str:
                    return False
                stack.append((child, depth + 1))
        elif kind is list or kind is tuple:
            stack.extend((child, depth + 1) for child in item)
        else:
            return False
    return True
