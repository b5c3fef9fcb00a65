"""The gateway service: the ingest and the HTTPS API in one event loop, under one
`asyncio.TaskGroup`.

In-process use (tests, embedding)::

    gw = Gateway(settings)
    task = asyncio.create_task(gw.run())
    await gw.ready.wait()        # API listening, store open, ingest started
    ... gw.api_url, gw.ingest.connected ...
    gw.stop(); await task        # or task.cancel()

`serve(settings)` is what `bluelight gateway run` calls: it also turns SIGINT/SIGTERM
into a clean stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable

from certs.auditlog import AuditLog
from certs.signing import load_signer
from certs.tls import client_context, server_context
from edge_agent.errors import BluelightError
from gateway.api import create_app
from gateway.https import QuietServer, bind, server_config
from gateway.ingest import Ingest
from gateway.settings import GatewaySettings
from gateway.situation import SituationService
from gateway.store import Store

log = logging.getLogger(__name__)

RETENTION_EVERY_S = 3600.0


class GatewayError(BluelightError):
    """The gateway cannot start."""


class Gateway:
    """One gateway: ingest + store + HTTPS API. `run()` until `stop()` or cancellation."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.ready = asyncio.Event()
        self.ingest: Ingest | None = None
        self.situation: SituationService | None = None
        self.api_url = ""
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Ask for a clean stop: the API finishes open requests, the ingest disconnects."""
        self._stop.set()

    async def run(self, *, on_ready: Callable[[Gateway], None] | None = None) -> None:
        s = self.settings.require_pki()
        pki = s.pki
        identity = pki.require_identity(s.gateway_id)
        signer = load_signer(s.pki, s.gateway_id)
        mqtt_tls = client_context(pki, identity)
        http_tls = server_context(pki, identity)
        sock = bind(s.http_host, s.http_port)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        self.api_url = f"https://{shown}:{port}/api/v1"
        try:
            store = await asyncio.to_thread(Store.open, s.db_path)
        except BaseException:
            sock.close()
            raise
        audit: AuditLog | None = None
        try:
            audit = await asyncio.to_thread(AuditLog.open, s.db_path, signer)
            ingest = self.ingest = Ingest(s, store, tls_context=mqtt_tls, signer=signer)
            situation = self.situation = SituationService.from_settings(s, ingest, audit)
            await situation.restore(s.state_path, s.db_path)
            ingest.on_stored = situation.on_stored
            app = create_app(s.db_path, gateway_id=s.gateway_id, live=ingest.live, situation=situation)
            server = QuietServer(server_config(app, http_tls))
            async with asyncio.TaskGroup() as tg:
                ingest_task = tg.create_task(ingest.run(), name="gateway-ingest")
                situation_task = tg.create_task(situation.run(), name="gateway-situation")
                retention_task = tg.create_task(self._retention(audit), name="gateway-retention")
                api_task = tg.create_task(server.serve(sockets=[sock]), name="gateway-api")
                while not server.started and not api_task.done():  # noqa: ASYNC110 - uvicorn has no started event
                    await asyncio.sleep(0.01)
                log.info("gateway %s: API at %s, broker %s, store %s", s.gateway_id, self.api_url, s.broker, s.db_path)
                self.ready.set()
                if on_ready is not None:
                    on_ready(self)
                stop = tg.create_task(self._stop.wait(), name="gateway-stop")
                await asyncio.wait({stop, api_task, ingest_task, situation_task}, return_when=asyncio.FIRST_COMPLETED)
                server.should_exit = True
                with contextlib.suppress(asyncio.CancelledError):
                    await api_task
                ingest_task.cancel()
                for task in (situation_task, retention_task, stop):
                    task.cancel()
                await situation.flush()
        finally:
            if self.situation is not None:
                await self.situation.close()
            sock.close()
            store.close()
            if audit is not None:
                audit.close()
            log.info("gateway %s stopped", s.gateway_id)


    async def _retention(self, audit: AuditLog) -> None:
        """Data minimisation: delete telemetry and events past their retention, hourly,
        on a connection of its own (short chunks; the ingest's writer waits at most one)."""
        s = self.settings
        while True:
            def prune() -> int:
                with Store.open(s.db_path) as store:
                    return store.prune(time.time_ns() // 1_000_000, s.retention, audit=audit)

            deleted = await asyncio.to_thread(prune)
            if deleted:
                log.info("retention: deleted %d messages past %d/%d days", deleted, s.retention_days,
                         s.event_retention_days)
            await asyncio.sleep(RETENTION_EVERY_S)


async def serve(settings: GatewaySettings, *, on_ready: Callable[[Gateway], None] | None = None) -> None:
    """Run a gateway until SIGINT or SIGTERM, then stop it cleanly."""
    gateway = Gateway(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, gateway.stop)
    try:
        await gateway.run(on_ready=on_ready)
    except ExceptionGroup as group:
        # A service task failed for a reason an operator can act on: say it in one line.
        match, _rest = group.split(BluelightError)
        if match is None:
            raise
        raise _first(match) from None
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _first(group: BaseExceptionGroup[BluelightError]) -> BluelightError:
    exc = group.exceptions[0]
    return _first(exc) if isinstance(exc, BaseExceptionGroup) else exc
