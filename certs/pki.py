"""A two-level PKI on disk: root CA -> issuing CA -> broker, gateway, devices, people.

Layout of a PKI directory (every `*.key` is written 0600)::

    root-ca.crt   private/root-ca.key     (the root key can be moved offline)
    issuing-ca.crt private/issuing-ca.key
    ca.pem        trust bundle: issuing CA + root CA
    crl.pem       the issuing CA's certificate revocation list
    broker.crt    private/broker.key      (server certificate, chain included)
    issued/ID.crt issued/ID.key issued/ID.chain.pem
    index.json    who was issued what, and what is revoked
    audit.db      the PKI's audit log: every certificate issued, every revocation

An identity's id is its certificate's CN; its role is the OU.

Every certificate issued (`init`'s broker and gateway, `issue`, `sign_csr`) and every
revocation appends one entry to `audit.db`: the signed hash-chain format of
`certs.auditchain` in the tables of `certs.auditlog` (the gateway's audit log is the
same), signed by the issuing CA's key under kid `issuing-ca`, so
`bluelight audit verify DIR/audit.db --pki DIR` checks it. An entry records who
(`actor`: given, else the OS user), the identity and the certificate's facts (role,
serial, validity, SHA-256 fingerprint); never key material. Issuing refuses to go on
when the log cannot be extended (it was altered), so no certificate goes unrecorded;
revoking a lost device never waits for the log: it takes effect, then says if it could
not be recorded.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_agent.errors import BluelightError
from edge_agent.wire.envelope import KeySigner
from edge_agent.wire.ids import InvalidId, Role, check_id

if TYPE_CHECKING:
    from certs.auditchain import AuditRecord

# An edge agent uses this module only to find its files (`Pki`, `Identity`): what only
# the CA's operations need (the audit log, json, getpass) is imported where it is used,
# so a device does not carry it (~0.4 MB RSS).

CRL_LIFETIME = dt.timedelta(days=30)
CA_LIFETIME = dt.timedelta(days=3650)
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
DEFAULT_GATEWAY_ID = "gateway"
#: The kid of the issuing CA's signatures in the PKI's audit log; no identity may take it.
ISSUING_CA_KID = "issuing-ca"
AUDIT_DB = "audit.db"
#: Longest actor name the audit log takes.
MAX_ACTOR = 256


class PkiError(BluelightError):
    """A PKI operation that cannot be done; the message says what to do instead."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _ms(t: dt.datetime) -> int:
    return int(t.timestamp() * 1000)


def os_user() -> str:
    """Who is running this, as the OS says (`unknown` if it cannot say)."""
    import getpass  # noqa: PLC0415 - see the note on the imports

    try:
        return getpass.getuser() or "unknown"
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        return "unknown"


def check_actor(actor: str | None) -> str:
    """The audit log's `actor`: the name given (an installer's id, an email), else the OS user."""
    who = os_user() if actor is None else actor
    if not 0 < len(who) <= MAX_ACTOR or not who.isprintable():
        raise PkiError(f"actor must be 1-{MAX_ACTOR} printable characters, got {who!r}")
    return who


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, hex (what `openssl x509 -fingerprint -sha256` shows)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _cert_facts(cert: x509.Certificate) -> dict[str, Any]:
    """What the audit log keeps of a certificate: public facts only, never key material."""
    return {
        "serial": str(cert.serial_number),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "fingerprint": fingerprint(cert),
    }


def _write(path: Path, data: bytes, *, secret: bool = False) -> None:
    """Write atomically; secrets are created 0600 and never readable by others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def new_key() -> ec.EllipticCurvePrivateKey:
    """A P-256 key: accepted by browsers for TLS and ~2x faster to verify than Ed25519."""
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(identity: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    """What a device sends to enrol: a CSR for its own key, which never leaves it."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, check_id(identity))])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def role_of(cert: x509.Certificate) -> Role | None:
    """The role a certificate carries in its OU, if any."""
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    try:
        return Role(str(ous[0].value)) if ous else None
    except ValueError:
        return None


