"""The shell around `gateway.core.situation`: stored messages in (from the ingest),
signed alerts out (through the ingest's broker connection), picture changes to
WebSocket clients, every decision and answer to the audit log.

    service = SituationService.from_settings(settings, ingest, audit)
    ingest = Ingest(..., on_stored=service.on_stored)
    await service.run()             # ticks, publishes alerts, writes the audit log

Queues and what happens when they are full:
- alerts to publish: unbounded in count but bounded by incidents (a few per incident);
  an alert that cannot be published (no broker connection) stays first in line and is
  retried every `RETRY_S`; an alert past its `expires_ts` is still sent once (the
  officer app shows it as expired), escalation has already moved on.
- audit records: appended every `AUDIT_FLUSH_S` in one transaction on the shell's DB
  thread; they are never dropped (a failing write is retried and logged).
- durable state (`gateway.persist`): with the audit records, the incident, alert and
  unit records the core changed since the last flush are written in one transaction
  to the state file on the same thread; a failed write is kept and retried (newer
  records win). At most `AUDIT_FLUSH_S` plus one write of changes is lost on a crash.
- WebSocket clients: each has a map of pending changes keyed by feature, so a slow
  client gets the latest state of each feature, never an ever-growing backlog.

Hotlist changes from the API (`put_hotlist_entry`, `remove_hotlist_entry`) are
written to `hotlist_path` first (temp file + rename, on a thread, one change at a
time), then applied to the live picture and audited (`hotlist.changed`); the file
watcher records the gateway's own write, so it never reloads it as a foreign change.
A foreign edit not yet picked up is loaded before a change is applied, so neither
loses the other.

Restart (`restore`, before `run`): the saved incidents, alerts (their lifecycle and
absolute timeouts), recommendations, units' states and geofence state are put back;
alerts sent but never acknowledged are published again (a device takes an alert id
once); then the store's latest status and telemetry per device are read back, so units
have their state and position at once, and events and acks stored after the saved
watermark (taken in after the last save, before a crash) are replayed through the
core. A timeout that passed during the outage fires on the first tick, once. A state
file that cannot be read or restored is logged (one error), counted
(`state_restore_failed`), set aside as `<name>.bad-<time>`, and the gateway starts
empty.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import os
import sqlite3
import stat
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson
import yaml

from certs.auditchain import AuditRecord
from certs.auditlog import AuditLog
from edge_agent.errors import BluelightError
from gateway.core.alerts import AlertOut
from gateway.core.anpr import Hotlist, HotlistEntry, HotlistError, normalise_plate
from gateway.core.ingest import Accepted
from gateway.core.picture import Delta, Picture, PictureConfig, Registry, RegistryError
from gateway.core.policy import Policy, PolicyError, default_policy, load_policy
from gateway.core.situation import Output, Situation
from gateway.core.snapshot import SnapshotError, StateChanges
from gateway.core.streets import EtaModel, StraightLineEta, StreetEta, StreetGraph, StreetsError
from gateway.ingest import wall_ms
from gateway.persist import StateFile, StateUnreadable, set_aside
from gateway.settings import GatewaySettings
from gateway.store import Store

log = logging.getLogger(__name__)

RETRY_S = 0.5
AUDIT_FLUSH_S = 0.1
RELOAD_S = 2.0


class SituationError(BluelightError):
    """The situational picture cannot start (a policy, registry, map or hotlist file is bad)."""


class HotlistRefused(SituationError):
    """A hotlist change that cannot be made as asked (e.g. an expiry already past)."""


class HotlistNotSaved(SituationError):
    """The hotlist file could not be written; the live hotlist is unchanged."""


class Downlink(Protocol):
    async def publish_down(self, device: str, kind: str, body: Any) -> bool: ...


@dataclass(eq=False)
class Subscriber:
    """One WebSocket client: the latest pending change per feature, and a wake-up."""

    pending: dict[tuple[str, str], Delta] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def take(self) -> list[Delta]:
        out = list(self.pending.values())
        self.pending.clear()
        self.ready.clear()
        return out


class DeltaHub:
    """Fans picture changes out to subscribers, coalescing per feature."""

    def __init__(self) -> None:
        self._subscribers: set[Subscriber] = set()

    def subscribe(self) -> Subscriber:
        sub = Subscriber()
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)

    @property
    def count(self) -> int:
        return len(self._subscribers)

    def publish(self, deltas: Sequence[Delta]) -> None:
        if not deltas:
            return
        for sub in self._subscribers:
            for delta in deltas:
                sub.pending[(delta.layer, delta.id)] = delta
            sub.ready.set()


def _read_yaml(path: Path, what: str) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SituationError(f"cannot read the {what} {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SituationError(f"the {what} {path} is not valid YAML: {exc}") from None


def load_registry(path: Path | None) -> Registry:
    if path is None:
        return Registry()
    try:
        return Registry.from_data(_read_yaml(path, "registry"), str(path))
    except RegistryError as exc:
        raise SituationError(str(exc)) from None


def load_hotlist(path: Path | None) -> Hotlist:
    if path is None:
        return Hotlist([])
    data = _read_yaml(path, "hotlist")
    records = data.get("hotlist") if isinstance(data, dict) else data
    try:
        return Hotlist.from_records(records or [])
    except (HotlistError, TypeError, ValueError) as exc:
        raise SituationError(f"{path}: {exc}") from None


HOTLIST_HEADER = (
    "# ANPR hotlist. The Bluelight gateway rewrites this file when operators change the\n"
    "# hotlist through its API (comments are not kept); edits here are picked up live.\n"
)


def save_hotlist(path: Path, entries: Sequence[HotlistEntry]) -> None:
    """Write `entries` to the hotlist file atomically: a temp file in the same
    directory, flushed to disk, renamed over `path` (keeping its permissions)."""
    text = HOTLIST_HEADER + yaml.safe_dump({"hotlist": [e.as_record() for e in entries]}, sort_keys=False)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    created = False
    try:
        mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        created = True
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if created:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        raise HotlistNotSaved(f"cannot write the hotlist {path}: {exc.strerror}; nothing was changed") from None


#: What the watcher compares: modification time, size and inode. Not the mtime alone:
#: file times tick in jiffies, so two writes a millisecond apart can share one.
Stamp = tuple[int, int, int]


def _stamp(path: Path | None) -> Stamp | None:
    try:
        st = path.stat() if path is not None else None
    except OSError:
        return None
    return None if st is None else (st.st_mtime_ns, st.st_size, st.st_ino)


def load_inputs(settings: GatewaySettings) -> tuple[Policy, Registry, EtaModel, Hotlist]:
    """Policy, registry, street map and hotlist from the settings' files, validated;
    one `SituationError` naming the file and the mistake otherwise."""
    try:
        policy = load_policy(settings.policy_path) if settings.policy_path else default_policy()
    except PolicyError as exc:
        raise SituationError(str(exc)) from None
    except OSError as exc:
        raise SituationError(f"cannot read the policy {settings.policy_path}: {exc.strerror}") from None
    registry = load_registry(settings.registry_path)
    eta: EtaModel = StraightLineEta(policy.speeds, detour=policy.straight_line_detour)
    if settings.map_path is not None:
        try:
            graph = StreetGraph.from_geojson(orjson.loads(settings.map_path.read_bytes()))
        except OSError as exc:
            raise SituationError(f"cannot read the map {settings.map_path}: {exc.strerror}") from None
        except (orjson.JSONDecodeError, StreetsError, ValueError) as exc:
            raise SituationError(f"the map {settings.map_path} is not a street GeoJSON: {exc}") from None
        eta = StreetEta(graph, policy.speeds)
    return policy, registry, eta, load_hotlist(settings.hotlist_path)


class SituationService:
    """Owns the `Situation`; runs on the gateway's event loop."""

    def __init__(
        self,
        situation: Situation,
        downlink: Downlink,
        audit: AuditLog,
        *,
        tick_s: float,
        clock_ms: Callable[[], int] = wall_ms,
        hotlist_path: Path | None = None,
    ) -> None:
        """`hotlist_path`: where API changes to the hotlist are saved (None: in memory only)."""
        self.situation = situation
        self.hub = DeltaHub()
        self.counts: Counter[str] = Counter()
        self._downlink = downlink
        self._audit = audit
        self.tick_s = tick_s
        self._clock_ms = clock_ms
        self._sends: deque[tuple[str, str, dict[str, Any]]] = deque()
        self._send_ready = asyncio.Event()
        self._audit_pending: list[AuditRecord] = []
        self._watched: dict[str, tuple[Path, Stamp | None]] = {}
        self.hotlist_path = hotlist_path
        self._hotlist_lock = asyncio.Lock()
        #: Why the hotlist file on disk was not loaded (an edit that does not validate).
        self._hotlist_file_bad: str | None = None
        #: The durable state's file (None: state lives in memory only) and what is
        #: still to be written to it.
        self._state: StateFile | None = None
        self._state_pending = StateChanges()
        #: The one thread that writes the audit log and the state file, in order.
        self._db = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="situation-db")

    def watch(self, registry_path: Path | None, hotlist_path: Path | None) -> None:
        """Re-read these files when they change (checked every `RELOAD_S`)."""
        for name, path in (("registry", registry_path), ("hotlist", hotlist_path)):
            if path is not None:
                self._watched[name] = (path, _stamp(path))

    def reload_changed(self) -> None:
        """Apply a changed registry or hotlist; a bad file is logged and the old one kept.
        The hotlist is left alone while an API change is being saved (it reloads after)."""
        for name in list(self._watched):
            if name == "hotlist" and self._hotlist_lock.locked():
                continue
            self._reload(name)

    def _reload(self, name: str) -> None:
        path, seen = self._watched[name]
        stamp = _stamp(path)
        if stamp is None or stamp == seen:
            return
        now = self._clock_ms()
        self._watched[name] = (path, stamp)
        picture = self.situation.picture
        try:
            if name == "registry":
                self.hub.publish(picture.set_registry(load_registry(path), now).deltas)
                size = len(picture.registry.units)
            else:
                picture.hotlist = load_hotlist(path)
                size = len(picture.hotlist)
        except SituationError as exc:
            self.counts[f"{name}_reload_failed"] += 1
            log.warning("%s not reloaded, keeping the previous one: %s", name, exc)
            if name == "hotlist":
                self._hotlist_file_bad = str(exc)
            return
        if name == "hotlist":
            self._hotlist_file_bad = None
        self._audit_pending.append(AuditRecord(f"{name}.loaded", "gateway", str(path), {"entries": size}, now))
        log.info("%s reloaded from %s: %d entries", name, path, size)

    @classmethod
    def from_settings(cls, settings: GatewaySettings, downlink: Downlink, audit: AuditLog) -> SituationService:
        policy, registry, eta, hotlist = load_inputs(settings)
        prefix = time.strftime("INC%y%m%d%H%M", time.gmtime())
        picture = Picture(registry, hotlist=hotlist, config=PictureConfig(), incident_prefix=prefix)
        service = cls(Situation(picture, policy, eta), downlink, audit, tick_s=settings.tick_ms / 1000,
                      hotlist_path=settings.hotlist_path)
        service.watch(settings.registry_path, settings.hotlist_path)
        path = settings.policy_path
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path is not None else "built-in"
        service._audit_pending.append(AuditRecord(
            "policy.loaded", settings.gateway_id, policy.source,
            {"rules": sorted(policy.rules), "sha256": digest, "units": len(registry.units),
             "sensors": len(registry.sites), "zones": len(registry.zones)}, wall_ms()))
        log.info("situation: policy %s (%d rules), %d registered units, %d sensor sites, %d zones, %s",
                 policy.source, len(policy.rules), len(registry.units), len(registry.sites), len(registry.zones),
                 type(eta).__name__)
        return service

    # -- restart -----------------------------------------------------------------------------

    async def restore(self, state_path: Path, store_path: Path | None = None) -> None:
        """Open the state file and put back what it holds, then read the store's latest
        statuses and fixes (and events and acks after the saved watermark) back in. Bad
        saved state is set aside: the gateway starts empty, it does not fail."""
        loop = asyncio.get_running_loop()
        data = None
        problem: Exception | None = None
        try:
            self._state = await loop.run_in_executor(self._db, StateFile.open, state_path)
            data = await loop.run_in_executor(self._db, self._state.load)
            if data is not None:
                summary = self.situation.restore_state(data)
                log.info("situation restored from %s: %d incidents (%d open), %d alerts (%d unanswered), "
                         "%d unit states", state_path, summary["incidents"], summary["open"], summary["alerts"],
                         summary["unanswered"], summary["units"])
                self.counts["state_restored_incidents"] += summary["incidents"]
        except (StateUnreadable, SnapshotError) as exc:
            data, problem = None, exc
        if problem is not None:
            await self._set_aside(state_path, problem)
        now = self._clock_ms()
        for alert in self.situation.alerts.unreceived(now):
            self._queue(alert)
            self.counts["alerts_resent_after_restart"] += 1
        if store_path is not None:
            await self._read_back(store_path, replay=data is not None)

    async def _set_aside(self, state_path: Path, problem: Exception) -> None:
        """Bad saved state: one error line, a count, the file kept aside, a fresh one."""
        loop = asyncio.get_running_loop()
        self.counts["state_restore_failed"] += 1
        if self._state is not None:
            await loop.run_in_executor(self._db, self._state.close)
            self._state = None
        try:
            aside = await loop.run_in_executor(self._db, set_aside, state_path)
            self._state = await loop.run_in_executor(self._db, StateFile.open, state_path)
        except (OSError, StateUnreadable) as exc:
            log.error("the saved situation %s could not be restored (%s) nor set aside (%s); starting with an "  # noqa: TRY400 - one line, no trace
                      "empty picture that is NOT saved", state_path, problem, exc)
            return
        log.error("the saved situation could not be restored (%s); starting with an empty picture, "
                  "the file is kept as %s", problem, aside)

    async def _read_back(self, store_path: Path, *, replay: bool) -> None:
        situation = self.situation
        now = self._clock_ms()
        since = now - round(situation.policy.max_position_age_s * 1000)
        after = situation.seen_recv_ms if replay and situation.seen_recv_ms else None

        def read() -> list[dict[str, Any]]:
            if not store_path.exists():
                return []
            with Store.open(store_path, readonly=True) as store:
                return store.restart_feed(fixes_since_ms=since, after_recv_ms=after)

        try:
            rows = await asyncio.get_running_loop().run_in_executor(self._db, read)
        except (BluelightError, sqlite3.Error) as exc:
            self.counts["state_readback_failed"] += 1
            log.warning("could not read the store back after the restart (units wait for new messages): %s", exc)
            return
        replayed = 0
        for row in rows:
            body = orjson.loads(row["body"])
            record = Accepted(row["device_id"], row["seq"], row["kind"], row["ts"], row["recv_ts"], body,
                              row["body"], b"", False)
            later = row["kind"] in ("event", "ack")
            out = situation.observe([record], now if later else row["recv_ts"])
            replayed += later
            out.refused.clear()  # an answer already taken before the crash
            self.take(out)
        self.counts["replayed_after_restart"] += replayed
        log.info("situation: read back %d stored messages (%d events and acks after the last save)", len(rows),
                 replayed)

    # -- inputs (event loop) -------------------------------------------------------------------

    def on_stored(self, records: Sequence[Accepted]) -> None:
        """The ingest's feed: a committed batch's accepted records."""
        self.take(self.situation.observe(records, self._clock_ms()))

    def take(self, out: Output) -> None:
        """Act on what the core decided."""
        for alert in out.sends:
            self._queue(alert)
        for unit_id, alert_id in out.withdrawn:
            self._sends.append((unit_id, "cmd", {"type": "withdraw", "alert_id": alert_id}))
            self._send_ready.set()
        self._audit_pending += out.audit
        self.hub.publish(out.deltas)
        for reason, detail in out.refused:
            self.counts[f"ack_refused_{reason}"] += 1
            log.warning("ack refused (%s): %s", reason, detail)
        for flag in out.flags:
            self.counts["flags"] += 1
            log.warning("control room: %s", flag)

    def _queue(self, alert: AlertOut) -> None:
        self._sends.append((alert.unit_id, "alert", dict(alert.body)))
        self._send_ready.set()

    # -- operators (API) -----------------------------------------------------------------------

    def create_incident(self, type_: str, lat: float, lon: float, *, by: str, note: str) -> str:
        incident_id, out = self.situation.create_incident(type_, lat, lon, self._clock_ms(), by=by, note=note)
        self.take(out)
        return incident_id

    def override(self, target: str, operator: str, *, reason: str, new_unit_id: str | None, cancel: bool) -> None:
        """Raises `AlertError` (its subclasses say why)."""
        self.take(self.situation.override(target, operator, self._clock_ms(), reason=reason,
                                          new_unit_id=new_unit_id, cancel=cancel))

    def close_incident(self, incident_id: str, operator: str, *, reason: str) -> None:
        self.take(self.situation.close_incident(incident_id, operator, self._clock_ms(), reason=reason))

    async def put_hotlist_entry(self, entry: HotlistEntry, *, by: str) -> bool:
        """Add `entry`, or replace the entry for its plate; returns whether one was
        replaced. Saved to `hotlist_path` (if set) before it takes effect, then audited.
        Raises `HotlistRefused` (expiry not in the future) or `HotlistNotSaved`."""
        now = self._clock_ms()
        if not entry.live(now):
            raise HotlistRefused(f"expires_ts {entry.expires_ts} is not in the future (now {now})")
        async with self._hotlist_lock:
            hotlist = self._current_hotlist()
            previous = hotlist.get(entry.plate)
            await self._save_hotlist([e for e in hotlist if e.plate != entry.plate] + [entry])
            hotlist.add(entry)
            self._hotlist_changed("replaced" if previous else "added", entry.plate, entry, previous, by=by)
        return previous is not None

    async def remove_hotlist_entry(self, plate: str, *, by: str) -> HotlistEntry:
        """Remove the entry for `plate` (normalised) and return it; `KeyError` if there
        is none. Saved, applied and audited as `put_hotlist_entry`. Open `anpr_hit`
        incidents for the plate stay open until an operator closes them."""
        async with self._hotlist_lock:
            hotlist = self._current_hotlist()
            entry = hotlist.get(plate)
            if entry is None:
                raise KeyError(normalise_plate(plate))
            await self._save_hotlist([e for e in hotlist if e.plate != entry.plate])
            hotlist.remove(entry.plate)
            self._hotlist_changed("removed", entry.plate, None, entry, by=by)
        return entry

    def _current_hotlist(self) -> Hotlist:
        """The live hotlist, after loading a foreign edit of the file not yet picked up
        (so a change from the API never overwrites it)."""
        if "hotlist" in self._watched:
            self._reload("hotlist")
        if self._hotlist_file_bad is not None:
            raise HotlistNotSaved(
                f"the hotlist file was edited and does not validate ({self._hotlist_file_bad}); "
                "fix the file, then try again"
            )
        return self.situation.picture.hotlist

    async def _save_hotlist(self, entries: list[HotlistEntry]) -> None:
        path = self.hotlist_path
        if path is None:
            return
        await asyncio.to_thread(save_hotlist, path, sorted(entries, key=lambda e: e.plate))
        if "hotlist" in self._watched:  # our own write: not a change to reload
            self._watched["hotlist"] = (path, _stamp(path))

    def _hotlist_changed(
        self, op: str, plate: str, entry: HotlistEntry | None, previous: HotlistEntry | None, *, by: str
    ) -> None:
        data = {
            "op": op, "entry": entry.as_record() if entry else None,
            "previous": previous.as_record() if previous else None,
            "saved_to": str(self.hotlist_path) if self.hotlist_path else None,
            "entries": len(self.situation.picture.hotlist),
        }
        self._audit_pending.append(AuditRecord("hotlist.changed", by, plate, data, self._clock_ms()))
        self.counts[f"hotlist_{op}"] += 1
        log.info("hotlist: %s %s by %s", op, plate, by)

    # -- views (API) ---------------------------------------------------------------------------

    def picture(self) -> dict[str, Any]:
        return {"type": "FeatureCollection", "features": self.situation.picture.features(self._clock_ms())}

    def incidents(self) -> list[dict[str, Any]]:
        return [self.incident(i) for i in self.situation.picture.incidents]

    def incident(self, incident_id: str) -> dict[str, Any]:
        inc = self.situation.picture.incidents[incident_id]
        rec = self.situation.recommendations.get(incident_id)
        return {
            "incident_id": inc.id, "type": inc.type, "status": inc.status, "lat": inc.lat, "lon": inc.lon,
            "t_ms": inc.t_ms, "opened_ms": inc.opened_ms, "subject": inc.subject, "by": inc.by,
            "uncertainty_m": inc.uncertainty_m, "detail": inc.detail, "sources": inc.sources,
            "recommendation": None if rec is None else {
                "chosen": [c.as_dict() for c in rec.chosen], "passed_over": [p.as_dict() for p in rec.passed_over],
                "reason": rec.reason,
            },
            "alerts": [self.situation.alert_json(a.alert_id) for a in self.situation.alerts.alerts_for(inc.id)],
        }

    def hotlist(self) -> list[dict[str, Any]]:
        """Every hotlist entry (expired ones too, flagged), by plate."""
        return [self.hotlist_json(e) for e in self.situation.picture.hotlist]

    def hotlist_json(self, entry: HotlistEntry) -> dict[str, Any]:
        return {**entry.as_record(), "expired": not entry.live(self._clock_ms())}

    def alerts(self) -> list[dict[str, Any]]:
        out = []
        for incident_id in self.situation.picture.incidents:
            out += [self.situation.alert_json(a.alert_id) for a in self.situation.alerts.alerts_for(incident_id)]
        return out

    def live(self) -> dict[str, Any]:
        return {"alerts_queued": len(self._sends), "audit_pending": len(self._audit_pending),
                "stream_clients": self.hub.count, **self.counts}

    # -- loops ---------------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._tick_loop(), name="situation-tick")
            tg.create_task(self._send_loop(), name="situation-send")
            tg.create_task(self._audit_loop(), name="situation-audit")

    async def _tick_loop(self) -> None:
        next_reload = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.tick_s)
            self.take(self.situation.tick(self._clock_ms(), watched=self.hub.count > 0))
            if loop.time() >= next_reload:
                self.reload_changed()
                next_reload = loop.time() + RELOAD_S

    async def _send_loop(self) -> None:
        """Publish what is queued, all of it at once (an incident's alerts must not wait
        for each other's PUBACKs); what failed goes back first in line, in order."""
        while True:
            await self._send_ready.wait()
            self._send_ready.clear()
            while self._sends:
                batch = list(self._sends)
                self._sends.clear()
                sent = await asyncio.gather(*(self._downlink.publish_down(*item) for item in batch))
                failed = [item for item, ok in zip(batch, sent, strict=True) if not ok]
                for (_device, kind, _body), ok in zip(batch, sent, strict=True):
                    self.counts[f"{kind}_published" if ok else f"{kind}_retries"] += 1
                if failed:
                    self._sends.extendleft(reversed(failed))
                    await asyncio.sleep(RETRY_S)

    async def _audit_loop(self) -> None:
        while True:
            await asyncio.sleep(AUDIT_FLUSH_S)
            await self.flush()

    async def flush(self) -> None:
        """Write the pending audit records, then the state records the core changed, each
        in one transaction on the DB thread; what fails is kept for the next flush."""
        loop = asyncio.get_running_loop()
        if self._audit_pending:
            batch, self._audit_pending = self._audit_pending, []
            try:
                await loop.run_in_executor(self._db, self._audit.append_many, batch)
            except sqlite3.OperationalError as exc:
                self._audit_pending[:0] = batch  # kept, in order, for the next flush
                log.warning("audit write failed, retrying: %s", exc)
            else:
                self.counts["audit_entries"] += len(batch)
        if self._state is None:
            return
        changes = self._state_pending.then(self.situation.take_state_changes())
        self._state_pending = StateChanges()
        if not changes:
            return
        try:
            rows = await loop.run_in_executor(self._db, self._state.write, changes)
        except sqlite3.Error as exc:
            self._state_pending = changes.then(self._state_pending)
            self.counts["state_write_failed"] += 1
            log.warning("saving the situation failed, retrying: %s", exc)
            return
        self.counts["state_rows_written"] += rows

    async def close(self) -> None:
        """After the last `flush`: close the state file and stop the DB thread."""
        if self._state is not None:
            await asyncio.get_running_loop().run_in_executor(self._db, self._state.close)
            self._state = None
        self._db.shutdown(wait=True)


__all__ = [
    "DeltaHub",
    "HotlistNotSaved",
    "HotlistRefused",
    "SituationError",
    "SituationService",
    "Subscriber",
    "load_inputs",
    "save_hotlist",
]

