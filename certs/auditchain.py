"""The tamper-evident audit log, sans-IO: entries, their canonical bytes, the hash
chain, the signer's signature, and the check an independent verifier runs.

An entry records who (`actor`) did what (`action`) to what (`subject`), when (`ts`, UTC
ms, the signer's clock) and the facts (`data`, JSON-compatible). Its canonical bytes
are the RFC 8949 section 4.2.1 deterministic CBOR encoding of the map

    {"seq": uint, "ts": uint, "action": tstr, "actor": tstr, "subject": tstr,
     "data": {* tstr => any}, "kid": tstr, "alg": int}

(shortest integer and float forms, definite lengths, map keys sorted by their encoded
bytes, which for text keys is shorter first, then bytewise). The chain is

    hash_0 = 32 zero bytes (GENESIS)
    hash_n = SHA-256(hash_{n-1} || canonical_n)

and the signer (`kid`: the gateway for its log, the issuing CA for the PKI's) signs
`SIGNATURE_CONTEXT || hash_n` with its key (`alg` is the COSE algorithm id: ES256
signatures are raw `r || s`, 64 bytes, as in the envelope). So a verifier needs
deterministic CBOR, SHA-256 and the signer's public key, nothing of Bluelight's. See
docs/security.md, "Audit log".

This module lives in `certs` (not `gateway.core`) because the PKI keeps a log too, and
`certs` must import without the gateway's extras; it needs only cbor2, cryptography
and `edge_agent.wire`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from edge_agent.errors import BluelightError
from edge_agent.wire.envelope import ALG_NAMES, PublicKey, Signer, algorithm_for
from edge_agent.wire.errors import Rejected, UnsupportedAlgorithm
from edge_agent.wire.ids import InvalidId, check_id

GENESIS = bytes(32)
#: Prefixed to the entry hash before signing, so an audit signature can never be
#: mistaken for (or replayed as) a signature over anything else its key signs.
SIGNATURE_CONTEXT = b"bluelight audit v1\x00"
HASH_BYTES = 32

#: Actions the gateway and the PKI record. Others are accepted if they look like `noun.verb`.
ACTIONS = (
    "alert.sent",
    "alert.delivered",
    "ack.accepted",
    "alert.escalated",
    "alert.overridden",
    "incident.created",
    "enrolment",
    "device.revoked",
    "pki.created",
    "hotlist.changed",
    "policy.loaded",
    "retention.pruned",
)
_ACTION = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*")
MAX_NAME = 256
MAX_DEPTH = 16
_INT_RANGE = (-(2**63), 2**64 - 1)  # what CBOR encodes without bignum tags
_P256_BYTES = 32
_ES256_HASH = ec.ECDSA(hashes.SHA256())


class AuditError(BluelightError):
    """The audit log cannot be written or read; the message says why."""


# -- values ----------------------------------------------------------------------------


def _check_name(what: str, value: object) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME or not value.isprintable():
        raise ValueError(f"{what} must be 1-{MAX_NAME} printable characters, got {value!r}")
    return value


def _check_uint(what: str, value: object, lo: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= _INT_RANGE[1]:
        raise ValueError(f"{what} must be an integer >= {lo}, got {value!r}")
    return value


def check_data(data: object) -> dict[str, Any]:
    """`data` as a plain dict if it is JSON-compatible: maps with text keys, lists, text,
    integers in the 64-bit range, finite floats, booleans, null; at most 16 deep."""
    if not isinstance(data, Mapping):
        raise ValueError(f"data must be a map, got {type(data).__name__}")

    def plain(value: object, depth: int) -> Any:
        if value is None or isinstance(value, str | bool):
            return value
        if isinstance(value, int):
            if not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
                raise ValueError(f"data integer {value} is out of the 64-bit range")
            return value
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError("data floats must be finite")
            return value
        if depth >= MAX_DEPTH:
            raise ValueError(f"data is nested more than {MAX_DEPTH} deep")
        if isinstance(value, Mapping):
            if not all(isinstance(k, str) for k in value):
                raise ValueError("data map keys must be text")
            return {k: plain(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v, depth + 1) for v in value]
        raise ValueError(f"data holds a {type(value).__name__}, which JSON cannot carry")

    result: dict[str, Any] = plain(data, 0)
    return result


def data_json(data: Mapping[str, Any]) -> str:
    """The stored (display and query) form of `data`: compact JSON, keys sorted. The
    canonical bytes do not depend on it; the verifier only checks it is exactly this."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@dataclass(frozen=True)
class Head:
    """Where the chain ends: the last entry's seq and hash (`GENESIS_HEAD` when empty)."""

    seq: int
    hash: bytes

    def __post_init__(self) -> None:
        _check_uint("head seq", self.seq, 0)
        if not isinstance(self.hash, bytes) or len(self.hash) != HASH_BYTES:
            raise ValueError("head hash must be 32 bytes")


GENESIS_HEAD = Head(0, GENESIS)


