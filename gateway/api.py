"""The gateway's HTTP API, versioned under `/api/v1` (OpenAPI at `/api/v1/openapi.json`,
docs at `/api/v1/docs`). Served over mutual TLS by `gateway.https`; every route needs a
client certificate whose role (OU) is operator, admin or gateway.

Errors are JSON `{"error": <code>, "detail": <text>}`, one exception handler per type."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from cryptography import x509
from fastapi import APIRouter, Depends, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, field_validator
from starlette.requests import HTTPConnection

from certs.pki import id_of, role_of
from edge_agent.wire.errors import REASONS
from edge_agent.wire.ids import Role
from gateway.core.alerts import AlertError
from gateway.core.anpr import HotlistEntry, normalise_plate
from gateway.situation import HotlistNotSaved, HotlistRefused, SituationService
from gateway.store import MISSING_LIMIT, Store, StoreError

#: Roles that may use the API.
API_ROLES = frozenset({Role.OPERATOR, Role.ADMIN, Role.GATEWAY})
#: Roles that may change the picture: open and close incidents, override alerts.
OPERATOR_ROLES = frozenset({Role.OPERATOR, Role.ADMIN})

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


class Conflict(ApiError):
    code = "conflict"


class Invalid(ApiError):
    code = "invalid"


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
    situation: dict[str, Any] | None = Field(
        None, description="The situational picture's counters (alerts published and retried, flags, audit "
        "entries, state saved and restored, answers refused by reason)."
    )


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


class NewIncident(BaseModel):
    type: str = Field("operator", pattern=r"^[a-z][a-z0-9_]{0,39}$", description="Incident type (a policy rule).")
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)
    note: str = Field("", max_length=500)


class Created(BaseModel):
    incident_id: str


class Override(BaseModel):
    new_unit_id: str | None = Field(None, description="Reassign to this unit; or set `cancel`.")
    cancel: bool = False
    reason: str = Field(min_length=1, max_length=500, description="Why (kept in the audit log).")


class Close(BaseModel):
    reason: str = Field("", max_length=500)


class HotlistItem(BaseModel):
    plate: str = Field(description="Normalised: upper case, letters and digits only.")
    reason: str
    expires_ts: int = Field(description="When the entry stops matching (UTC ms).")
    priority: int = Field(description="1 (highest) to 9.")
    markers: list[str] = Field(description="Warnings for the officer (armed, stolen, violent, ...).")
    expired: bool = Field(False, description="Past expires_ts: kept, but never matched.")


class NewHotlistEntry(BaseModel):
    plate: str = Field(max_length=20, description="Any spacing or case; stored normalised (AB12 CDE -> AB12CDE).")
    reason: str = Field(min_length=1, max_length=200)
    expires_ts: int = Field(gt=0, description="UTC ms, in the future.")
    priority: int = Field(3, ge=1, le=9)
    markers: list[str] = Field(default_factory=list, max_length=16)

    @field_validator("plate")
    @classmethod
    def _plate(cls, value: str) -> str:
        plate = normalise_plate(value)
        if not 2 <= len(plate) <= 12 or not plate.isascii():
            raise ValueError("a plate is 2-12 letters and digits once spaces and punctuation are dropped")
        return plate

    @field_validator("reason")
    @classmethod
    def _reason(cls, value: str) -> str:
        if not value.strip() or not value.isprintable():
            raise ValueError("the reason must be printable text")
        return value.strip()

    @field_validator("expires_ts")
    @classmethod
    def _future(cls, value: int) -> int:
        if value <= time.time_ns() // 1_000_000:
            raise ValueError("expires_ts must be in the future (UTC ms)")
        return value

    @field_validator("markers")
    @classmethod
    def _markers(cls, value: list[str]) -> list[str]:
        markers = sorted({m.strip().lower() for m in value if m.strip()})
        if any(len(m) > 32 or not m.replace("_", "").replace("-", "").isalnum() for m in markers):
            raise ValueError("markers are words of up to 32 letters, digits, '-' or '_'")
        return markers

    def entry(self) -> HotlistEntry:
        return HotlistEntry(self.plate, self.reason, self.expires_ts, self.priority, frozenset(self.markers))


@dataclass(frozen=True)
class Peer:
    """Who is calling: the client certificate's CN and OU."""

    id: str
    role: Role | None


