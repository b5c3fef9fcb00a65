"""The gateway's HTTP API, versioned under `/api/v1` (OpenAPI at `/api/v1/openapi.json`,
docs at `/api/v1/docs`). Served over mutual TLS by `gateway.https`; every route needs a
client certificate whose role (OU) is operator, admin or gateway.

Errors are JSON `{"error": <code>, "detail": <text>}`, one exception handler per type."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from cryptography import x509
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from certs.pki import id_of, role_of
from edge_agent.wire.errors import REASONS
from edge_agent.wire.ids import Role
from gateway.store import MISSING_LIMIT, Store, StoreError

#: Roles that may use the API.
API_ROLES = frozenset({Role.OPERATOR, Role.ADMIN, Role.GATEWAY})

T = TypeVar("T")


class ApiError(Exception):
    """Base of the API's errors; each subclass has its own handler and status."""

    code = "error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotAuthenticated(ApiError):
    code = "not_authenticated"


class Forbidden(ApiError):
    code = "forbidden"


class NotFound(ApiError):
    code = "not_found"


class Unavailable(ApiError):
    code = "unavailable"


class ErrorBody(BaseModel):
    error: str = Field(description="Stable error code.")
    detail: str = Field(description="What went wrong, for people.")


class Health(BaseModel):
    status: Literal["ok"]
    gateway_id: str
    ingest_connected: bool = Field(description="Whether the ingest holds a broker connection now.")


class Stats(BaseModel):
    accepted: int = Field(description="Messages verified and stored.")
    rejected: dict[str, int] = Field(description="Rejections by reason; every reason is listed.")
    late: int = Field(0, description="Accepted messages older than the replay window (store de-duplicated).")
    gaps: int = Field(0, description="Times a sender's sequence number jumped ahead.")
    skewed: int = Field(0, description="Stored messages flagged for clock skew.")
    devices: int = 0
    stored: int = 0
    ingest: dict[str, Any] | None = Field(None, description="This process's live ingest figures.")


class Device(BaseModel):
    id: str
    role: str | None
    online: bool | None = Field(description="From the latest (by seq) status message; null if none yet.")
    state: str | None = None
    last_seen: int | None = Field(description="When the last valid message was received (UTC ms).")
    first_seen: int | None = None
    last_seq: int = Field(description="Highest sequence number stored.")
    stored: int = Field(description="Messages stored.")
    missing: list[int] = Field(description=f"Sequence numbers below last_seq never received (first {MISSING_LIMIT}).")
    missing_count: int = Field(description="How many are missing in all.")
    clock_skew_ms: int | None = Field(None, description="Estimated gateway minus device clock (ms).")
    skewed: int = Field(0, description="Stored messages flagged for clock skew.")


@dataclass(frozen=True)
class Peer:
    """Who is calling: the client certificate's CN and OU."""

    id: str
    role: Role | None


def client_peer(request: Request) -> Peer:
    """The caller's identity from the TLS extension `gateway.https` puts in the scope."""
    tls = (request.scope.get("extensions") or {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or []
    if not chain:
        raise NotAuthenticated("a client certificate is required")
    cert = x509.load_pem_x509_certificate(chain[0].encode())
    return Peer(id_of(cert), role_of(cert))


def require_role(peer: Annotated[Peer, Depends(client_peer)]) -> Peer:
    if peer.role not in API_ROLES:
        role = peer.role.value if peer.role else "none"
        raise Forbidden(f"{peer.id} has role {role}; the API is for {', '.join(sorted(API_ROLES))}")
    return peer


def _handler(status: int) -> Callable[[Request, Exception], Any]:
    async def handle(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=status)

    return handle


_ERRORS: dict[int | str, dict[str, Any]] = {
    403: {"model": ErrorBody, "description": "The client certificate's role may not use the API."},
}


def create_app(
    db_path: Path,
    *,
    gateway_id: str,
    live: Callable[[], dict[str, Any]] | None = None,
) -> FastAPI:
    """The API over the store at `db_path` (read through its own connections).
    `live` adds the running ingest's figures to `/stats` and `/health`."""

    async def read(fn: Callable[[Store], T]) -> T:
        def run() -> T:
            try:
                with Store.open(db_path, readonly=True) as store:
                    return fn(store)
            except StoreError as exc:
                raise Unavailable(str(exc)) from None

        return await asyncio.to_thread(run)

    app = FastAPI(
        title="Bluelight gateway API",
        version="1",
        description="Ingest statistics and the device list of a Bluelight gateway. Mutual TLS; "
        "client certificates of role operator, admin or gateway.",
        openapi_url="/api/v1/openapi.json",
        docs_url="/api/v1/docs",
        redoc_url=None,
    )
    for exc_type, status in ((NotAuthenticated, 401), (Forbidden, 403), (NotFound, 404), (Unavailable, 503)):
        app.add_exception_handler(exc_type, _handler(status))

    router = APIRouter(prefix="/api/v1", dependencies=[Depends(require_role)], responses=_ERRORS)

    @router.get("/health", response_model=Health, summary="Liveness")
    async def health() -> Health:
        connected = bool(live()["connected"]) if live is not None else False
        return Health(status="ok", gateway_id=gateway_id, ingest_connected=connected)

    @router.get("/stats", response_model=Stats, summary="Accepted and rejected counts")
    async def stats() -> Stats:
        figures = await read(Store.stats)
        figures["rejected"] = {reason: figures["rejected"].get(reason, 0) for reason in REASONS}
        return Stats(**figures, ingest=live() if live is not None else None)

    @router.get("/devices", response_model=list[Device], summary="Every device that sent a valid message")
    async def devices() -> list[Device]:
        return [Device(**d) for d in await read(Store.devices)]

    @router.get(
        "/devices/{device_id}",
        response_model=Device,
        summary="One device",
        responses={404: {"model": ErrorBody, "description": "No valid message from this device yet."}},
    )
    async def device(device_id: str) -> Device:
        found = await read(lambda store: store.device(device_id))
        if found is None:
            raise NotFound(f"no device {device_id!r}")
        return Device(**found)

    app.include_router(router)
    return app