@dataclass(frozen=True)
class AuditRecord:
    """What to record; `AuditLog.append_many` turns these into signed entries."""

    action: str
    actor: str
    subject: str
    data: Mapping[str, Any] = field(default_factory=dict)
    ts: int = 0


@dataclass(frozen=True)
class AuditEntry:
    """One signed entry, as stored. Construction checks types and shapes, not the
    chain or signature (that is `verify_chain`)."""

    seq: int
    ts: int
    action: str
    actor: str
    subject: str
    data: Mapping[str, Any]
    kid: str
    alg: int
    hash: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _check_uint("seq", self.seq, 1)
        _check_uint("ts", self.ts, 0)
        if not isinstance(self.action, str) or not _ACTION.fullmatch(self.action) or len(self.action) > MAX_NAME:
            raise ValueError(f"action must look like 'alert.sent', got {self.action!r}")
        _check_name("actor", self.actor)
        _check_name("subject", self.subject)
        object.__setattr__(self, "data", check_data(self.data))
        try:
            check_id(self.kid)
        except InvalidId as exc:
            raise ValueError(f"kid: {exc}") from None
        if not isinstance(self.alg, int) or isinstance(self.alg, bool) or self.alg not in ALG_NAMES:
            raise ValueError(f"alg must be one of {sorted(ALG_NAMES)}, got {self.alg!r}")
        if not isinstance(self.hash, bytes) or len(self.hash) != HASH_BYTES:
            raise ValueError("hash must be 32 bytes")
        if not isinstance(self.signature, bytes) or not self.signature:
            raise ValueError("signature must be non-empty bytes")

    def canonical(self) -> bytes:
        return canonical_bytes(
            seq=self.seq, ts=self.ts, action=self.action, actor=self.actor, subject=self.subject,
            data=self.data, kid=self.kid, alg=self.alg,
        )

    @property
    def head(self) -> Head:
        return Head(self.seq, self.hash)


def canonical_bytes(
    *, seq: int, ts: int, action: str, actor: str, subject: str, data: Mapping[str, Any], kid: str, alg: int
) -> bytes:
    """Deterministic CBOR (RFC 8949 section 4.2.1) of the entry's fields."""
    record = {
        "seq": seq, "ts": ts, "action": action, "actor": actor, "subject": subject,
        "data": dict(data), "kid": kid, "alg": alg,
    }
    encoded: bytes = cbor2.dumps(record, canonical=True)
    return encoded


def chain_hash(prev: bytes, canonical: bytes) -> bytes:
    return hashlib.sha256(prev + canonical).digest()


def next_entry(
    head: Head,
    *,
    action: str,
    actor: str,
    subject: str,
    data: Mapping[str, Any],
    ts: int,
    signer: Signer,
) -> AuditEntry:
    """The entry after `head`, hashed onto the chain and signed by `signer`. Raises
    `ValueError` on a field that cannot be recorded."""
    if not isinstance(action, str) or not _ACTION.fullmatch(action):
        raise ValueError(f"action must look like 'alert.sent', got {action!r}")
    _check_name("actor", actor)
    _check_name("subject", subject)
    plain = check_data(data)
    seq = head.seq + 1
    canonical = canonical_bytes(
        seq=seq, ts=_check_uint("ts", ts, 0), action=action, actor=actor, subject=subject,
        data=plain, kid=signer.kid, alg=signer.alg,
    )
    digest = chain_hash(head.hash, canonical)
    signature = signer.sign_bytes(SIGNATURE_CONTEXT + digest)
    return AuditEntry(seq, ts, action, actor, subject, plain, signer.kid, signer.alg, digest, signature)


def verify_signature(key: PublicKey, alg: int, signature: bytes, digest: bytes) -> bool:
    """Whether `signature` is `key`'s signature (algorithm `alg`) over the entry hash."""
    try:
        if algorithm_for(key) != alg:
            return False
        data = SIGNATURE_CONTEXT + digest
        if isinstance(key, ec.EllipticCurvePublicKey):
            if len(signature) != 2 * _P256_BYTES:
                return False
            r = int.from_bytes(signature[:_P256_BYTES], "big")
            s = int.from_bytes(signature[_P256_BYTES:], "big")
            key.verify(encode_dss_signature(r, s), data, _ES256_HASH)
        else:
            key.verify(signature, data)
    except (InvalidSignature, UnsupportedAlgorithm, ValueError):
        return False
    return True


# -- verification ----------------------------------------------------------------------


@dataclass(frozen=True)
class Unreadable:
    """A stored row that is not even an entry (wrong types, undecodable data); the
    reader hands it to `verify_chain`, which reports it where it stands."""

    seq: int
    reason: str


#: Why an entry breaks the chain.
BREAKS = {
    "unreadable": "the stored entry is malformed — the log was altered at this entry",
    "reordered": "out of order — entries were renumbered or reordered at or before this entry",
    "gap": "missing — entries were deleted here",
    "hash": "hash mismatch — the log was altered at or before this entry",
    "signer": "signer not trusted",
    "signature": "bad signature — the entry was not signed by its signer's key",
    "truncated": "missing — the log was truncated (its head record names a later entry)",
    "head": "the head record does not match the log",
}


