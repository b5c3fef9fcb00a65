"""Open incidents and their alerts survive a gateway restart: the real gateway, a real
Mosquitto with mutual TLS, officers' devices that stay connected while the gateway is
down. After a clean stop (in process) and after SIGKILL (`bluelight gateway run`) the
new gateway, on the same data, shows the incidents and alerts on the API, continues the
escalation timers (a timeout that passed during the outage fires once, right after
start), matches an officer's answer to a pre-restart alert, and the audit chain goes
on and verifies."""

from __future__ import annotations

import asyncio
import contextlib
import signal
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
from edge_agent.wire.ids import Role
from tests.helpers import MosquittoProcess
from tests.integration.test_dispatch import PLACES, at, client, officer, on_the_picture
from tests.integration.test_dispatch import registry as registry  # noqa: PLC0414 - the fixture
from tests.integration.test_gateway import eventually, running, settings_for
from tests.integration.test_store_forward import GatewayProcess

pytestmark = pytest.mark.integration

PANIC_TIMEOUT_S = 3


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    """The default policy with a short panic timeout, so it passes while the gateway is down."""
    data = yaml.safe_load((Path(__file__).parents[2] / "gateway/policy/default.yaml").read_text())
    data["incidents"]["panic"]["timeout_s"] = PANIC_TIMEOUT_S
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def audit_actions(db: Path) -> list[tuple[str, str]]:
    with contextlib.closing(open_for_reading(db)) as conn:
        return [(row[0], row[1]) for row in conn.execute("SELECT action, subject FROM audit ORDER BY seq")]


async def test_incidents_and_alerts_survive_a_restart(
    pki: Pki, broker: MosquittoProcess, tmp_path: Path, issue: Callable[[Role, str], Identity], registry: Path,
    policy: Path,
) -> None:
    for unit in PLACES:
        issue(Role.DEVICE, unit)
    issue(Role.OPERATOR, "restart-operator")
    settings = settings_for(pki, broker, tmp_path / "gw.db", registry_path=registry, policy_path=policy,
                            batch_latency_ms=10, tick_ms=50)
    async with contextlib.AsyncExitStack() as stack:
        officers = {u: await stack.enter_async_context(officer(pki, pki.identity(u), broker)) for u in PLACES}
        api = await stack.enter_async_context(client(pki, "restart-operator"))

        # -- before: a panic (three alerts, one delivered) and an operator's incident --------------
        async with running(settings) as gw:
            await on_the_picture(gw, officers)
            created = await api.post(f"{gw.api_url}/incidents", json={**at(2950), "note": "restart test"})
            assert created.status_code == 201
            operator_incident = created.json()["incident_id"]
            await eventually(lambda: officers["disp-far"].alerts, what="the operator incident's alert")
            far_alert = officers["disp-far"].alerts[0].body["alert_id"]
            await officers["disp-a"].send("event", {"type": "panic", **at(0)})
            await eventually(lambda: sum(len(officers[u].alerts) for u in ("disp-b", "disp-c", "disp-sgt")) >= 3,
                             what="the panic's three alerts")
            panic_alerts = {u: officers[u].alerts[0].body["alert_id"] for u in ("disp-b", "disp-c", "disp-sgt")}
            panic_incident = officers["disp-b"].alerts[0].body["incident_id"]
            await officers["disp-b"].send("ack", {"alert_id": panic_alerts["disp-b"], "answer": "received"})
            await eventually(lambda: gw.situation.situation.alerts.alert(panic_alerts["disp-b"]).state == "delivered",
                             what="disp-b's receipt")
            before = {a["alert_id"]: a for a in (await api.get(f"{gw.api_url}/alerts")).json()}
            deadline_ms = max(before[a]["expires_ts"] for a in panic_alerts.values())
        # the gateway is stopped (SIGINT/SIGTERM take this path); the panic's timeout passes meanwhile
        await asyncio.sleep(max(0.0, deadline_ms / 1000 - time.time()) + 0.5)

        # -- after: the same incidents and alerts; the timeouts fire once; answers are matched ----
        async with running(settings) as gw2:
            assert gw2.situation is not None
            assert gw2.situation.counts["state_restored_incidents"] == 2
            assert gw2.situation.counts["state_restore_failed"] == 0
            incidents = {i["incident_id"]: i for i in (await api.get(f"{gw2.api_url}/incidents")).json()}
            assert set(incidents) == {operator_incident, panic_incident}
            assert incidents[panic_incident]["recommendation"] is not None  # the latest decision (escalation)
            alerts = {a["alert_id"]: a for a in (await api.get(f"{gw2.api_url}/alerts")).json()}
            assert set(before) <= set(alerts)
            assert alerts[far_alert]["history"] == before[far_alert]["history"]  # still waiting, as it was
            geo = (await api.get(f"{gw2.api_url}/picture")).json()
            assert {f["properties"]["id"] for f in geo["features"] if f["properties"]["layer"] == "incident"} == \
                set(incidents)

            book = gw2.situation.situation.alerts
            await eventually(lambda: all(book.alert(a).state in ("escalated", "timed_out")
                                         for a in panic_alerts.values()),
                             what="the panic's alerts timed out (escalated, or flagged when nobody is left)")
            await eventually(lambda: book.alert(panic_alerts["disp-b"]).state == "escalated",
                             what="disp-b's alert escalated (to the next best, disp-far)")
            await eventually(lambda: panic_alerts["disp-c"] in officers["disp-c"].dev.withdrawn,
                             what="the timed-out alert withdrawn from disp-c")
            # the officer's answer to the operator incident's pre-restart alert is matched
            await officers["disp-far"].send("ack", {"alert_id": far_alert, "answer": "accepted"})
            situation = gw2.situation.situation
            await eventually(lambda: situation.picture.units["disp-far"].state == "committed",
                             what="disp-far committed")
            alerts = {a["alert_id"]: a for a in (await api.get(f"{gw2.api_url}/alerts")).json()}
            assert [h["state"] for h in alerts[far_alert]["history"]] == ["created", "sent", "accepted"]
            for unit, alert_id in panic_alerts.items():
                states = [h["state"] for h in alerts[alert_id]["history"]]
                assert states.count("timed_out") == 1, (unit, states)
                timed_out = next(h for h in alerts[alert_id]["history"] if h["state"] == "timed_out")
                assert timed_out["ts"] >= alerts[alert_id]["expires_ts"]
            await asyncio.sleep(0.5)  # more ticks: nothing fires twice
            again = {a["alert_id"]: a for a in (await api.get(f"{gw2.api_url}/alerts")).json()}
            for alert_id in panic_alerts.values():
                assert again[alert_id]["history"] == alerts[alert_id]["history"]
            units = {f["properties"]["id"]: f["properties"] for f in
                     (await api.get(f"{gw2.api_url}/picture")).json()["features"] if f["properties"]["layer"] == "unit"}
            assert units["disp-far"]["state"] == "committed"
            assert units["disp-c"]["state"] == "available"  # kept, though no status was sent since
            await gw2.situation.flush()

    report = verify_db(settings.db_path, audit_keys(pki))
    assert report.ok, report
    actions = audit_actions(settings.db_path)
    assert [a for a, _ in actions].count("policy.loaded") == 2  # one chain across both runs
    for alert_id in panic_alerts.values():
        assert actions.count(("alert.timed_out", alert_id)) == 1
    assert ("alert.accepted", far_alert) in actions


