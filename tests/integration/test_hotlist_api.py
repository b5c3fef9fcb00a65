"""The ANPR hotlist over the API, against a real gateway and Mosquitto with mutual TLS:
operators list, add and remove entries; a read of an added plate from a registered
camera opens an `anpr_hit` incident at once; changes are saved to the hotlist file
(so they survive a restart) without the file watcher taking the gateway's own write
for a foreign one, and a foreign edit is never lost; every change is audited; devices
are refused."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from certs.auditlog import open_for_reading, verify_db
from certs.pki import Identity, Pki
from certs.registry import audit_keys
from certs.tls import client_context
from edge_agent.wire.ids import Role
from gateway.service import Gateway
from gateway.situation import load_hotlist
from tests.helpers import MosquittoProcess
from tests.integration.test_gateway import device, eventually, running, settings_for

pytestmark = pytest.mark.integration

CAMERA = {"lat": 51.5, "lon": -0.12}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def client(pki: Pki, identity: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(verify=client_context(pki, pki.identity(identity)), timeout=5)


def files(tmp_path: Path, camera: str) -> tuple[Path, Path]:
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump({"sensors": [{"id": camera, "kind": "anpr", **CAMERA}]}))
    hotlist = tmp_path / "hotlist.yaml"
    hotlist.write_text(yaml.safe_dump({"hotlist": [
        {"plate": "RF19XKD", "reason": "stolen", "expires_ts": now_ms() + 3_600_000, "markers": ["stolen"]},
    ]}))
    return registry, hotlist


def temp_files(directory: Path) -> list[Path]:
    return list(directory.glob(".hotlist.yaml.*"))


def plates(entries: list[dict[str, Any]]) -> list[str]:
    return [e["plate"] for e in entries]


async def test_operators_change_the_hotlist_and_a_read_hits_at_once(
    pki: Pki, broker: MosquittoProcess, tmp_path: Path, issue: Callable[[Role, str], Identity]
) -> None:
    camera, operator = issue(Role.DEVICE, "hl-cam-1"), issue(Role.OPERATOR, "hl-operator-1")
    registry, hotlist = files(tmp_path, camera.id)
    settings = settings_for(pki, broker, tmp_path / "gw.db", registry_path=registry, hotlist_path=hotlist,
                            batch_latency_ms=10, tick_ms=50)
    expires = now_ms() + 3_600_000
    async with contextlib.AsyncExitStack() as stack:
        gw: Gateway = await stack.enter_async_context(running(settings))
        assert gw.situation is not None
        api = await stack.enter_async_context(client(pki, operator.id))
        url = f"{gw.api_url}/hotlist"

        listed = await api.get(url)
        assert listed.status_code == 200
        assert listed.json() == [{"plate": "RF19XKD", "reason": "stolen", "expires_ts": listed.json()[0]["expires_ts"],
                                  "priority": 3, "markers": ["stolen"], "expired": False}]

        added = await api.post(url, json={"plate": "ab12 cde", "reason": "wanted: robbery", "expires_ts": expires,
                                          "priority": 1, "markers": ["Armed", "violent"]})
        assert added.status_code == 201, added.text
        new = {"plate": "AB12CDE", "reason": "wanted: robbery", "expires_ts": expires, "priority": 1,
               "markers": ["armed", "violent"], "expired": False}
        assert added.json() == new
        assert (await api.get(url)).json()[0] == new
        assert plates((await api.get(url)).json()) == ["AB12CDE", "RF19XKD"]
        # saved, atomically, and the watcher knows the write was its own
        assert load_hotlist(hotlist).get("AB12CDE") is not None
        assert not temp_files(tmp_path)
        gw.situation.reload_changed()
        assert gw.situation.counts["hotlist_added"] == 1
        assert not [r for r in gw.situation._audit_pending if r.action == "hotlist.loaded"]

        for bad in ({"plate": "AB12CDE", "reason": "late", "expires_ts": now_ms() - 1000},
                    {"plate": " - ", "reason": "no plate", "expires_ts": expires},
                    {"plate": "AB12CDE", "reason": "", "expires_ts": expires},
                    {"plate": "AB12CDE", "reason": "x", "expires_ts": expires, "priority": 0}):
            assert (await api.post(url, json=bad)).status_code == 422, bad

        # a registered camera reads the new plate: an anpr_hit incident, from the live hotlist
        cam = await stack.enter_async_context(device(pki, camera, broker))
        await cam.send(1, "event", {"type": "anpr_read", **CAMERA,
                                    "detail": {"plate": "AB12 CDE", "confidence": 0.97, "direction": "approaching"}})

        async def hits() -> list[dict[str, Any]]:
            return [i for i in (await api.get(f"{gw.api_url}/incidents")).json() if i["type"] == "anpr_hit"]

        picture = gw.situation.situation.picture
        await eventually(lambda: any(i.type == "anpr_hit" for i in picture.incidents.values()), what="an anpr_hit")
        [hit] = await hits()
        assert (hit["detail"]["plate"], hit["detail"]["reason"], hit["detail"]["markers"]) == (
            "AB12CDE", "wanted: robbery", ["armed", "violent"])

        # a device may not read or change the hotlist
        dev_api = await stack.enter_async_context(client(pki, camera.id))
        for request in (dev_api.get(url), dev_api.post(url, json={"plate": "ZZ99ZZZ", "reason": "x",
                                                                    "expires_ts": expires}),
                        dev_api.delete(f"{url}/AB12CDE")):
            refused = await request
            assert refused.status_code == 403
            assert refused.json()["error"] == "forbidden"
        assert plates((await api.get(url)).json()) == ["AB12CDE", "RF19XKD"]

        removed = await api.delete(f"{url}/ab12cde")
        assert removed.status_code == 200
        assert removed.json() == new
        again = await api.delete(f"{url}/AB12CDE")
        assert again.status_code == 404
        assert again.json()["error"] == "not_found"
        assert plates((await api.get(url)).json()) == ["RF19XKD"]
        assert load_hotlist(hotlist).get("AB12CDE") is None
        await gw.situation.flush()

    report = verify_db(settings.db_path, audit_keys(pki))
    assert report.ok, report
    with contextlib.closing(open_for_reading(settings.db_path)) as conn:
        changes = conn.execute("SELECT actor, subject, data FROM audit WHERE action = 'hotlist.changed' "
                               "ORDER BY seq").fetchall()
        loaded = conn.execute("SELECT COUNT(*) FROM audit WHERE action = 'hotlist.loaded'").fetchone()[0]
    assert [(actor, subject) for actor, subject, _ in changes] == [(operator.id, "AB12CDE")] * 2
    assert ['"op":"added"' in changes[0][2], '"op":"removed"' in changes[1][2]] == [True, True]
    assert loaded == 0


async def test_changes_survive_a_restart_and_never_lose_a_foreign_edit(
    pki: Pki, broker: MosquittoProcess, tmp_path: Path, issue: Callable[[Role, str], Identity]
) -> None:
    camera, operator = issue(Role.DEVICE, "hl-cam-2"), issue(Role.OPERATOR, "hl-operator-2")
    registry, hotlist = files(tmp_path, camera.id)
    settings = settings_for(pki, broker, tmp_path / "gw.db", registry_path=registry, hotlist_path=hotlist,
                            tick_ms=50)
    expires = now_ms() + 3_600_000
    async with running(settings) as gw, client(pki, operator.id) as api:
        url = f"{gw.api_url}/hotlist"
        assert (await api.post(url, json={"plate": "AA11AAA", "reason": "api", "expires_ts": expires})).status_code \
            == 201
        # someone edits the file by hand before the watcher has looked at it
        data = yaml.safe_load(hotlist.read_text())
        data["hotlist"].append({"plate": "BB22BBB", "reason": "by hand", "expires_ts": expires})
        await asyncio.sleep(0.01)  # a later mtime than the gateway's own write
        hotlist.write_text(yaml.safe_dump(data))
        replaced = await api.post(url, json={"plate": "AA11AAA", "reason": "api, updated", "expires_ts": expires,
                                             "priority": 2})
        assert replaced.status_code == 201
        assert plates((await api.get(url)).json()) == ["AA11AAA", "BB22BBB", "RF19XKD"]

    async with running(settings) as gw, client(pki, operator.id) as api:
        entries = (await api.get(f"{gw.api_url}/hotlist")).json()
    assert plates(entries) == ["AA11AAA", "BB22BBB", "RF19XKD"]
    assert (entries[0]["reason"], entries[0]["priority"]) == ("api, updated", 2)
