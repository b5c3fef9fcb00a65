"""Who may sign what: public keys of identities issued by the project's issuing CA,
checked for chain, validity, role and revocation. Implements `wire.verify.KeyLookup`.
`audit_keys` says who may sign an audit log: the issuing CA and gateway identities.

Certificates are read from the PKI directory's `issued/` folder on first use and
cached; the CRL is re-read whenever its file changes (`refresh`), so a revocation takes
effect on the next message without a restart."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa

from certs.pki import ISSUING_CA_KID, Pki, id_of, role_of
from edge_agent.wire.envelope import PublicKey
from edge_agent.wire.errors import Expired, Revoked, UnknownSender, WrongRole
from edge_agent.wire.ids import InvalidId, Role, check_id

if TYPE_CHECKING:
    from certs.auditchain import KeyLookup


@dataclass(frozen=True)
class Registered:
    """A trusted certificate's facts."""

    id: str
    role: Role
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    key: PublicKey
    mtime: float


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class KeyRegistry:
    """Public keys by identity, for verifying envelopes."""

    def __init__(self, pki: Pki, *, now: Callable[[], dt.datetime] = _utcnow) -> None:
        self._pki = pki.require()
        self._now = now
        self._issuer = x509.load_pem_x509_certificate(pki.issuing_cert.read_bytes())
        self._cache: dict[str, Registered] = {}
        self._revoked_serials: frozenset[int] = frozenset()
        self._crl_mtime = -1.0
        self._checked_at = -float("inf")
        self._issued_mtime = self._dir_mtime()
        self.refresh()

    @property
    def issuer(self) -> x509.Certificate:
        """The issuing CA's certificate, which every registered certificate is checked against."""
        return self._issuer

    def _dir_mtime(self) -> float:
        try:
            return (self._pki.root / "issued").stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def _forget_reissued(self) -> None:
        """Drop cached certificates whose files were replaced (re-issue, key rotation)."""
        mtime = self._dir_mtime()
        if mtime == self._issued_mtime:
            return
        self._issued_mtime = mtime
        for kid, entry in list(self._cache.items()):
            try:
                changed = self._pki.identity(kid).cert.stat().st_mtime != entry.mtime
            except FileNotFoundError:
                changed = True
            if changed:
                del self._cache[kid]

    def refresh(self, *, max_age_s: float = 0.0) -> bool:
        """Pick up re-issued certificates, and re-read the CRL if its file changed;
        returns whether the CRL changed. Call it about once a second; with `max_age_s`
        it does nothing (returns False) if it looked less than that long ago (many
        agents of a simulated fleet share one registry and call it per downlink)."""
        now = time.monotonic()
        if max_age_s > 0 and now - self._checked_at < max_age_s:
            return False
        self._checked_at = now
        self._forget_reissued()
        try:
            mtime = self._pki.crl.stat().st_mtime
        except FileNotFoundError:
            return False
        if mtime == self._crl_mtime:
            return False
        crl = x509.load_pem_x509_crl(self._pki.crl.read_bytes())
        if not crl.is_signature_valid(self._issuer.public_key()):  # type: ignore[arg-type]
            return False
        self._revoked_serials = frozenset(r.serial_number for r in crl)
        self._crl_mtime = mtime
        return True

    def is_revoked(self, identity: str) -> bool:
        entry = self._cache.get(identity)
        return entry is not None and entry.serial in self._revoked_serials

    def lookup(self, kid: str) -> Registered:
        """The registered certificate for `kid`, loading it on first use."""
        entry = self._cache.get(kid)
        if entry is None:
            entry = self._load(kid)
            self._cache[kid] = entry
        return entry

    def key_for(self, kid: str, roles: frozenset[Role]) -> PublicKey:
        entry = self.lookup(kid)
        if entry.serial in self._revoked_serials:
            raise Revoked("certificate is revoked", sender=kid)
        now = self._now()
        if not entry.not_before <= now <= entry.not_after:
            raise Expired(f"certificate valid {entry.not_before:%Y-%m-%d} to {entry.not_after:%Y-%m-%d}", sender=kid)
        if entry.role not in roles:
            raise WrongRole(f"role {entry.role.value} may not send this", sender=kid)
        return entry.key

    def _load(self, kid: str) -> Registered:
        try:
            path = self._pki.identity(check_id(kid)).cert
            mtime = path.stat().st_mtime
            cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
        except (InvalidId, FileNotFoundError, ValueError):
            raise UnknownSender("no certificate registered for this id", sender=kid) from None
        try:
            cert.verify_directly_issued_by(self._issuer)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise UnknownSender(f"certificate not issued by this CA ({exc.__class__.__name__})", sender=kid) from None
        role = role_of(cert)
        if id_of(cert) != kid or role is None:
            raise UnknownSender("certificate CN or role does not match", sender=kid)
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | mldsa.MLDSA44PublicKey):
            raise UnknownSender("certificate key type is not accepted", sender=kid)
        return Registered(
            kid, role, cert.serial_number, cert.not_valid_before_utc, cert.not_valid_after_utc, key, mtime
        )


def audit_keys(pki: Pki) -> KeyLookup:
    """Who may sign an audit log checked against `pki` (`bluelight audit verify --pki`):
    its issuing CA, as kid `issuing-ca` (the PKI's own log of issuing and revocation,
    `DIR/audit.db`), and its gateway identities not revoked (a gateway's log). Any
    other kid raises a `Rejected`. Expiry is not checked: an entry signed while the
    certificate was valid stays valid."""
    registry = KeyRegistry(pki)
    ca_key = registry.issuer.public_key()

    def lookup(kid: str) -> PublicKey:
        if kid == ISSUING_CA_KID:
            if not isinstance(ca_key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | mldsa.MLDSA44PublicKey):
                raise UnknownSender("the issuing CA's key type does not sign audit logs", sender=kid)
            return ca_key
        entry = registry.lookup(kid)
        if entry.role is not Role.GATEWAY:
            raise WrongRole(f"role {entry.role.value} does not sign the audit log", sender=kid)
        if registry.is_revoked(kid):
            raise Revoked("certificate is revoked", sender=kid)
        return entry.key

    return lookup