class RegisteredGateway(GatewayProcess):
    """`bluelight gateway run --registry ...`; `url` is its API."""

    def __init__(self, pki: Pki, broker: MosquittoProcess, db: Path, log: Path, registry: Path) -> None:
        super().__init__(pki, broker.port, db, log)
        self.args += ["--registry", str(registry)]
        self.url = f"https://127.0.0.1:{self.args[self.args.index('--http-port') + 1]}/api/v1"


async def _api_up(api: httpx.AsyncClient, url: str, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while True:
        with contextlib.suppress(httpx.TransportError):
            if (await api.get(f"{url}/incidents")).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"the gateway API at {url} did not come up")
        await asyncio.sleep(0.2)


async def test_an_incident_survives_kill_9(
    pki: Pki, broker: MosquittoProcess, tmp_path: Path, issue: Callable[[Role, str], Identity], registry: Path,
) -> None:
    for unit in PLACES:
        issue(Role.DEVICE, unit)
    issue(Role.OPERATOR, "kill-operator")
    db = tmp_path / "gw.db"
    async with contextlib.AsyncExitStack() as stack:
        officers = {u: await stack.enter_async_context(officer(pki, pki.identity(u), broker)) for u in PLACES}
        api = await stack.enter_async_context(client(pki, "kill-operator"))
        first = RegisteredGateway(pki, broker, db, tmp_path / "gw1.log", registry)
        first.start()
        stack.callback(first.stop)
        url = first.url
        await _api_up(api, url)

        async def units_on_picture() -> bool:
            geo = (await api.get(f"{url}/picture")).json()
            return {f["properties"]["id"] for f in geo["features"] if f["geometry"]} >= set(PLACES)

        for _ in range(100):
            for unit, off in officers.items():
                if off.seq == 0:
                    await off.send("status", {"state": "available"})
                await off.send("telemetry", at(PLACES[unit]))
            if await units_on_picture():
                break
            await asyncio.sleep(0.2)
        created = await api.post(f"{url}/incidents", json={**at(2950), "note": "kill test"})
        assert created.status_code == 201
        incident_id = created.json()["incident_id"]
        await eventually(lambda: officers["disp-far"].alerts, what="the alert")
        alert_id = officers["disp-far"].alerts[0].body["alert_id"]
        await asyncio.sleep(0.5)  # a flush (every 0.1 s) has saved it
        first.signal(signal.SIGKILL)

        second = RegisteredGateway(pki, broker, db, tmp_path / "gw2.log", registry)
        second.start()
        stack.callback(second.stop)
        url = second.url
        await _api_up(api, url)
        [incident] = [i for i in (await api.get(f"{url}/incidents")).json() if i["incident_id"] == incident_id]
        assert [a["alert_id"] for a in incident["alerts"]] == [alert_id]
        await officers["disp-far"].send("ack", {"alert_id": alert_id, "answer": "accepted"})

        async def accepted() -> Any:
            [alert] = [a for a in (await api.get(f"{url}/alerts")).json() if a["alert_id"] == alert_id]
            return alert["state"] == "accepted"

        for _ in range(100):
            if await accepted():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the answer after the restart was not applied")
        second.signal(signal.SIGTERM)
        assert second.proc is not None
        await asyncio.to_thread(second.proc.wait, 15)
    log = (tmp_path / "gw2.log").read_text(errors="replace")
    assert "situation restored" in log, log[-2000:]
    report = verify_db(db, audit_keys(pki))
    assert report.ok, report
