"""The PKI's audit log (`DIR/audit.db`): every certificate issued and every revocation
is one entry signed by the issuing CA, verified by `bluelight audit verify`; tampering
shows; no key material is ever recorded; an altered log stops issuing, never revoking;
and `certs` needs none of the gateway's extras to do it."""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bluelight.cli import cli
from certs.auditchain import AuditEntry
from certs.auditlog import AuditLog, open_for_reading, read_entries, verify_db
from certs.pki import ISSUING_CA_KID, Pki, PkiError, fingerprint, make_csr, new_key, os_user
from certs.registry import audit_keys
from edge_agent.wire.envelope import KeySigner
from edge_agent.wire.ids import Role
from tests.unit.test_audit import _tamper

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    p = Pki(tmp_path / "pki")
    p.init(actor="installer-1")
    return p


def _run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), prog_name="bluelight")


def _entries(pki: Pki) -> list[AuditEntry]:
    conn = open_for_reading(pki.audit_path)
    try:
        entries = list(read_entries(conn))
    finally:
        conn.close()
    assert all(isinstance(e, AuditEntry) for e in entries)
    return entries  # type: ignore[return-value]


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_init_records_the_cas_and_both_certificates(pki: Pki) -> None:
    entries = _entries(pki)
    assert [(e.action, e.subject) for e in entries] == [
        ("pki.created", ISSUING_CA_KID), ("enrolment", "broker"), ("enrolment", "gateway"),
    ]
    assert {e.kid for e in entries} == {ISSUING_CA_KID}
    assert {e.actor for e in entries} == {"installer-1"}
    created, broker, gateway = (e.data for e in entries)
    assert created["issuing"]["fingerprint"] == fingerprint(_cert(pki.issuing_cert))
    assert broker["serial"] == str(_cert(pki.broker.cert).serial_number)
    assert gateway["role"] == "gateway"
    assert gateway["hosts"] == ["localhost", "127.0.0.1"]
    report = verify_db(pki.audit_path, audit_keys(pki))
    assert report.ok, report
    assert report.count == 3


def test_cli_issue_and_revoke_append_verified_entries(pki: Pki) -> None:
    root = str(pki.root)
    result = _run("pki", "issue", "--dir", root, "--role", "device", "--id", "van-17", "--actor", "installer-7")
    assert result.exit_code == 0, result.output
    result = _run("pki", "revoke", "--dir", root, "--id", "van-17")
    assert result.exit_code == 0, result.output

    *_, issued, revoked = _entries(pki)
    cert = _cert(pki.identity("van-17").cert)
    assert (issued.action, issued.actor, issued.subject) == ("enrolment", "installer-7", "van-17")
    assert issued.data == {
        "role": "device", "serial": str(cert.serial_number), "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(), "fingerprint": fingerprint(cert),
        "method": "generated", "os_user": os_user(),
    }
    assert (revoked.action, revoked.actor, revoked.subject) == ("device.revoked", os_user(), "van-17")
    assert revoked.data["serials"] == [str(cert.serial_number)]
    assert revoked.data["already_revoked"] is False
    assert revoked.data["revoked_at"] == pki.index()["van-17"]["revoked_at"]

    result = _run("audit", "verify", str(pki.audit_path), "--pki", root)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"ok: 5 entries, head 5:{revoked.hash.hex()}")


def test_enrolment_by_csr_is_recorded_with_the_installer(pki: Pki) -> None:
    chain = pki.sign_csr(make_csr("cam-3", new_key()), Role.DEVICE, actor="installer-2")
    leaf = x509.load_pem_x509_certificates(chain)[0]
    last = _entries(pki)[-1]
    assert (last.action, last.actor, last.subject) == ("enrolment", "installer-2", "cam-3")
    assert (last.data["method"], last.data["serial"]) == ("csr", str(leaf.serial_number))
    assert last.data["fingerprint"] == fingerprint(leaf)
    assert verify_db(pki.audit_path, audit_keys(pki)).ok


def test_a_refused_issue_records_nothing(pki: Pki) -> None:
    pki.issue(Role.OFFICER, "off-1")
    before = len(_entries(pki))
    with pytest.raises(PkiError, match="already issued"):
        pki.sign_csr(make_csr("off-1", new_key()), Role.DEVICE)
    with pytest.raises(PkiError, match="names the issuing CA"):
        pki.issue(Role.GATEWAY, ISSUING_CA_KID)
    with pytest.raises(PkiError, match="actor"):
        pki.issue(Role.DEVICE, "dev-x", actor="")
    assert len(_entries(pki)) == before
    assert not pki.identity(ISSUING_CA_KID).cert.exists()


def test_revoking_twice_records_both_calls(pki: Pki) -> None:
    pki.issue(Role.DEVICE, "dev-r")
    pki.revoke("dev-r", actor="ops-1")
    pki.revoke("dev-r", actor="ops-2")
    first, second = _entries(pki)[-2:]
    assert (first.actor, first.data["already_revoked"]) == ("ops-1", False)
    assert (second.actor, second.data["already_revoked"]) == ("ops-2", True)
    assert first.data["revoked_at"] == second.data["revoked_at"]


