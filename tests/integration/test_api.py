"""The gateway's HTTPS API over real mutual TLS (uvicorn on a free port): the documented
JSON for an operator, 403 for a device, a failed handshake without a client certificate
or with one from another CA, and the published OpenAPI document."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization

from certs.pki import Pki
from certs.registry import KeyRegistry
from certs.tls import client_context, server_context
from edge_agent.wire.envelope import KeySigner, Message, seal
from edge_agent.wire.errors import REASONS
from edge_agent.wire.ids import Role
from gateway.api import create_app
from gateway.core import Accepted, IngestCore, Rejection
from gateway.https import QuietServer, bind, server_config
from gateway.store import Store

pytestmark = pytest.mark.integration

NOW = 1_760_000_000_000
DEVICE_KEYS = {"id", "role", "online", "last_seen", "last_seq", "stored", "missing"}


def seed_store(pki: Pki, db: Path) -> None:
    """dev-a sends seqs 1, 2, 4 and a status; one message is garbage."""
    key = serialization.load_pem_private_key(pki.identity("dev-a").key.read_bytes(), password=None)
    signer = KeySigner("dev-a", key)  # type: ignore[arg-type]
    core = IngestCore(KeyRegistry(pki))

    def send(seq: int, kind: str, body: dict[str, Any]) -> Accepted | Rejection:
        return core.ingest(f"bl/v1/dev-a/up/{kind}", seal(Message("dev-a", seq, NOW, kind, body), signer), NOW)

    results = [send(seq, "telemetry", {"lat": 1, "lon": 2}) for seq in (1, 2, 4)]
    results.append(send(5, "status", {"state": "online"}))
    garbage = core.ingest("bl/v1/dev-a/up/telemetry", b"\x00", NOW)
    records = [r for r in results if isinstance(r, Accepted)]
    assert len(records) == 4
    with Store.open(db) as store:
        store.write_batch(records, rejected={garbage.reason: 1}, roles={"dev-a": "device"})


@pytest_asyncio.fixture
async def api(pki: Pki, tmp_path: Path) -> AsyncIterator[str]:
    """The real HTTPS server (mutual TLS, the gateway's certificate) on a free port."""
    db = tmp_path / "gw.db"
    seed_store(pki, db)
    app = create_app(db, gateway_id="gateway", live=lambda: {"connected": True})
    server = QuietServer(server_config(app, server_context(pki, pki.identity("gateway"))))
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:  # uvicorn has no started event
                await asyncio.sleep(0.01)
        yield f"https://localhost:{port}/api/v1"
    finally:
        server.should_exit = True
        async with asyncio.timeout(10):
            await task
        sock.close()


def client_for(pki: Pki, identity: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(verify=client_context(pki, pki.identity(identity)), timeout=5)


async def get(pki: Pki, identity: str, url: str) -> httpx.Response:
    async with client_for(pki, identity) as client:
        return await client.get(url)


async def test_operator_gets_stats_and_devices(api: str, pki: Pki) -> None:
    async with client_for(pki, "operator-1") as client:
        health = await client.get(f"{api}/health")
        stats = await client.get(f"{api}/stats")
        devices = await client.get(f"{api}/devices")
        one = await client.get(f"{api}/devices/dev-a")
        none = await client.get(f"{api}/devices/dev-zz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert stats.status_code == 200
    body: dict[str, Any] = stats.json()
    assert body["accepted"] == 4
    assert set(body["rejected"]) == set(REASONS)
    assert body["rejected"]["malformed"] == 1
    assert sum(body["rejected"].values()) == 1
    assert devices.status_code == 200
    (dev,) = devices.json()
    assert set(dev) >= DEVICE_KEYS
    assert (dev["id"], dev["role"], dev["online"], dev["last_seq"], dev["stored"], dev["missing"]) == (
        "dev-a", "device", True, 5, 4, [3],
    )  # fmt: skip
    assert dev["last_seen"] == NOW
    assert one.json() == dev
    assert none.status_code == 404
    assert none.json()["error"] == "not_found"


@pytest.mark.parametrize("identity", ["gateway"])
async def test_gateway_role_may_read(api: str, pki: Pki, identity: str) -> None:
    assert (await get(pki, identity, f"{api}/stats")).status_code == 200


@pytest.mark.parametrize("identity", ["dev-b", "officer-1"])
async def test_other_roles_get_403(api: str, pki: Pki, identity: str) -> None:
    for path in ("health", "stats", "devices"):
        response = await get(pki, identity, f"{api}/{path}")
        assert response.status_code == 403
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"] == "forbidden"
        assert identity in response.json()["detail"]


async def test_no_client_certificate_fails_the_handshake(api: str, pki: Pki) -> None:
    no_cert = ssl.create_default_context(cafile=str(pki.ca_bundle))
    async with httpx.AsyncClient(verify=no_cert, timeout=5) as client:
        with pytest.raises(httpx.TransportError):
            await client.get(f"{api}/stats")


async def test_certificate_from_another_ca_fails_the_handshake(api: str, pki: Pki, tmp_path: Path) -> None:
    other = Pki(tmp_path / "other-pki")
    other.init()
    stranger = other.issue(Role.OPERATOR, "operator-1")  # same name, wrong CA
    ctx = ssl.create_default_context(cafile=str(pki.ca_bundle))  # trusts our server...
    ctx.load_cert_chain(str(stranger.chain), str(stranger.key))  # ...but presents a foreign certificate
    async with httpx.AsyncClient(verify=ctx, timeout=5) as client:
        with pytest.raises(httpx.TransportError):
            await client.get(f"{api}/stats")


async def test_openapi_lists_the_paths(api: str, pki: Pki) -> None:
    async with client_for(pki, "operator-1") as client:
        spec = (await client.get(f"{api}/openapi.json")).json()
        docs = await client.get(f"{api}/docs")
    assert {"/api/v1/health", "/api/v1/stats", "/api/v1/devices"} <= set(spec["paths"])
    stats_schema = spec["paths"]["/api/v1/stats"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert stats_schema["$ref"].endswith("/Stats")
    assert "403" in spec["paths"]["/api/v1/devices"]["get"]["responses"]
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
