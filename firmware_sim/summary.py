"""What a simulator run reports: a live progress line while it runs, and at the end a
summary of every fault (what was injected, what the platform did about it, and whether
that is what it should have done) with the run's totals.

The platform's side comes from the gateway's API (`/api/v1/stats` and
`/api/v1/devices`, over mutual TLS with an operator identity the simulator issues
itself): rejection counters by reason (taken before and after the run, so the summary
shows what this run caused), and per device the highest sequence number stored and the
ones missing below it. "Nothing valid lost" means: every device that was not revoked or
forged has `missing == []` and its last sequence number stored.
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import urlsplit

from certs.pki import Pki
from certs.tls import client_context
from edge_agent.errors import BluelightError, ConfigError
from firmware_sim.scenario import Fault, Incident, Scenario

API_PREFIX = "/api/v1"
#: Events up to this long (sim seconds) after an incident count as its detection.
EVENT_WINDOW_S = 300.0
#: An incident this close to the end may not have been reported yet (man-down waits 30 s).
SETTLE_S = 45.0


class GatewayUnavailable(BluelightError):
    """The gateway's API could not be reached or answered with an error."""


class GatewayApi:
    """A small client for the gateway's HTTPS API (mutual TLS, `identity`'s certificate)."""

    def __init__(self, url: str, pki: Pki, identity: str, *, timeout_s: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ConfigError(
                f"--gateway-api must be an https:// URL (e.g. https://localhost:8443/api/v1), got {url!r}"
            )
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or 443
        self.prefix = parts.path.rstrip("/") or API_PREFIX
        self.timeout_s = timeout_s
        self._ctx = client_context(pki, pki.require_identity(identity))

    def get(self, path: str) -> Any:
        conn = http.client.HTTPSConnection(self.host, self.port, context=self._ctx, timeout=self.timeout_s)
        try:
            conn.request("GET", f"{self.prefix}{path}")
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise GatewayUnavailable(f"gateway API {self.url}: {exc.__class__.__name__}: {exc}") from None
        finally:
            conn.close()
        if response.status != 200:
            raise GatewayUnavailable(f"gateway API {self.url}{path}: HTTP {response.status}: {body[:200]!r}")
        try:
            return json.loads(body)
        except ValueError:
            raise GatewayUnavailable(f"gateway API {self.url}{path}: not JSON") from None

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = self.get("/stats")
        return data

    def devices(self) -> dict[str, dict[str, Any]]:
        return {d["id"]: d for d in self.get("/devices")}


# -- live progress ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """The fleet's figures at one moment."""

    t_s: float
    duration_s: float | None
    devices: int
    started: int
    online: int
    produced: int
    sent: int
    confirmed: int
    pending: int
    incidents: int
    incidents_total: int
    faults: int
    faults_total: int
    speed: float


def progress_text(s: Snapshot) -> str:
    end = f"/{s.duration_s:,.0f}" if s.duration_s is not None else ""
    return (
        f"t={s.t_s:,.0f}{end} s ({s.speed:g}x) | devices {s.online:,}/{s.devices:,} online | "
        f"messages {s.produced:,} made, {s.sent:,} sent, {s.confirmed:,} confirmed, {s.pending:,} pending | "
        f"incidents {s.incidents}/{s.incidents_total} | faults {s.faults}/{s.faults_total} injected"
    )


class Progress:
    """Writes the progress line: rewritten in place on a terminal, else one line every
    `every_s` seconds. `note()` prints a line above it."""

    def __init__(self, stream: IO[str] | None = None, *, every_s: float = 5.0, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.every_s = every_s
        self._last = 0.0
        self._shown = ""

    @property
    def interval_s(self) -> float:
        return 0.5 if self.tty else self.every_s

    def update(self, snapshot: Snapshot, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        text = progress_text(snapshot)
        if self.tty:
            width = _width()
            self._shown = text[: width - 1]
            self.stream.write("\r\x1b[K" + self._shown)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        if self.tty and self._shown:
            self.stream.write("\r\x1b[K" + text + "\n" + self._shown)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty and self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = ""


def _width() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except OSError:
        return 200


# -- what the run did ----------------------------------------------------------------------------


@dataclass
class DeviceReport:
    """One device's side of the run."""

    id: str
    type: str
    first_seq: int
    next_seq: int
    held: int
    pending: int
    sent: int
    confirmed: int
    connects: int
    publish_failures: int
    started: bool
    #: Events the device's sensors raised: (type, seq, sim t_s).
    events: list[tuple[str, int, float]] = field(default_factory=list)
    #: Sequence numbers still in the outbox at the end (unconfirmed).
    unconfirmed: frozenset[int] = frozenset()
    #: Why its messages are expected to be refused ("revoked", "forged"), if so.
    refused_as: str | None = None

    @property
    def produced(self) -> int:
        return self.next_seq - self.first_seq

    @property
    def expected_last_seq(self) -> int:
        """The highest seq the gateway must hold: everything but held presence rows."""
        return self.next_seq - 1 - self.held

    def stored_at(self, view: Mapping[str, Any] | None) -> bool:
        """Whether the gateway's view of this device (`/api/v1/devices`) holds every
        seq it must: nothing missing from `first_seq` on, and its last seq stored."""
        if view is None:
            return False
        missing = [s for s in view.get("missing", []) if s >= self.first_seq]
        return not missing and int(view.get("last_seq", 0)) >= self.expected_last_seq


@dataclass
class FaultRecord:
    """One fault as injected; `facts` holds what the assessment needs."""

    fault: Fault
    injected: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    done: bool = False


@dataclass
class IncidentRecord:
    incident: Incident
    what: str = ""
    done: bool = False
    #: How many sensors the models say will report it (None: not known).
    expected: int | None = None


@dataclass(frozen=True)
class Verdict:
    """A check of the platform's behaviour: `ok` None means nothing to judge (no gateway)."""

    label: str
    injected: str
    platform: str
    ok: bool | None


@dataclass
class Summary:
    """The end-of-run report (`lines()` for people, `as_dict()` for machines)."""

    scenario: str
    seed: int
    speed: float
    sim_s: float
    real_s: float
    devices: int
    totals: dict[str, int]
    gateway: dict[str, Any] | None
    gateway_error: str | None
    rejected: dict[str, int]
    incidents: list[Verdict]
    faults: list[Verdict]
    loss: Verdict
    lost_devices: dict[str, list[int]]

    @property
    def ok(self) -> bool:
        checks = [self.loss, *self.faults, *self.incidents]
        return all(v.ok is not False for v in checks)

    def lines(self) -> list[str]:
        t = self.totals
        out = [
            f"Summary: scenario {self.scenario}, seed {self.seed}, {self.sim_s:,.0f} s simulated at {self.speed:g}x "
            f"in {self.real_s:,.0f} s",
            f"  devices     {self.devices:,} ({t['started']:,} started, {t['online']:,} online at the end)",
            f"  messages    {t['produced']:,} made, {t['sent']:,} sent (with re-sends), {t['confirmed']:,} confirmed "
            f"by gateway receipts, {t['pending']:,} not receipted by the end (a device's offline status, sent as it "
            "stops, is receipted on its next connection)",
        ]
        if self.gateway is not None:
            rejected = ", ".join(f"{k} {v:,}" for k, v in sorted(self.rejected.items()) if v) or "none"
            out.append(
                f"  gateway     {self.gateway.get('accepted', 0):,} accepted this run; rejected this run: {rejected}"
            )
        else:
            out.append(f"  gateway     not queried: {self.gateway_error or 'pass --gateway-api URL'}")
        if self.incidents:
            out.append("Incidents:")
            out += [_verdict_line(v) for v in self.incidents]
        if self.faults:
            out.append("Faults:")
            out += [_verdict_line(v) for v in self.faults]
        out.append(_verdict_line(self.loss))
        verdict = "OK" if self.ok else "PROBLEMS FOUND"
        out.append(f"Result: {verdict}")
        return out

    def as_dict(self) -> dict[str, Any]:
        def verdict(v: Verdict) -> dict[str, Any]:
            return {"label": v.label, "injected": v.injected, "platform": v.platform, "ok": v.ok}

        return {
            "scenario": self.scenario, "seed": self.seed, "speed": self.speed, "sim_s": self.sim_s,
            "real_s": self.real_s, "devices": self.devices, "totals": self.totals, "rejected": self.rejected,
            "gateway_error": self.gateway_error, "incidents": [verdict(v) for v in self.incidents],
            "faults": [verdict(v) for v in self.faults], "loss": verdict(self.loss),
            "lost_devices": self.lost_devices, "ok": self.ok,
        }


def _verdict_line(v: Verdict) -> str:
    mark = {True: "ok  ", False: "FAIL", None: "--  "}[v.ok]
    return f"  [{mark}] {v.label}: {v.injected} -> {v.platform}"


# -- assessment ------------------------------------------------------------------------------------


def _delta(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> dict[str, int]:
    prior = (before or {}).get("rejected", {})
    return {k: int(v) - int(prior.get(k, 0)) for k, v in after.get("rejected", {}).items()}


def assess(
    scenario: Scenario,
    *,
    devices: Sequence[DeviceReport],
    faults: Sequence[FaultRecord],
    incidents: Sequence[IncidentRecord],
    stats_before: Mapping[str, Any] | None,
    stats_after: Mapping[str, Any] | None,
    gateway_devices: Mapping[str, Mapping[str, Any]] | None,
    gateway_error: str | None,
    sim_s: float,
    real_s: float,
    online: int,
    skew_view: Mapping[str, Mapping[str, Any]] | None = None,
) -> Summary:
    """Judge the run: each fault's injection against what the gateway reports."""
    have_gw = stats_after is not None and gateway_devices is not None
    rejected = _delta(stats_before, stats_after) if stats_after is not None else {}
    by_id = {d.id: d for d in devices}
    gw = gateway_devices or {}
    totals = {
        "started": sum(d.started for d in devices),
        "online": online,
        "produced": sum(d.produced for d in devices),
        "sent": sum(d.sent for d in devices),
        "confirmed": sum(d.confirmed for d in devices),
        "pending": sum(d.pending for d in devices),
    }
    gateway = None
    if stats_after is not None:
        accepted = int(stats_after.get("accepted", 0)) - int((stats_before or {}).get("accepted", 0))
        gateway = {"accepted": accepted, "stats": stats_after}

    lost: dict[str, list[int]] = {}
    checked = 0
    for d in devices:
        if d.refused_as or not d.started or d.produced == 0:
            continue
        checked += 1
        view = gw.get(d.id)
        if view is None:
            lost[d.id] = list(range(d.first_seq, min(d.expected_last_seq, d.first_seq + 20) + 1))
            continue
        missing = [s for s in view.get("missing", []) if s >= d.first_seq]
        short = list(range(max(int(view.get("last_seq", 0)) + 1, d.first_seq), d.expected_last_seq + 1))
        if missing or short:
            lost[d.id] = (missing + short)[:20]
    if have_gw:
        loss = Verdict(
            "nothing valid lost",
            f"{checked:,} devices that were not revoked or forged, {sum(by_id[i].produced for i in by_id):,} "
            "messages made",
            "every sequence number stored, none missing" if not lost
            else f"{len(lost)} devices incomplete at the gateway: "
            + "; ".join(f"{k} missing {v[:5]}" for k, v in list(lost.items())[:5]),
            not lost,
        )
    else:
        unconfirmed = sum(d.pending for d in devices if not d.refused_as)
        loss = Verdict("nothing valid lost", f"{checked:,} devices", f"not checked at the gateway; {unconfirmed:,} "
                       "messages still unconfirmed by receipts", None)
    judged = _Judge(scenario, by_id, gw, rejected, have_gw, skew_view or gw)
    return Summary(
        scenario=scenario.name, seed=scenario.seed, speed=scenario.speed, sim_s=sim_s, real_s=real_s,
        devices=len(devices), totals=totals, gateway=gateway, gateway_error=gateway_error, rejected=rejected,
        incidents=[judged.incident(r) for r in incidents], faults=[judged.fault(r) for r in faults], loss=loss,
        lost_devices=lost,
    )


@dataclass
class _Judge:
    scenario: Scenario
    devices: Mapping[str, DeviceReport]
    gw: Mapping[str, Mapping[str, Any]]
    rejected: Mapping[str, int]
    have_gw: bool
    skew_view: Mapping[str, Mapping[str, Any]]

    def incident(self, r: IncidentRecord) -> Verdict:
        inc = r.incident
        label = f"t={inc.at_s:,.0f} s {inc.type}" + (f" {inc.unit}" if inc.unit else "")
        if not r.done:
            return Verdict(label, "not reached before the run ended", "-", None)
        raised = [
            (dev, t, seq, kind)
            for dev in self.devices.values()
            for kind, seq, t in dev.events
            if inc.at_s - 0.001 <= t <= inc.at_s + EVENT_WINDOW_S and _matches(inc, kind, dev)
        ]
        if not raised:
            if inc.at_s > self.scenario.duration_s - SETTLE_S:
                return Verdict(label, r.what, "too close to the end of the run to judge", None)
            if r.expected == 0:
                return Verdict(label, r.what, "no sensor in range detected it", None)
            return Verdict(label, r.what, "no device raised an event for it", False if self.have_gw else None)
        delivered = [(d, s) for d, _, s, _ in raised if s not in d.unconfirmed and s <= d.expected_last_seq]
        first = min(raised, key=lambda x: x[1])
        who = ", ".join(sorted({d.id for d, *_ in raised})[:6])
        platform = (
            f"{len(raised)} event(s) from {who}, first {first[3]} at t={first[1]:,.1f} s; "
            f"{len(delivered)} receipted (stored) by the gateway"
        )
        return Verdict(label, r.what, platform, len(delivered) == len(raised))

    def fault(self, r: FaultRecord) -> Verdict:
        f = r.fault
        units = ", ".join(f.units[:4]) + (f" +{len(f.units) - 4}" if len(f.units) > 4 else "")
        label = f"t={f.at_s:,.0f} s {f.type}" + (f" {units}" if units else "")
        injected = "; ".join(r.injected) if r.injected else "not injected (the run ended first)"
        if not r.done and not r.injected:
            return Verdict(label, injected, "-", None)
        if r.facts.get("unsupported"):
            return Verdict(label, injected, "nothing to judge", None)
        method = getattr(self, f"_{f.type}", None)
        if method is None or not self.have_gw:
            return Verdict(label, injected, "gateway not queried", None)
        platform, ok = method(r)
        return Verdict(label, injected, platform, ok)

    def _stored(self, device: str) -> str:
        view = self.gw.get(device)
        if view is None:
            return f"{device}: nothing stored"
        return f"{device}: last seq {view['last_seq']}, missing {view['missing'][:5] or '[]'}"

    def _complete(self, device: str) -> bool:
        d = self.devices.get(device)
        return d is not None and d.stored_at(self.gw.get(device))

    def _link(self, r: FaultRecord) -> tuple[str, bool]:
        complete = [u for u in r.fault.units if self._complete(u)]
        buffered = r.facts.get("made_while_down", 0)
        text = (
            f"{buffered:,} messages made while cut off were held in the outbox and delivered after reconnecting; "
            f"{len(complete)}/{len(r.fault.units)} devices complete at the gateway ("
            + "; ".join(self._stored(u) for u in r.fault.units[:3]) + ")"
        )
        return text, len(complete) == len(r.fault.units)

    _link_flap = _link
    _link_outage = _link

    def _broker_outage(self, r: FaultRecord) -> tuple[str, bool]:
        healthy = [d for d in self.devices.values() if d.started and not d.refused_as and d.produced]
        complete = [d for d in healthy if self._complete(d.id)]
        text = (
            f"{r.facts.get('made_while_down', 0):,} messages made during the outage were held and delivered; "
            f"{len(complete):,}/{len(healthy):,} devices complete at the gateway"
        )
        return text, len(complete) == len(healthy)

    def _clock_skew(self, r: FaultRecord) -> tuple[str, bool | None]:
        unit = r.fault.unit
        others = [
            int(v["clock_skew_ms"]) for k, v in self.skew_view.items()
            if k != unit and k in self.devices and v.get("clock_skew_ms") is not None
            and not self.devices[k].refused_as and k not in r.facts.get("skewed_units", ())
        ]
        view = self.skew_view.get(unit) or {}
        est = view.get("clock_skew_ms")
        if est is None or not others:
            return f"the gateway has no clock estimate for {unit}", False
        relative = int(est) - statistics.median(others)
        expected = -r.fault.offset_ms
        tolerance = 2000 + 250 * self.scenario.speed
        flagged = int((self.gw.get(unit) or {}).get("skewed", 0))
        text = (
            f"gateway estimates {unit}'s clock {-relative / 1000:+.1f} s off the fleet's (injected "
            f"{r.fault.offset_ms / 1000:+.1f} s); {flagged:,} of its messages flagged skewed; messages still stored"
        )
        return text, abs(relative - expected) <= tolerance and self._complete(unit)

    def _delivered(self, r: FaultRecord) -> tuple[str, bool]:
        unit = r.fault.unit
        return f"device kept delivering ({self._stored(unit)})", self._complete(unit)

    _gps_jump = _delivered
    _gps_loss = _delivered
    _sensor_dropout = _delivered

    def _revoked(self, r: FaultRecord) -> tuple[str, bool]:
        unit, facts = r.fault.unit, r.facts
        view = self.gw.get(unit) or {}
        last = int(view.get("last_seq", 0))
        limit = int(facts.get("seq_limit", facts.get("seq_at_revoke", 0)))
        reconnected = int(facts.get("connects_after", 0))
        refused = int(facts.get("publish_refused", 0))
        attempts = int(facts.get("reconnect_attempts", 0))
        parts = [
            f"gateway rejected {self.rejected.get('revoked', 0):,} as revoked",
            f"broker refused {refused:,} publishes",
            f"{attempts} reconnect attempts, {reconnected} succeeded",
            f"gateway's last stored seq {last} (device was at {facts.get('seq_at_revoke')} when revoked)",
        ]
        return "; ".join(parts), reconnected == 0 and last <= limit

    def _forged(self, r: FaultRecord) -> tuple[str, bool]:
        unit, facts = r.fault.unit, r.facts
        d = self.devices.get(unit)
        view = self.gw.get(unit) or {}
        last = int(view.get("last_seq", 0))
        forged_seqs = (d.next_seq - int(facts.get("first_forged_seq", 0))) if d else 0
        bad = self.rejected.get("bad_signature", 0)
        text = (
            f"gateway rejected {bad:,} as bad_signature ({forged_seqs:,} forged messages, re-sent until the end); "
            f"stored none of them (last stored seq {last}, first forged {facts.get('first_forged_seq')})"
        )
        ok = bad >= min(1, forged_seqs) and last < int(facts.get("first_forged_seq", 1) or 1)
        return text, ok

    def _replay(self, r: FaultRecord) -> tuple[str, bool]:
        facts = r.facts
        acked = int(facts.get("acked", 0))
        replayed = self.rejected.get("replayed", 0)
        text = (
            f"gateway counted {replayed:,} replayed (>= {acked} re-published); "
            f"the originals stay stored once ({self._stored(r.fault.unit)})"
        )
        return text, acked > 0 and replayed >= acked and self._complete(r.fault.unit)

    def _malformed(self, r: FaultRecord) -> tuple[str, bool]:
        expect: dict[str, int] = r.facts.get("expected", {})
        got = {reason: self.rejected.get(reason, 0) for reason in expect}
        text = (
            "gateway rejected " + ", ".join(f"{got[k]:,} as {k} (>= {v} sent)" for k, v in expect.items())
            + f"; the device's own messages unaffected ({self._stored(r.fault.unit)})"
        )
        return text, all(got[k] >= v for k, v in expect.items()) and self._complete(r.fault.unit)


#: Which event types answer which incident.
_EVENTS_FOR: dict[str, tuple[str, ...]] = {
    "panic": ("panic",),
    "man_down": ("man_down",),
    "crash": ("crash",),
    "gunshot": ("gunshot",),
    "hotlist_vehicle": ("anpr_read",),
    "holster": ("holster", "holster_draw"),
    "bodycam": ("bodycam", "bodycam_on", "bodycam_off"),
}


def _matches(inc: Incident, kind: str, dev: DeviceReport) -> bool:
    if kind not in _EVENTS_FOR.get(inc.type, (inc.type,)):
        return False
    return inc.unit is None or dev.id == inc.unit


__all__ = [
    "DeviceReport", "FaultRecord", "GatewayApi", "GatewayUnavailable", "IncidentRecord", "Progress", "Snapshot",
    "Summary", "Verdict", "assess", "progress_text",
]
