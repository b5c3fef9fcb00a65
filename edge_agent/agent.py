"""The edge agent: drivers -> sign + commit (outbox) -> link, in one `asyncio.TaskGroup`.

    with Agent(settings) as agent:
        await agent.run(install_signals=True)   # until SIGINT/SIGTERM or agent.stop()

The clock is injected (`Clock`: UTC ms + sleep), so a simulator can run agents faster
than real time; TLS context, key lookup, signer and drivers can be injected too.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections import OrderedDict
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Self

from certs.pki import Pki
from certs.registry import KeyRegistry
from certs.signing import load_signer
from certs.tls import client_context
from edge_agent.drivers import Clock, Driver, Reading, SystemClock
from edge_agent.drivers.gps import SimulatedGps
from edge_agent.drivers.panic import SimulatedPanicButton
from edge_agent.link import Link
from edge_agent.outbox import Outbox
from edge_agent.settings import AgentSettings
from edge_agent.wire.envelope import Message, Signer
from edge_agent.wire.errors import Rejected

log = logging.getLogger(__name__)


#: Alerts an agent remembers (to answer, and to spot redeliveries).
MAX_ALERTS = 64


class Agent:
    """One device: its drivers, its outbox and its link."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        clock: Clock | None = None,
        drivers: Sequence[Driver] | None = None,
        signer: Signer | None = None,
        tls_context: ssl.SSLContext | None = None,
        keys: KeyRegistry | None = None,
    ) -> None:
        pki = Pki(settings.pki_dir)
        self.settings = settings
        self.id = settings.id
        self.clock: Clock = clock or SystemClock()
        self.signer = signer or load_signer(pki, settings.id)
        self.gps = SimulatedGps(
            settings.route,
            speed_mps=settings.speed_mps,
            rate_hz=settings.rate_hz,
            sigma_m=settings.noise_m,
            correlation_s=settings.noise_correlation_s,
            seed=settings.seed,
        )
        self.panic = SimulatedPanicButton(at_s=settings.panic_at_s, position=lambda: self.gps.last_fix)
        self.drivers: list[Driver] = list(drivers) if drivers is not None else [self.gps, self.panic]
        self.rejected_readings = 0
        tls_context = tls_context or client_context(pki, pki.require_identity(settings.id))
        keys = keys or KeyRegistry(pki)
        self.outbox = Outbox(
            settings.outbox_path,
            self.signer,
            max_rows=settings.max_rows,
            max_age_s=settings.max_age_s,
            resend_after_s=settings.resend_after_s,
            sync=settings.sync,
            bookkeeping_delay_s=settings.bookkeeping_delay_s,
        )
        self.link = Link(
            settings,
            self.outbox,
            tls_context,
            keys,
            clock=self.clock,
        )
        #: Alerts received, by alert_id (the latest MAX_ALERTS), for the app or a
        #: simulated officer to answer with `answer()`.
        self.alerts: OrderedDict[str, Message] = OrderedDict()
        #: Called once per new alert, after the delivery receipt (`received`) is queued.
        self.on_alert: Callable[[Message], None] | None = None
        self.link.on_alert = self._alert_arrived
        self._stop = asyncio.Event()

    def close(self) -> None:
        self.outbox.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def stop(self) -> None:
        """Graceful stop: drivers stop, the link says offline and disconnects, `run` returns."""
        self._stop.set()

    def emit(self, reading: Reading) -> int | None:
        """Sign and commit one reading; return its seq, or None if it cannot be sent."""
        try:
            return self.outbox.append(reading.kind, reading.body, self.clock.now_ms())
        except (Rejected, ValueError) as exc:
            self.rejected_readings += 1
            log.warning("%s: dropped an invalid %s reading: %s", self.id, reading.kind, exc)
            return None

    def answer(self, alert_id: str, answer: str, reason: str | None = None) -> int | None:
        """Queue the officer's answer to an alert (`received`, `accepted`, `declined`,
        `arrived`) as a signed `ack`; return its seq."""
        body: dict[str, Any] = {"alert_id": alert_id, "answer": answer}
        if reason:
            body["reason"] = reason
        return self.emit(Reading("ack", body))

    def _alert_arrived(self, message: Message) -> None:
        alert_id = str(message.body["alert_id"])
        if alert_id in self.alerts:  # a redelivery: answered already
            self.alerts[alert_id] = message
            return
        self.alerts[alert_id] = message
        while len(self.alerts) > MAX_ALERTS:
            self.alerts.popitem(last=False)
        log.info("%s: alert %s: %s", self.id, alert_id, message.body.get("action"))
        self.answer(alert_id, "received")
        if self.on_alert is not None:
            self.on_alert(message)

    async def run(self, *, install_signals: bool = False) -> None:
        """Run until `stop()` (or SIGINT/SIGTERM with `install_signals`; SIGUSR1 presses panic)."""
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.stop)
                installed.append(sig)
            loop.add_signal_handler(signal.SIGUSR1, self.panic.press)
            installed.append(signal.SIGUSR1)
        log.info("%s starting: outbox %s, next seq %d", self.id, self.settings.outbox_path, self.outbox.next_seq)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.link.run(), name=f"{self.id}-link")
                workers = [
                    tg.create_task(self._pump(driver), name=f"{self.id}-driver-{type(driver).__name__}")
                    for driver in self.drivers
                ]
                workers.append(tg.create_task(self._progress(), name=f"{self.id}-progress"))
                await self._stop.wait()
                for worker in workers:
                    worker.cancel()
                self.link.request_stop()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            log.info("%s stopped: %s", self.id, self.progress_line())

    async def _pump(self, driver: Driver) -> None:
        async for reading in driver.readings(self.clock):
            self.emit(reading)

    async def _progress(self) -> None:
        every = self.settings.progress_every_s
        if every <= 0:
            return
        while True:
            await self.clock.sleep(every)
            log.info("%s: %s", self.id, self.progress_line())

    def progress_line(self) -> str:
        o, s = self.outbox.stats(), self.link.stats
        pending = " ".join(f"{lane}={n}" for lane, n in o.pending.items())
        return (
            f"sent {o.sent}, acked {s.published}, confirmed {o.confirmed}, pending {pending}, "
            f"dropped {o.dropped}, refused {s.publish_failures.total()}, "
            f"rejected downlinks {s.downlink_rejected.total()}, connects {s.connects}"
        )
