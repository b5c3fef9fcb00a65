"""The on-disk PKI (`certs.pki`) and the key registry that the gateway and agents verify
envelopes with (`certs.registry`). Each test builds its own PKI under tmp_path."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.pki import Pki, PkiError, make_csr, new_key, role_of
from certs.registry import KeyRegistry
from edge_agent.wire.envelope import KeySigner, Message, seal
from edge_agent.wire.errors import Expired, Revoked, UnknownSender, WrongRole
from edge_agent.wire.ids import Role
from edge_agent.wire.verify import verify_message

DEVICES = frozenset({Role.DEVICE})


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    p = Pki(tmp_path / "pki")
    p.init()
    return p


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- init ---------------------------------------------------------------------------------


def test_init_creates_the_documented_layout(pki: Pki) -> None:
    root = pki.root
    for name in (
        "root-ca.crt",
        "issuing-ca.crt",
        "ca.pem",
        "crl.pem",
        "broker.crt",
        "index.json",
        "private/root-ca.key",
        "private/issuing-ca.key",
        "private/broker.key",
        "issued/gateway.crt",
        "issued/gateway.key",
        "issued/gateway.chain.pem",
    ):
        assert (root / name).is_file(), name
    assert pki.require() is pki
    assert set(pki.index()) == {"gateway"}


def test_every_key_is_0600_and_the_private_dir_0700(pki: Pki) -> None:
    keys = sorted(pki.root.rglob("*.key"))
    assert len(keys) == 4
    for key in keys:
        assert _mode(key) == 0o600, key
    assert _mode(pki.root / "private") == 0o700
    assert not list(pki.root.rglob("*.tmp"))


def test_init_prints_no_key_material(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Pki(tmp_path / "p").init()
    Pki(tmp_path / "p").issue(Role.DEVICE, "dev-a")
    out, err = capsys.readouterr()
    assert "PRIVATE KEY" not in out + err
    assert "BEGIN" not in out + err


def test_ca_chain_and_bundle(pki: Pki) -> None:
    root = _cert(pki.root / "root-ca.crt")
    issuing = _cert(pki.issuing_cert)
    root.verify_directly_issued_by(root)
    issuing.verify_directly_issued_by(root)
    assert issuing.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    bundle = x509.load_pem_x509_certificates(pki.ca_bundle.read_bytes())
    assert [c.subject for c in bundle] == [issuing.subject, root.subject]


def test_gateway_identity_is_also_a_server_certificate(pki: Pki) -> None:
    cert = _cert(pki.identity("gateway").cert)
    assert role_of(cert) is Role.GATEWAY
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usages
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_init_twice_is_refused(pki: Pki) -> None:
    with pytest.raises(PkiError, match="already exists"):
        pki.init()


def test_operations_on_an_uninitialised_dir_say_to_run_init(tmp_path: Path) -> None:
    empty = Pki(tmp_path / "nothing")
    for operation in (lambda: empty.issue(Role.DEVICE, "dev-a"), lambda: empty.revoke("dev-a"), empty.require):
        with pytest.raises(PkiError, match="bluelight pki init"):
            operation()
    with pytest.raises(PkiError, match="bluelight pki init"):
        KeyRegistry(empty)


def test_require_identity_says_how_to_issue(pki: Pki) -> None:
    assert pki.require_identity("gateway").id == "gateway"
    with pytest.raises(PkiError, match="bluelight pki issue"):
        pki.require_identity("dev-nope")


# -- issue ---------------------------------------------------------------------------------


@pytest.mark.parametrize("role", [Role.DEVICE, Role.OFFICER, Role.OPERATOR, Role.INSTALLER, Role.ADMIN])
def test_issue_writes_cert_key_and_chain(pki: Pki, role: Role) -> None:
    ident = pki.issue(role, "id-1")
    assert ident.cert == pki.root / "issued/id-1.crt"
    assert ident.key == pki.root / "issued/id-1.key"
    assert ident.chain == pki.root / "issued/id-1.chain.pem"
    assert _mode(ident.key) == 0o600
    cert = _cert(ident.cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "id-1"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == role.value
    assert role_of(cert) is role
    key = serialization.load_pem_private_key(ident.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert key.public_key() == cert.public_key()


def test_chain_verifies_up_to_the_root(pki: Pki) -> None:
    ident = pki.issue(Role.DEVICE, "dev-a")
    leaf, issuing = x509.load_pem_x509_certificates(ident.chain.read_bytes())
    assert leaf == _cert(ident.cert)
    assert issuing == _cert(pki.issuing_cert)
    leaf.verify_directly_issued_by(issuing)
    issuing.verify_directly_issued_by(_cert(pki.root / "root-ca.crt"))
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_issue_for_an_id_already_issued_with_another_role_is_refused(pki: Pki) -> None:
    pki.issue(Role.DEVICE, "dev-a")
    before = pki.identity("dev-a").cert.read_bytes()
    with pytest.raises(PkiError, match="already issued as device"):
        pki.issue(Role.OFFICER, "dev-a")
    assert pki.identity("dev-a").cert.read_bytes() == before
    assert pki.index()["dev-a"]["role"] == "device"


def test_reissue_with_the_same_role_adds_a_serial(pki: Pki) -> None:
    first = _cert(pki.issue(Role.DEVICE, "dev-a").cert)
    second = _cert(pki.issue(Role.DEVICE, "dev-a").cert)
    assert first.serial_number != second.serial_number
    assert pki.index()["dev-a"]["serials"] == [str(first.serial_number), str(second.serial_number)]


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "dev a", "-x", "x" * 65])
def test_issue_refuses_invalid_ids(pki: Pki, bad: str) -> None:
    with pytest.raises(ValueError, match="invalid id"):
        pki.issue(Role.DEVICE, bad)
    assert sorted(p.name for p in (pki.root / "issued").iterdir()) == [
        "gateway.chain.pem",
        "gateway.crt",
        "gateway.key",
    ]


# -- registry: the keys envelopes are verified with ------------------------------------------


def test_registry_returns_the_certified_key(pki: Pki) -> None:
    ident = pki.issue(Role.DEVICE, "dev-a")
    registry = KeyRegistry(pki)
    entry = registry.lookup("dev-a")
    assert (entry.id, entry.role, entry.serial) == ("dev-a", Role.DEVICE, _cert(ident.cert).serial_number)
    assert registry.key_for("dev-a", DEVICES) == _cert(ident.cert).public_key()


def test_unknown_or_invalid_ids_are_unknown_senders(pki: Pki) -> None:
    registry = KeyRegistry(pki)
    for kid in ("dev-nobody", "../gateway", "a/b"):
        with pytest.raises(UnknownSender):
            registry.key_for(kid, DEVICES)


def test_a_certificate_from_another_ca_is_an_unknown_sender(pki: Pki, tmp_path: Path) -> None:
    other = Pki(tmp_path / "other")
    other.init()
    foreign = other.issue(Role.DEVICE, "dev-x")
    (pki.root / "issued/dev-x.crt").write_bytes(foreign.cert.read_bytes())
    with pytest.raises(UnknownSender, match="not issued by this CA"):
        KeyRegistry(pki).key_for("dev-x", DEVICES)


def test_wrong_role_is_refused(pki: Pki) -> None:
    pki.issue(Role.OFFICER, "officer-1")
    registry = KeyRegistry(pki)
    assert registry.key_for("officer-1", frozenset({Role.OFFICER, Role.DEVICE}))
    with pytest.raises(WrongRole):
        registry.key_for("officer-1", DEVICES)
    with pytest.raises(WrongRole):
        registry.key_for("gateway", DEVICES)
    assert registry.key_for("gateway", frozenset({Role.GATEWAY}))


def test_expired_certificate_is_refused(pki: Pki) -> None:
    now = dt.datetime.now(dt.UTC)
    pki.issue(Role.DEVICE, "dev-old", not_before=now - dt.timedelta(days=2), validity=dt.timedelta(days=1))
    pki.issue(Role.DEVICE, "dev-future", not_before=now + dt.timedelta(days=1), validity=dt.timedelta(days=1))
    registry = KeyRegistry(pki)
    with pytest.raises(Expired):
        registry.key_for("dev-old", DEVICES)
    with pytest.raises(Expired):
        registry.key_for("dev-future", DEVICES)


def test_expiry_follows_the_injected_clock(pki: Pki) -> None:
    pki.issue(Role.DEVICE, "dev-a", validity=dt.timedelta(days=10))
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=11)
    assert KeyRegistry(pki).key_for("dev-a", DEVICES)
    with pytest.raises(Expired):
        KeyRegistry(pki, now=lambda: later).key_for("dev-a", DEVICES)


# -- revoke ----------------------------------------------------------------------------------


def test_revoke_puts_the_serial_on_a_signed_crl(pki: Pki) -> None:
    serial = _cert(pki.issue(Role.DEVICE, "dev-a").cert).serial_number
    pki.issue(Role.DEVICE, "dev-b")
    pki.revoke("dev-a")
    crl = x509.load_pem_x509_crl(pki.crl.read_bytes())
    issuing = _cert(pki.issuing_cert)
    public = issuing.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert crl.is_signature_valid(public)
    assert crl.issuer == issuing.subject
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert [r.serial_number for r in crl] == [serial]
    assert crl.next_update_utc is not None
    assert crl.next_update_utc > dt.datetime.now(dt.UTC)
    assert pki.revoked_ids() == {"dev-a"}


def test_revoke_covers_every_serial_of_the_identity(pki: Pki) -> None:
    first = _cert(pki.issue(Role.DEVICE, "dev-a").cert).serial_number
    second = _cert(pki.issue(Role.DEVICE, "dev-a").cert).serial_number
    pki.revoke("dev-a")
    crl = x509.load_pem_x509_crl(pki.crl.read_bytes())
    assert {r.serial_number for r in crl} == {first, second}


def test_revocation_reaches_a_running_registry_on_refresh(pki: Pki) -> None:
    pki.issue(Role.DEVICE, "dev-a")
    registry = KeyRegistry(pki)
    assert registry.key_for("dev-a", DEVICES)
    assert not registry.is_revoked("dev-a")
    assert registry.refresh() is False
    pki.revoke("dev-a")
    assert registry.refresh() is True
    assert registry.is_revoked("dev-a")
    with pytest.raises(Revoked):
        registry.key_for("dev-a", DEVICES)
    with pytest.raises(Revoked):
        KeyRegistry(pki).key_for("dev-a", DEVICES)


def test_revoked_id_cannot_be_issued_again_and_unknown_id_cannot_be_revoked(pki: Pki) -> None:
    pki.issue(Role.DEVICE, "dev-a")
    pki.revoke("dev-a")
    pki.revoke("dev-a")
    with pytest.raises(PkiError, match="revoked"):
        pki.issue(Role.DEVICE, "dev-a")
    with pytest.raises(PkiError, match="never issued"):
        pki.revoke("dev-nobody")


def test_registry_ignores_a_crl_not_signed_by_the_issuing_ca(pki: Pki, tmp_path: Path) -> None:
    pki.issue(Role.DEVICE, "dev-a")
    registry = KeyRegistry(pki)
    other = Pki(tmp_path / "other")
    other.init()
    other.issue(Role.DEVICE, "dev-a")
    other.revoke("dev-a")
    pki.crl.write_bytes(other.crl.read_bytes())
    assert registry.refresh() is False
    assert registry.key_for("dev-a", DEVICES)


# -- enrolment by CSR: the private key never leaves the device ----------------------------------


def test_sign_csr_certifies_the_devices_own_key(pki: Pki) -> None:
    device_key = new_key()
    csr = make_csr("dev-csr", device_key)
    chain_pem = pki.sign_csr(csr, Role.DEVICE)
    leaf, issuing = x509.load_pem_x509_certificates(chain_pem)
    leaf.verify_directly_issued_by(issuing)
    assert leaf.public_key() == device_key.public_key()
    assert role_of(leaf) is Role.DEVICE
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-csr"
    ident = pki.identity("dev-csr")
    assert ident.chain.read_bytes() == chain_pem
    assert not ident.key.exists()
    assert pki.index()["dev-csr"]["role"] == "device"


def test_a_device_enrolled_by_csr_can_send_verified_messages(pki: Pki) -> None:
    device_key = new_key()
    pki.sign_csr(make_csr("dev-csr", device_key), Role.DEVICE)
    data = seal(Message("dev-csr", 1, 0, "status", {"state": "online"}), KeySigner("dev-csr", device_key))
    message = verify_message("bl/v1/dev-csr/up/status", data, KeyRegistry(pki), DEVICES)
    assert message.body == {"state": "online"}


def test_sign_csr_refuses_bad_requests(pki: Pki) -> None:
    with pytest.raises(PkiError, match="PEM"):
        pki.sign_csr(b"not a csr", Role.DEVICE)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-ed")])
    ed_csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(ed_key, None)
    with pytest.raises(PkiError, match="P-256"):
        pki.sign_csr(ed_csr.public_bytes(serialization.Encoding.PEM), Role.DEVICE)
    key = new_key()
    bad_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev/evil")])
    bad_csr = x509.CertificateSigningRequestBuilder().subject_name(bad_name).sign(key, hashes.SHA256())
    with pytest.raises(PkiError, match="invalid id"):
        pki.sign_csr(bad_csr.public_bytes(serialization.Encoding.PEM), Role.DEVICE)
    pki.issue(Role.OFFICER, "officer-1")
    with pytest.raises(PkiError, match="already issued"):
        pki.sign_csr(make_csr("officer-1", new_key()), Role.DEVICE)


def test_issue_many_issues_like_issue_with_one_index_write(pki: Pki) -> None:
    idents = pki.issue_many(Role.DEVICE, ["fleet-1", "fleet-2", "fleet-3"])
    index = pki.index()
    for ident, name in zip(idents, ["fleet-1", "fleet-2", "fleet-3"], strict=True):
        assert index[name]["role"] == Role.DEVICE.value
        assert pki.require_identity(name).chain == ident.chain
        assert oct(ident.key.stat().st_mode & 0o777) == "0o600"