@dataclass(frozen=True)
class Break:
    """The first entry where verification failed, and why."""

    seq: int
    reason: str  # a key of BREAKS
    detail: str = ""
    action: str | None = None
    ts: int | None = None

    def describe(self) -> str:
        """`entry 42 (alert.escalated at 2026-...Z): hash mismatch — ...` (one line)."""
        where = f" ({self.action} at {iso_ms(self.ts)})" if self.action is not None and self.ts is not None else ""
        detail = f" ({self.detail})" if self.detail else ""
        return f"entry {self.seq}{where}: {BREAKS[self.reason]}{detail}"


@dataclass(frozen=True)
class ChainReport:
    """What `verify_chain` found: how many entries verified, where the verified chain
    ends, and the first break, if any."""

    count: int
    head: Head
    broken: Break | None = None

    @property
    def ok(self) -> bool:
        return self.broken is None


def iso_ms(ts: int) -> str:
    """UTC milliseconds as `2026-03-01T12:00:00.000Z` (no clock, no time zone database)."""
    days, ms = divmod(ts, 86_400_000)
    # Civil date from days since 1970-01-01 (H. Hinnant's algorithm), so that a tampered
    # huge ts cannot raise the way datetime would.
    z = days + 719_468
    era, doe = divmod(z, 146_097)
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (month <= 2)
    secs, milli = divmod(ms, 1000)
    return f"{year:04d}-{month:02d}-{day:02d}T{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{milli:03d}Z"


KeyLookup = Callable[[str], PublicKey]


@dataclass
class _Checked:
    count: int = 0
    head: Head = field(default_factory=lambda: GENESIS_HEAD)


def verify_chain(
    entries: Iterable[AuditEntry | Unreadable],
    public_key_lookup: KeyLookup | None,
    *,
    head: Head | None = None,
) -> ChainReport:
    """Check entries in the order given (they must run 1, 2, 3, ...): each hash against
    the chain recomputed from GENESIS, and each signature with the key
    `public_key_lookup(kid)` returns (it raises a `Rejected`, e.g. `UnknownSender` or
    `Revoked`, for a signer not to be trusted; `None` checks the chain only). `head`,
    the separately recorded last (seq, hash), reveals a deleted tail, which the chain
    alone cannot. Stops at the first break."""
    done = _Checked()
    keys: dict[str, PublicKey] = {}

    def broken(seq: int, reason: str, detail: str = "", entry: AuditEntry | None = None) -> ChainReport:
        action, ts = (entry.action, entry.ts) if entry is not None else (None, None)
        return ChainReport(done.count, done.head, Break(seq, reason, detail, action, ts))

    for entry in entries:
        expected = done.head.seq + 1
        if isinstance(entry, Unreadable):
            if entry.seq > expected:
                return broken(expected, "gap", _gap(expected, entry.seq))
            return broken(entry.seq, "unreadable", entry.reason)
        if entry.seq < expected:
            return broken(expected, "reordered", f"found seq {entry.seq} after {done.head.seq}")
        if entry.seq > expected:
            return broken(expected, "gap", _gap(expected, entry.seq))
        digest = chain_hash(done.head.hash, entry.canonical())
        if digest != entry.hash:
            return broken(entry.seq, "hash", "", entry)
        if public_key_lookup is not None:
            key = keys.get(entry.kid)
            if key is None:
                try:
                    key = keys[entry.kid] = public_key_lookup(entry.kid)
                except Rejected as exc:
                    return broken(entry.seq, "signer", str(exc), entry)
            if not verify_signature(key, entry.alg, entry.signature, digest):
                return broken(entry.seq, "signature", f"signer {entry.kid}", entry)
        done.count += 1
        done.head = entry.head
    if head is not None:
        if head.seq > done.head.seq:
            return broken(done.head.seq + 1, "truncated", f"the log ends at {done.head.seq}, its head is {head.seq}")
        if head != done.head:
            # Same seq, other hash: that entry was replaced; an older head: the entries
            # after it were added without moving the head, which the gateway never does.
            seq = head.seq if head.seq == done.head.seq else head.seq + 1
            detail = f"it names entry {head.seq} ({head.hash.hex()[:16]}...), the log runs to {done.head.seq}"
            return broken(seq, "head", detail)
    return ChainReport(done.count, done.head)


def _gap(expected: int, found: int) -> str:
    if found == expected + 1:
        return f"entry {expected} is gone; the next is {found}"
    return f"entries {expected} to {found - 1} are gone; the next is {found}"


def entry_line(entry: AuditEntry | Unreadable) -> str:
    """One line for `bluelight audit show`: `#seq time action actor -> subject data`."""
    if isinstance(entry, Unreadable):
        return f"#{entry.seq} UNREADABLE: {entry.reason}"
    return (
        f"#{entry.seq} {iso_ms(entry.ts)} {entry.action} {entry.actor} -> {entry.subject} "
        f"{data_json(entry.data)} [{entry.kid} {entry.hash.hex()[:16]}]"
    )
