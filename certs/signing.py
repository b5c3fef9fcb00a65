"""Load an identity's message signer from its key in a PKI directory."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa

from certs.pki import Pki, PkiError
from edge_agent.wire.envelope import KeySigner


def load_signer(pki: Pki, identity: str) -> KeySigner:
    """The identity's message signer, from its private key (which must match its cert)."""
    ident = pki.require_identity(identity)
    try:
        key = serialization.load_pem_private_key(ident.key.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(ident.cert.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise PkiError(f"cannot load the key or certificate of {identity!r}: {exc.__class__.__name__}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | mldsa.MLDSA44PrivateKey):
        raise PkiError(f"{ident.key}: unsupported key type {type(key).__name__}")
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*raw) != cert.public_key().public_bytes(*raw):
        raise PkiError(f"{ident.key} does not belong to the certificate {ident.cert}")
    return KeySigner(identity, key)