def test_cli_verify_names_a_tampered_entry(pki: Pki) -> None:
    pki.issue(Role.DEVICE, "van-9")
    pki.revoke("van-9")
    conn = sqlite3.connect(pki.audit_path)
    (text,) = conn.execute("SELECT data FROM audit WHERE seq = 4").fetchone()
    conn.close()
    forged = json.dumps({**json.loads(text), "role": "officer"}, sort_keys=True, separators=(",", ":"))
    _tamper(pki.audit_path, "UPDATE audit SET data = ? WHERE seq = 4", (forged,))
    result = _run("audit", "verify", str(pki.audit_path), "--pki", str(pki.root))
    assert result.exit_code == 3, result.output
    assert "entry 4 (enrolment at " in result.stderr
    assert "hash mismatch" in result.stderr


def test_a_log_signed_by_another_pkis_ca_does_not_verify(pki: Pki, tmp_path: Path) -> None:
    other = Pki(tmp_path / "other")
    other.init()
    result = _run("audit", "verify", str(other.audit_path), "--pki", str(pki.root))
    assert result.exit_code == 3, result.output
    assert "entry 1 (pki.created at " in result.stderr
    assert f"bad signature — the entry was not signed by its signer's key (signer {ISSUING_CA_KID})" in result.stderr


def test_an_entry_by_another_key_under_the_cas_kid_is_a_bad_signature(pki: Pki) -> None:
    with AuditLog.open(pki.audit_path, KeySigner(ISSUING_CA_KID, new_key())) as log:
        log.append("enrolment", "intruder", "ghost", {"role": "admin"}, ts=1)
    report = verify_db(pki.audit_path, audit_keys(pki))
    assert report.broken is not None
    assert (report.broken.seq, report.broken.reason) == (4, "signature")


def test_gateway_signed_entries_still_verify_with_the_same_lookup(pki: Pki, tmp_path: Path) -> None:
    from certs.signing import load_signer  # noqa: PLC0415

    db = tmp_path / "gw.db"
    with AuditLog.open(db, load_signer(pki, "gateway")) as log:
        log.append("alert.sent", "gateway", "alert-1", {}, ts=1)
    assert verify_db(db, audit_keys(pki)).ok


def test_an_altered_log_stops_issuing_but_never_revoking(pki: Pki) -> None:
    pki.issue(Role.DEVICE, "lost-1")
    _tamper(pki.audit_path, "DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)")
    with pytest.raises(PkiError, match="nothing was issued"):
        pki.issue(Role.DEVICE, "dev-new")
    assert "dev-new" not in pki.index()
    assert not pki.identity("dev-new").cert.exists()
    result = _run("pki", "revoke", "--dir", str(pki.root), "--id", "lost-1")
    assert result.exit_code == 1
    assert "lost-1 is revoked and the CRL rewritten, but the revocation is not recorded" in result.stderr
    assert "lost-1" in pki.revoked_ids()


def test_init_refuses_to_continue_an_earlier_pkis_log(pki: Pki) -> None:
    pki.index_path.unlink()
    with pytest.raises(PkiError, match="audit log of an earlier PKI"):
        pki.init()


def _private_key_forms(pki: Pki) -> list[bytes]:
    """Every private key in the PKI directory in every form it could leak in."""
    forms: list[bytes] = []
    for path in sorted(pki.root.rglob("*.key")):
        pem = path.read_bytes()
        key = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        scalar = key.private_numbers().private_value.to_bytes(32, "big")
        der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        body = b"".join(pem.strip().splitlines()[1:-1])
        forms += [scalar, scalar.hex().encode(), base64.b64encode(scalar), der, body[:48]]
    return forms


def test_no_private_key_bytes_ever_reach_the_log(pki: Pki) -> None:
    pki.issue(Role.DEVICE, "dev-k")
    pki.issue(Role.ADMIN, "admin-k")
    pki.sign_csr(make_csr("dev-csr", new_key()), Role.DEVICE)
    pki.revoke("dev-k")
    stored = b"".join(p.read_bytes() for p in pki.root.glob("audit.db*"))
    forms = _private_key_forms(pki)
    assert len(forms) == 5 * 6  # root, issuing, broker, gateway, dev-k, admin-k
    for form in forms:
        assert form not in stored
    for entry in _entries(pki):
        assert "PRIVATE" not in json.dumps(entry.data)


def test_certs_records_without_the_gateway_extras(tmp_path: Path) -> None:
    """The PKI and its audit log import and work with fastapi, uvicorn, sqlite_utils,
    numpy, orjson, yaml and websockets unavailable (an edge device or an offline CA)."""
    script = textwrap.dedent(f"""
        import sys
        for name in ("fastapi", "uvicorn", "sqlite_utils", "numpy", "orjson", "yaml", "websockets", "httptools"):
            sys.modules[name] = None
        from pathlib import Path
        from certs.auditlog import verify_db
        from certs.pki import Pki
        from certs.registry import audit_keys
        from edge_agent.wire.ids import Role
        pki = Pki(Path({str(tmp_path / "pki")!r}))
        pki.init()
        pki.issue(Role.DEVICE, "dev-1")
        pki.revoke("dev-1")
        assert verify_db(pki.audit_path, audit_keys(pki)).count == 5
        assert not any(m.startswith("gateway") for m in sys.modules), sorted(sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={"PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
