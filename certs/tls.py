"""The one place TLS contexts are built. Verification is always on; there is no flag to
turn it off. Services take the contexts built here; they never build their own."""

from __future__ import annotations

import ssl

from certs.pki import Identity, Pki


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(pki: Pki, identity: Identity) -> ssl.SSLContext:
    """A client context presenting `identity` and trusting only the project's CA."""
    ctx = _harden(ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.require().ca_bundle)))
    ctx.check_hostname = True
    ctx.load_cert_chain(str(identity.chain), str(identity.key))
    return ctx


def server_context(pki: Pki, identity: Identity) -> ssl.SSLContext:
    """A server context that requires a client certificate from the project's CA that
    is not on the CRL."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.load_verify_locations(cafile=str(pki.require().ca_bundle))
    ctx.load_verify_locations(cafile=str(pki.crl))
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.load_cert_chain(str(identity.chain), str(identity.key))
    return ctx
