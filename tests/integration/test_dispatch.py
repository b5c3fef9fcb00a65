"""Next best action end to end through a real Mosquitto with mutual TLS: officers'
devices report fixes; one presses panic; the gateway sends signed alerts to the right
officers' `down/alert` topics; the app's delivery receipt and the officer's acceptance
come back on `up/ack`; the unit turns committed; operators see it all on the API and
the WebSocket stream; operators open incidents, devices may not; the audit chain
verifies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
import yaml

from certs.auditlog import open_for_reading, verify_db
from certs.pki import Identity, Pki
from certs.registry import audit_keys
from certs.tls import client_context
from edge_agent.wire.envelope import Message
from edge_agent.wire.geo import offset
from edge_agent.wire.ids import Role
from gateway.core.picture import Picture
from gateway.service import Gateway
from tests.helpers import MosquittoProcess
from tests.integration.test_gateway import Device, device, eventually, running, settings_for

pytestmark = pytest.mark.integration

CENTRE = (51.5, -0.12)
#: metres north of the centre
PLACES = {"disp-a": 0, "disp-b": 150, "disp-c": 400, "disp-sgt": 700, "disp-far": 3000}


def at(north: float) -> dict[str, float]:
    lat, lon = offset(CENTRE, north, 0)
    return {"lat": lat, "lon": lon, "acc": 5.0}


class Officer:
    """A test officer's device: sends fixes and acks; `alerts` are the verified ones."""

    def __init__(self, dev: Device) -> None:
        self.dev = dev
        self.seq = 0

    @property
    def alerts(self) -> list[Message]:
        return self.dev.alerts

    async def send(self, kind: str, body: dict[str, Any]) -> None:
        self.seq += 1
        await self.dev.send(self.seq, kind, body)


@contextlib.asynccontextmanager
async def officer(pki: Pki, ident: Identity, broker: MosquittoProcess) -> AsyncIterator[Officer]:
    async with device(pki, ident, broker) as dev:
        yield Officer(dev)


def client(pki: Pki, identity: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(verify=client_context(pki, pki.identity(identity)), timeout=5)


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    units = [{"id": u, "kind": "officer", "supervisor": u == "disp-sgt"} for u in PLACES]
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump({"units": units}))
    return path


async def on_the_picture(gw: Gateway, officers: Mapping[str, Officer]) -> Picture:
    """Every officer reports available at its place; returns the gateway's picture once
    all of them are on it with a started track."""
    for unit, off in officers.items():
        await off.send("status", {"state": "available"})
        await off.send("telemetry", at(PLACES[unit]))
    assert gw.situation is not None
    picture = gw.situation.situation.picture
    await eventually(lambda: all(u in picture.units and picture.units[u].track.started for u in officers),
                     what="every officer on the picture")
    return picture


async def test_panic_to_alert_to_acceptance_with_audit(
    pki: Pki, broker: MosquittoProcess, tmp_path: Path, issue: Callable[[Role, str], Identity], registry: Path
) -> None:
    for unit in PLACES:
        issue(Role.DEVICE, unit)
    issue(Role.OPERATOR, "disp-operator")
    settings = settings_for(pki, broker, tmp_path / "gw.db", registry_path=registry, batch_latency_ms=10,
                            tick_ms=50)
    async with contextlib.AsyncExitStack() as stack:
        gw: Gateway = await stack.enter_async_context(running(settings))
        officers = {u: await stack.enter_async_context(officer(pki, pki.identity(u), broker)) for u in PLACES}
        picture = await on_the_picture(gw, officers)

        api = await stack.enter_async_context(client(pki, "disp-operator"))
        ws_ctx = ssl.create_default_context(cafile=str(pki.ca_bundle))
        ident = pki.identity("disp-operator")
        ws_ctx.load_cert_chain(ident.cert, ident.key)
        ws_url = gw.api_url.replace("https://", "wss://") + "/stream"
        stream = await stack.enter_async_context(websockets.connect(ws_url, ssl=ws_ctx))
        snapshot = json.loads(await stream.recv())
        assert snapshot["type"] == "snapshot"
        assert {f["properties"]["id"] for f in snapshot["features"]} >= set(PLACES)

        await officers["disp-a"].send("event", {"type": "panic", **at(0)})
        await eventually(lambda: sum(len(o.alerts) for o in officers.values()) >= 3, what="three alerts")
        asked = {u for u, o in officers.items() if o.alerts}
        assert asked == {"disp-b", "disp-c", "disp-sgt"}  # two nearest + the supervisor, never the subject
        alert = officers["disp-b"].alerts[0]
        assert alert.sender == "gateway"  # verified against the gateway's certificate
        assert alert.body["incident_id"]
        assert alert.body["reasons"]

        alert_id = alert.body["alert_id"]
        await officers["disp-b"].send("ack", {"alert_id": alert_id, "answer": "received"})
        await officers["disp-b"].send("ack", {"alert_id": alert_id, "answer": "accepted"})
        await eventually(lambda: picture.units["disp-b"].state == "committed", what="disp-b committed")

        alerts = (await api.get(f"{gw.api_url}/alerts")).json()
        states = {a["alert_id"]: [h["state"] for h in a["history"]] for a in alerts}
        assert states[alert_id] == ["created", "sent", "delivered", "accepted"]
        geo = await api.get(f"{gw.api_url}/picture")
        assert geo.headers["content-type"].startswith("application/geo+json")
        units = {f["properties"]["id"]: f["properties"] for f in geo.json()["features"]
                 if f["properties"]["layer"] == "unit"}
        assert units["disp-b"]["state"] == "committed"
        [incident] = (await api.get(f"{gw.api_url}/incidents")).json()
        assert (incident["type"], incident["subject"]) == ("panic", "disp-a")
        assert incident["recommendation"]["chosen"]
        stats = (await api.get(f"{gw.api_url}/stats")).json()
        assert stats["situation"]["alert_published"] >= 3
        assert stats["ingest"]["connected"] is True

        seen: dict[str, Any] = {}
        async with asyncio.timeout(5):
            while seen.get("disp-b", {}).get("state") != "committed":
                message = json.loads(await stream.recv())
                assert message["type"] == "delta"
                for change in message["changes"]:
                    if change["layer"] == "units":
                        seen[change["id"]] = change["feature"]["properties"]

        # an operator opens an incident and it is alerted; a device may not open one
        created = await api.post(f"{gw.api_url}/incidents", json={"lat": at(2900)["lat"], "lon": at(2900)["lon"],
                                                                   "note": "test"})
        assert created.status_code == 201
        await eventually(lambda: officers["disp-far"].alerts, what="the operator incident's alert")
        device_post = await stack.enter_async_context(client(pki, "disp-a"))
        refused = await device_post.post(f"{gw.api_url}/incidents", json={"lat": 51.5, "lon": -0.12})
        assert refused.status_code == 403
        await gw.situation.flush()

    report = verify_db(settings.db_path, audit_keys(pki))
    assert report.ok, report
    with contextlib.closing(open_for_reading(settings.db_path)) as conn:
        actions = [row[0] for row in conn.execute("SELECT action FROM audit ORDER BY seq")]
    for action in ("policy.loaded", "incident.opened", "decision.made", "alert.sent", "alert.delivered",
                   "alert.accepted", "incident.created"):
        assert action in actions
