"""Serving the API with uvicorn over mutual TLS.

uvicorn does not put the peer certificate in the ASGI scope, so `MtlsHttpToolsProtocol`
reads it from the TLS transport when a connection is made and adds the ASGI TLS
extension to every request's scope on that connection:
`scope["extensions"]["tls"]["client_cert_chain"] == [<leaf certificate PEM>]`.
The server context comes from `certs.tls.server_context` (client certificate from the
project's CA required, CRL checked); a client without one fails the handshake.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from asyncio import BaseTransport
from collections.abc import Iterator
from typing import Any

import uvicorn
from cryptography import x509
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from edge_agent.errors import BluelightError

_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}

Scope = dict[str, Any]


class HttpsError(BluelightError):
    """The HTTPS server cannot start (e.g. the port is taken)."""


def tls_extension(transport: Any) -> dict[str, Any]:
    """The ASGI TLS extension for a connection, from its transport."""
    ssl_object = transport.get_extra_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return {}
    der = ssl_object.getpeercert(binary_form=True)
    name = x509.load_der_x509_certificate(der).subject.rfc4514_string() if der else None
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,
    }


class _WithTls:
    """ASGI middleware for one connection: adds its TLS facts to each scope."""

    def __init__(self, app: Any, tls: dict[str, Any]) -> None:
        self.app = app
        self.tls = tls

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if self.tls:
            scope = {**scope, "extensions": {**(scope.get("extensions") or {}), "tls": self.tls}}
        await self.app(scope, receive, send)


class MtlsHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus the client certificate in the scope."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.app = _WithTls(self.app, tls_extension(transport))


class MtlsWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-IO WebSocket protocol, plus the client certificate in the scope
    (an upgraded connection gets a new protocol object on the same TLS transport)."""

    def connection_made(self, transport: BaseTransport) -> None:
        super().connection_made(transport)
        self.app = _WithTls(self.app, tls_extension(transport))


class QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the service that runs it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host:port` (0 picks a free port)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise HttpsError(f"cannot resolve --http-host {host!r}: {exc}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise HttpsError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def server_config(app: Any, context: ssl.SSLContext, *, log_level: str = "warning") -> uvicorn.Config:
    """A uvicorn config serving `app` with `context` (from `certs.tls.server_context`)."""
    context.set_alpn_protocols(["http/1.1"])
    return uvicorn.Config(
        app,
        http=MtlsHttpToolsProtocol,
        ws=MtlsWebSocketProtocol,
        ws_max_size=64 * 1024,
        ssl_context_factory=lambda _config, _default: context,
        lifespan="off",
        log_config=None,
        log_level=log_level,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=5,
    )