def id_of(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else ""


@dataclass(frozen=True)
class Identity:
    """Where one identity's certificate, key and chain live."""

    id: str
    cert: Path
    key: Path
    chain: Path


@dataclass(frozen=True)
class Pki:
    """A PKI directory. Methods that write are the CLI's `pki init/issue/revoke`."""

    root: Path

    @property
    def ca_bundle(self) -> Path:
        return self.root / "ca.pem"

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    @property
    def issuing_cert(self) -> Path:
        return self.root / "issuing-ca.crt"

    @property
    def broker(self) -> Identity:
        return Identity("broker", self.root / "broker.crt", self.root / "private/broker.key", self.root / "broker.crt")

    @property
    def index_path(self) -> Path:
        return self.root / "index.json"

    @property
    def audit_path(self) -> Path:
        """The PKI's audit log (see the module docstring)."""
        return self.root / AUDIT_DB

    def identity(self, identity: str) -> Identity:
        base = self.root / "issued" / check_id(identity)
        return Identity(identity, base.with_suffix(".crt"), base.with_suffix(".key"), Path(f"{base}.chain.pem"))

    def require(self) -> Pki:
        """Raise `PkiError` unless this directory holds an initialised PKI."""
        for path in (self.ca_bundle, self.crl, self.issuing_cert, self.index_path):
            if not path.is_file():
                raise PkiError(
                    f"no PKI at {self.root} (missing {path.name}): run 'bluelight pki init --dir {self.root}'"
                )
        return self

    def require_identity(self, identity: str) -> Identity:
        ident = self.identity(identity)
        for path in (ident.chain, ident.key):
            if not path.is_file():
                raise PkiError(
                    f"no certificate for {identity!r} in {self.root}: "
                    f"run 'bluelight pki issue --dir {self.root} --role ROLE --id {identity}'"
                )
        return ident

    # -- index ---------------------------------------------------------------
    def index(self) -> dict[str, dict[str, Any]]:
        import json  # noqa: PLC0415 - see the note on the imports

        data: dict[str, dict[str, Any]] = json.loads(self.index_path.read_text())
        return data

    def _save_index(self, index: dict[str, dict[str, Any]]) -> None:
        import json  # noqa: PLC0415 - see the note on the imports

        _write(self.index_path, json.dumps(index, indent=2, sort_keys=True).encode())

    def _issuer(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        cert = x509.load_pem_x509_certificate(self.issuing_cert.read_bytes())
        key_path = self.root / "private/issuing-ca.key"
        if not key_path.is_file():
            raise PkiError(f"issuing CA key not found at {key_path}: issue on the machine that holds it")
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cert, key

    @contextlib.contextmanager
    def _recording(self, *, refused: str = "; nothing was issued") -> Iterator[list[AuditRecord]]:
        """Do something and record it in the PKI's audit log, in one transaction: refuses
        (`PkiError`, ending with `refused`) before the block runs if the log cannot be
        extended; nothing is recorded if the block raises. Signed by the issuing CA."""
        from certs.auditchain import AuditError  # noqa: PLC0415 - see the note on the imports
        from certs.auditlog import AuditLog  # noqa: PLC0415

        _, key = self._issuer()
        where = f"the PKI's audit log {self.audit_path}"
        check = f"check it with 'bluelight audit verify {self.audit_path} --pki {self.root}'"
        try:
            with AuditLog.open(self.audit_path, KeySigner(ISSUING_CA_KID, key)) as log, log.appending() as records:
                yield records
        except AuditError as exc:
            raise PkiError(f"{where}: {exc}{refused}") from None
        except sqlite3.Error as exc:
            raise PkiError(f"{where} could not be written ({exc}); {check}") from None

    # -- operations ----------------------------------------------------------
    def init(
        self,
        *,
        hosts: Iterable[str] = DEFAULT_HOSTS,
        gateway_id: str = DEFAULT_GATEWAY_ID,
        actor: str | None = None,
    ) -> None:
        """Create the root and issuing CAs, an empty CRL, the broker's and gateway's
        certificates; the audit log records the CAs (`pki.created`) and both certificates."""
        try:
            check_id(gateway_id)
        except InvalidId as exc:
            raise PkiError(str(exc)) from None
        _check_issuable(gateway_id)
        who = check_actor(actor)
        if self.index_path.exists():
            raise PkiError(f"a PKI already exists at {self.root}; use another --dir or delete it first")
        if self.audit_path.exists():
            raise PkiError(
                f"an audit log of an earlier PKI is at {self.audit_path}: keep it elsewhere, then run init again"
            )
        hosts = tuple(hosts)
        now = _now()
        root_key, issuing_key = new_key(), new_key()
        root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bluelight Root CA")])
        issuing_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bluelight Issuing CA")])
        root = (
            _ca_builder(root_name, root_name, root_key.public_key(), now, path_length=1)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256())
        )
        issuing = (
            _ca_builder(issuing_name, root_name, issuing_key.public_key(), now, path_length=0)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(issuing_key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False
            )
            .sign(root_key, hashes.SHA256())
        )
        self.root.mkdir(parents=True, exist_ok=True)
        _write(self.root / "private/root-ca.key", _key_pem(root_key), secret=True)
        _write(self.root / "private/issuing-ca.key", _key_pem(issuing_key), secret=True)
        os.chmod(self.root / "private", 0o700)
        _write(self.root / "root-ca.crt", _pem(root))
        _write(self.issuing_cert, _pem(issuing))
        _write(self.ca_bundle, _pem(issuing) + _pem(root))
        self._save_index({})
        self.write_crl()
        with self._recording() as records:
            from certs.auditchain import AuditRecord  # noqa: PLC0415 - see the note on the imports

            records.append(AuditRecord("pki.created", who, ISSUING_CA_KID, {
                "root": {"subject": root.subject.rfc4514_string(), **_cert_facts(root)},
                "issuing": {"subject": issuing.subject.rfc4514_string(), **_cert_facts(issuing)},
                "os_user": os_user(),
            }, _ms(now)))
            broker_key = new_key()
            broker_cert = self._sign(broker_key.public_key(), "broker", Role.GATEWAY, server_hosts=hosts,
                                     record=False)
            _write(self.broker.key, _key_pem(broker_key), secret=True)
            _write(self.broker.cert, _pem(broker_cert) + _pem(issuing))
            records.append(_enrolment(who, "broker", Role.GATEWAY, broker_cert, method="generated", hosts=hosts))
        self.issue(Role.GATEWAY, gateway_id, server_hosts=hosts, actor=who)

    def issue(
        self,
        role: Role,
        identity: str,
        *,
        validity: dt.timedelta = dt.timedelta(days=365),
        not_before: dt.datetime | None = None,
        server_hosts: Iterable[str] = (),
        actor: str | None = None,
    ) -> Identity:
        """Development and test path: generate a key here and certify it. Devices in
        the field enrol with `sign_csr` instead, keeping their key. Recorded in the
        audit log as `enrolment` by `actor` (default: the OS user)."""
        self.require()
        who = check_actor(actor)
        ident = self.identity(identity)
        hosts = tuple(server_hosts)
        with self._recording() as records:
            key = new_key()
            cert = self._sign(
                key.public_key(), identity, role, validity=validity, not_before=not_before, server_hosts=hosts
            )
            _write(ident.key, _key_pem(key), secret=True)
            self._write_cert(ident, cert)
            records.append(_enrolment(who, identity, role, cert, method="generated", hosts=hosts))
        return ident

    def issue_many(
        self,
        role: Role,
        identities: Iterable[str],
        *,
        validity: dt.timedelta = dt.timedelta(days=365),
        actor: str | None = None,
    ) -> list[Identity]:
        """`issue` for many identities (a simulated fleet): the issuing key is loaded and
        the index and the audit log written once for all of them, not once each (2,000
        devices: seconds, not half a minute). Each is an `enrolment` in the audit log."""
        self.require()
        who = check_actor(actor)
        index = self.index()
        issuer = self._issuer()
        done: list[Identity] = []
        with self._recording() as records:
            try:
                for identity in identities:
                    ident = self.identity(identity)
                    key = new_key()
                    cert = self._sign(key.public_key(), identity, role, validity=validity, index=index, issuer=issuer)
                    _write(ident.key, _key_pem(key), secret=True)
                    self._write_cert(ident, cert)
                    records.append(_enrolment(who, identity, role, cert, method="generated"))
                    done.append(ident)
            finally:
                self._save_index(index)
        return done


    def sign_csr(
        self,
        csr_pem: bytes,
        role: Role,
        *,
        validity: dt.timedelta = dt.timedelta(days=365),
        actor: str | None = None,
    ) -> bytes:
        """Enrolment: certify the key in a device's CSR. Returns the certificate chain
        PEM. Recorded in the audit log as `enrolment` by `actor` (the installer, when
        known; default: the OS user)."""
        self.require()
        who = check_actor(actor)
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise PkiError("not a PEM certificate signing request") from None
        if not csr.is_signature_valid:
            raise PkiError("the CSR's signature does not verify")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
            raise PkiError("the CSR must carry a P-256 key")
        identity = id_of_name(csr.subject)
        ident = self.identity(identity)
        with self._recording() as records:
            cert = self._sign(public_key, identity, role, validity=validity)
            self._write_cert(ident, cert)
            records.append(_enrolment(who, identity, role, cert, method="csr"))
        return ident.chain.read_bytes()

    def revoke(self, identity: str, *, actor: str | None = None) -> None:
        """Revoke every certificate issued to `identity` and rewrite the CRL; then record
        it (`device.revoked`, by `actor`, default the OS user). The revocation stands even
        if the audit log cannot be written; the `PkiError` then says so."""
        self.require()
        who = check_actor(actor)
        index = self.index()
        entry = index.get(check_id(identity))
        if entry is None:
            raise PkiError(f"{identity!r} was never issued a certificate in {self.root}")
        already = entry.get("revoked_at") is not None
        if not already:
            entry["revoked_at"] = _now().isoformat()
            self._save_index(index)
        self.write_crl()
        facts = {"role": entry["role"], "serials": list(entry["serials"]), "revoked_at": entry["revoked_at"],
                 "already_revoked": already, "os_user": os_user()}
        try:
            with self._recording(refused="") as records:
                from certs.auditchain import AuditRecord  # noqa: PLC0415 - see the note on the imports

                records.append(AuditRecord("device.revoked", who, identity, facts, _ms(_now())))
        except PkiError as exc:
            raise PkiError(f"{identity} is revoked and the CRL rewritten, but the revocation is not recorded: {exc}") \
                from None

    def revoked_ids(self) -> set[str]:
        return {k for k, v in self.index().items() if v.get("revoked_at")}

    def write_crl(self) -> None:
        """(Re)sign the CRL from the index; run it before `next_update` passes."""
        cert, key = self._issuer()
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + CRL_LIFETIME)
        )
        for entry in self.index().values():
            if not entry.get("revoked_at"):
                continue
            revoked_at = dt.datetime.fromisoformat(entry["revoked_at"])
            for serial in entry["serials"]:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(int(serial)).revocation_date(revoked_at).build()
                )
        crl = builder.sign(key, hashes.SHA256())
        _write(self.crl, crl.public_bytes(serialization.Encoding.PEM))

    # -- internals -----------------------------------------------------------
    def _write_cert(self, ident: Identity, cert: x509.Certificate) -> None:
        _write(ident.cert, _pem(cert))
        _write(ident.chain, _pem(cert) + self.issuing_cert.read_bytes())

    def _sign(
        self,
        public_key: ec.EllipticCurvePublicKey,
        identity: str,
        role: Role,
        *,
        validity: dt.timedelta = dt.timedelta(days=365),
        not_before: dt.datetime | None = None,
        server_hosts: Iterable[str] = (),
        record: bool = True,
        index: dict[str, dict[str, Any]] | None = None,
        issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    ) -> x509.Certificate:
        """Certify `public_key`. With `index` given, the entry goes into it and the caller
        saves it (`issue_many`); otherwise the index file is read and written here."""
        check_id(identity)
        if record:
            _check_issuable(identity)
        save = index is None
        if index is None:
            index = self.index()
        previous = index.get(identity)
        if record and previous and previous["role"] != role.value:
            raise PkiError(f"{identity!r} is already issued as {previous['role']}; pick another id")
        if record and previous and previous.get("revoked_at"):
            raise PkiError(f"{identity!r} is revoked; enrol the device under a new id")
        issuer_cert, issuer_key = issuer or self._issuer()
        start = not_before or (_now() - dt.timedelta(minutes=5))
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bluelight"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
                x509.NameAttribute(NameOID.COMMON_NAME, identity),
            ]
        )
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=True, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
            )
        )
        hosts = tuple(server_hosts)
        if hosts:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
            builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        cert = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False).sign(issuer_key, hashes.SHA256())
        if record:
            serials = [*(previous or {}).get("serials", []), str(cert.serial_number)]
            index[identity] = {
                "role": role.value,
                "serials": serials,
                "not_after": cert.not_valid_after_utc.isoformat(),
                "revoked_at": None,
            }
            if save:
                self._save_index(index)
        return cert


def _check_issuable(identity: str) -> None:
    if identity == ISSUING_CA_KID:
        raise PkiError(f"{identity!r} names the issuing CA in the audit log; pick another id")


def _enrolment(
    actor: str, identity: str, role: Role, cert: x509.Certificate, *, method: str, hosts: Iterable[str] = ()
) -> AuditRecord:
    """The `enrolment` entry for a certificate just issued (`method`: `generated` here or `csr`)."""
    data: dict[str, Any] = {"role": role.value, **_cert_facts(cert), "method": method, "os_user": os_user()}
    if hosts:
        data["hosts"] = list(hosts)
    from certs.auditchain import AuditRecord  # noqa: PLC0415 - see the note on the imports

    return AuditRecord("enrolment", actor, identity, data, _ms(_now()))


def id_of_name(name: x509.Name) -> str:
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise PkiError("the CSR subject must have exactly one CN, the device id")
    try:
        return check_id(str(cns[0].value))
    except InvalidId as exc:
        raise PkiError(str(exc)) from None


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _ca_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    now: dt.datetime,
    *,
    path_length: int,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    )