def client_peer(request: HTTPConnection) -> Peer:
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


def require_operator(peer: Annotated[Peer, Depends(require_role)]) -> Peer:
    """Changing the picture (incidents, overrides) is for operators and admins."""
    if peer.role not in OPERATOR_ROLES:
        role = peer.role.value if peer.role else "none"
        raise Forbidden(f"{peer.id} has role {role}; changes are for {', '.join(sorted(OPERATOR_ROLES))}")
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
    situation: SituationService | None = None,
) -> FastAPI:
    """The API over the store at `db_path` (read through its own connections).
    `live` adds the running ingest's figures to `/stats` and `/health`; `situation`
    serves the picture, incidents, alerts, operators' changes and the live stream."""

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
    errors = ((NotAuthenticated, 401), (Forbidden, 403), (NotFound, 404), (Conflict, 409), (Invalid, 422),
              (Unavailable, 503))
    for exc_type, status in errors:
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
        return Stats(**figures, ingest=live() if live is not None else None,
                     situation=situation.live() if situation is not None else None)

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

    if situation is not None:
        _situation_routes(app, router, situation)
    app.include_router(router)
    return app


def _situation_routes(app: FastAPI, router: APIRouter, situation: SituationService) -> None:
    """The situational picture: GeoJSON, incidents, alerts, operators' changes, stream."""
    operator = [Depends(require_operator)]

    def incident_or_404(incident_id: str) -> dict[str, Any]:
        try:
            return situation.incident(incident_id)
        except KeyError:
            raise NotFound(f"no incident {incident_id!r}") from None

    @router.get("/picture", summary="The live picture as a GeoJSON FeatureCollection",
                response_class=JSONResponse, responses={200: {"content": {"application/geo+json": {}}}})
    async def picture() -> JSONResponse:
        return JSONResponse(situation.picture(), media_type="application/geo+json")

    @router.get("/incidents", summary="Every incident with its recommendation and alerts")
    async def incidents() -> list[dict[str, Any]]:
        return situation.incidents()

    @router.get("/incidents/{incident_id}", summary="One incident",
                responses={404: {"model": ErrorBody, "description": "No such incident."}})
    async def incident(incident_id: str) -> dict[str, Any]:
        return incident_or_404(incident_id)

    @router.post("/incidents", status_code=201, response_model=Created, dependencies=operator,
                 summary="Open an incident (operators); it is decided and alerted like any other")
    async def create_incident(body: NewIncident, peer: Annotated[Peer, Depends(client_peer)]) -> Created:
        return Created(incident_id=situation.create_incident(body.type, body.lat, body.lon, by=peer.id,
                                                             note=body.note))

    @router.post("/incidents/{incident_id}/close", dependencies=operator, summary="Close an incident (operators)",
                 responses={404: {"model": ErrorBody, "description": "No such incident."}})
    async def close_incident(incident_id: str, body: Close,
                             peer: Annotated[Peer, Depends(client_peer)]) -> dict[str, Any]:
        incident_or_404(incident_id)
        situation.close_incident(incident_id, peer.id, reason=body.reason)
        return incident_or_404(incident_id)

    async def override(target: str, body: Override, peer: Peer) -> None:
        try:
            situation.override(target, peer.id, reason=body.reason, new_unit_id=body.new_unit_id,
                               cancel=body.cancel)
        except AlertError as exc:
            if exc.reason == "unknown_alert":
                raise NotFound(str(exc)) from None
            raise Conflict(str(exc)) from None

    conflict: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "No such alert or incident."},
                409: {"model": ErrorBody, "description": "The override does not fit the alert's state."}}

    @router.post("/incidents/{incident_id}/override", dependencies=operator, responses=conflict,
                 summary="Reassign an incident to another unit, or cancel its alerts (operators)")
    async def override_incident(incident_id: str, body: Override,
                                peer: Annotated[Peer, Depends(client_peer)]) -> dict[str, Any]:
        incident_or_404(incident_id)
        await override(incident_id, body, peer)
        return incident_or_404(incident_id)

    @router.post("/alerts/{alert_id}/override", dependencies=operator, responses=conflict,
                 summary="Reassign one alert to another unit, or cancel it (operators)")
    async def override_alert(alert_id: str, body: Override,
                             peer: Annotated[Peer, Depends(client_peer)]) -> dict[str, Any]:
        await override(alert_id, body, peer)
        return situation.situation.alert_json(alert_id)

    @router.get("/alerts", summary="Every alert with its lifecycle (sent, delivered, answered, escalated, ...)")
    async def alerts() -> list[dict[str, Any]]:
        return situation.alerts()

    @router.get("/hotlist", response_model=list[HotlistItem], summary="The ANPR hotlist, by plate")
    async def hotlist() -> list[HotlistItem]:
        return [HotlistItem(**e) for e in situation.hotlist()]

    unsaved: dict[int | str, dict[str, Any]] = {
        503: {"model": ErrorBody, "description": "The hotlist file could not be written; nothing changed."},
    }

    @router.post("/hotlist", status_code=201, response_model=HotlistItem, dependencies=operator,
                 responses={422: {"model": ErrorBody, "description": "Expiry not in the future."}, **unsaved},
                 summary="Add an entry, or replace the entry for its plate (operators); live at once, audited")
    async def put_hotlist(body: NewHotlistEntry, peer: Annotated[Peer, Depends(client_peer)]) -> HotlistItem:
        entry = body.entry()
        try:
            await situation.put_hotlist_entry(entry, by=peer.id)
        except HotlistRefused as exc:
            raise Invalid(str(exc)) from None
        except HotlistNotSaved as exc:
            raise Unavailable(str(exc)) from None
        return HotlistItem(**situation.hotlist_json(entry))

    @router.delete("/hotlist/{plate}", response_model=HotlistItem, dependencies=operator,
                   responses={404: {"model": ErrorBody, "description": "No entry for this plate."}, **unsaved},
                   summary="Remove a plate's entry (operators); returns it")
    async def delete_hotlist(plate: str, peer: Annotated[Peer, Depends(client_peer)]) -> HotlistItem:
        try:
            entry = await situation.remove_hotlist_entry(plate, by=peer.id)
        except KeyError:
            raise NotFound(f"no hotlist entry for {normalise_plate(plate) or plate!r}") from None
        except HotlistNotSaved as exc:
            raise Unavailable(str(exc)) from None
        return HotlistItem(**situation.hotlist_json(entry))

    @app.websocket("/api/v1/stream")
    async def stream(websocket: WebSocket) -> None:
        """The picture live: one `snapshot` message, then `delta` messages with the
        changed features (`changes`: [{layer, id, op, feature}]), at most one per tick."""
        try:
            require_role(client_peer(websocket))
        except ApiError as exc:
            await websocket.close(code=1008, reason=exc.detail[:120])
            return
        await websocket.accept()
        sub = situation.hub.subscribe()

        async def pump() -> None:
            features = situation.picture()["features"]
            await websocket.send_json({"type": "snapshot", "features": features})
            while True:
                await sub.ready.wait()
                await asyncio.sleep(situation.tick_s)  # gather a tick's worth of changes
                await websocket.send_json({"type": "delta", "changes": [d.as_json() for d in sub.take()]})

        try:
            async with asyncio.TaskGroup() as tg:
                sender = tg.create_task(pump(), name="stream-send")
                while (await websocket.receive())["type"] != "websocket.disconnect":
                    pass  # clients send nothing the stream needs; their close ends it
                sender.cancel()
        except* WebSocketDisconnect:
            pass  # the client went away mid-send
        finally:
            situation.hub.unsubscribe(sub)
