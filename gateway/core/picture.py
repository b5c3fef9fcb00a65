"""The situational picture: one typed snapshot of units, sensors and incidents, fed
with verified messages. Pure: every call takes `now_ms`; nothing here reads a clock.

    picture = Picture(registry, hotlist=hotlist, zones=zones)
    update = picture.observe(accepted, now_ms)   # a verified, stored message
    update.deltas          # what changed, as GeoJSON features (for the dashboard)
    update.new_incidents   # incidents that need a decision
    update.answers         # officers' answers to alerts (for the alert book)

Units (officers, vehicles) get a Kalman track from their fixes and a state from their
status messages, their answers to alerts and their movement: available, committed
(accepted an alert), at_scene (said `arrived`, or came within `arrive_radius_m` of
their incident), off_duty, unknown (offline or never heard). Capabilities and kind
come from the registry (`Registry`), never from the device.

Incidents come from events (panic, man_down, crash), from located gunshots (three or
more acoustic detections, `multilat.locate`), ANPR hotlist hits, geofence breaches and
coverage gaps, and from operators. Related events are merged into one incident: the
same subject's alarms, or the same type within `merge_radius_m` and `merge_window_ms`.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from edge_agent.wire.geo import distance_m
from gateway.core.anpr import Hotlist, PlateSightings, Sighting
from gateway.core.decide import IncidentView, UnitView
from gateway.core.geofence import GeofenceEvent, GeofenceMonitor, Polygon, Zone
from gateway.core.multilat import Detection, MultilatError, locate
from gateway.core.snapshot import Record, SnapshotError, obj, seq
from gateway.core.track import BadFix, Track, TrackEstimate

UNIT_KINDS = frozenset({"officer", "vehicle"})
SENSOR_KINDS = frozenset({"acoustic", "anpr", "sensor"})
STATES = frozenset({"available", "committed", "at_scene", "off_duty", "unknown"})
#: Event types that open an incident of the same name about the sending unit.
UNIT_ALARMS = frozenset({"panic", "man_down", "crash"})
#: Alarms of one subject merged into one incident (an officer down is one incident).
OFFICER_DOWN = frozenset({"panic", "man_down"})
#: Receive-time offsets kept per unit to estimate its clock offset.
OFFSET_SAMPLES = 32
#: Events remembered (device, seq) to ignore a redelivered one.
SEEN_EVENTS = 10_000


class RegistryError(ValueError):
    """The unit registry is not valid; the message names the entry and field."""


@dataclass(frozen=True)
class UnitInfo:
    """What the force says a device is: its kind, call sign and capabilities."""

    id: str
    kind: str
    callsign: str = ""
    capabilities: frozenset[str] = frozenset()
    supervisor: bool = False

    def __post_init__(self) -> None:
        if self.kind not in UNIT_KINDS | SENSOR_KINDS:
            raise RegistryError(f"unit {self.id!r}: kind must be one of {sorted(UNIT_KINDS | SENSOR_KINDS)}")
        object.__setattr__(self, "capabilities", frozenset(self.capabilities))


@dataclass(frozen=True)
class SensorSite:
    id: str
    kind: str
    lat: float
    lon: float


class Registry:
    """Units and fixed sensor sites by id, plus geofence zones. A device not listed is
    shown on the picture as kind `unknown` and never dispatched (closed default)."""

    def __init__(
        self, units: Iterable[UnitInfo] = (), sites: Iterable[SensorSite] = (), zones: Iterable[Zone] = ()
    ) -> None:
        self.units = {u.id: u for u in units}
        self.sites = {s.id: s for s in sites}
        self.zones = tuple(zones)

    def get(self, unit_id: str) -> UnitInfo | None:
        return self.units.get(unit_id)

    @classmethod
    def from_data(cls, data: Any, source: str = "<registry>") -> Registry:
        """From a parsed YAML/JSON mapping: `units: [{id, kind, callsign, capabilities,
        supervisor}]`, `sensors: [{id, kind, lat, lon}]`, `zones: [{id, rule, points:
        [[lat, lon], ...], min_units, monitored}]`."""
        if not isinstance(data, Mapping):
            raise RegistryError(f"{source}: must be a mapping with 'units', 'sensors' and/or 'zones'")
        units, sites, zones = [], [], []
        for i, item in enumerate(_entries(data, "units", source)):
            where = f"{source}: units[{i}]"
            try:
                caps = item.get("capabilities", [])
                if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                    raise RegistryError("'capabilities' must be a list of names")
                units.append(UnitInfo(
                    id=_text(item, "id"), kind=_text(item, "kind"), callsign=str(item.get("callsign", "")),
                    capabilities=frozenset(caps), supervisor=bool(item.get("supervisor", False)),
                ))
            except (RegistryError, TypeError, ValueError) as exc:
                raise RegistryError(f"{where}: {exc}") from None
        for i, item in enumerate(_entries(data, "sensors", source)):
            try:
                sites.append(SensorSite(_text(item, "id"), str(item.get("kind", "sensor")),
                                        float(item["lat"]), float(item["lon"])))
            except (KeyError, TypeError, ValueError) as exc:
                raise RegistryError(f"{source}: sensors[{i}]: {exc}") from None
        for i, item in enumerate(_entries(data, "zones", source)):
            try:
                points = [(float(p[0]), float(p[1])) for p in item["points"]]
                zones.append(Zone(
                    _text(item, "id"), Polygon(tuple(points)), rule=_text(item, "rule"),
                    monitored=frozenset(item.get("monitored", [])), min_units=int(item.get("min_units", 1)),
                ))
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise RegistryError(f"{source}: zones[{i}]: {exc}") from None
        return cls(units, sites, zones)


def _entries(data: Mapping[str, Any], key: str, source: str) -> list[Mapping[str, Any]]:
    items = data.get(key) or []
    if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
        raise RegistryError(f"{source}: '{key}' must be a list of mappings")
    return items


def _text(item: Mapping[str, Any], key: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise RegistryError(f"'{key}' must be a non-empty string, got {value!r}")
    return value


class StoredMessage(Protocol):
    """What the picture reads of a verified message (`gateway.core.ingest.Accepted` is one)."""

    @property
    def device_id(self) -> str: ...
    @property
    def seq(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def ts(self) -> int: ...
    @property
    def recv_ms(self) -> int: ...
    @property
    def body(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class PictureConfig:
    """How the picture merges and ages things (metres, milliseconds)."""

    merge_radius_m: float = 150.0
    merge_window_ms: int = 120_000
    arrive_radius_m: float = 50.0
    #: Gunshot detections further apart in time than this are different shots.
    shot_spread_ms: int = 10_000
    #: A shot heard by fewer than 3 sensors is reported at the first sensor after this.
    shot_wait_ms: int = 1_500
    unlocated_shot_radius_m: float = 1_500.0
    #: How far ahead an ANPR hit's predicted position looks.
    anpr_lookahead_ms: int = 60_000
    #: Closed incidents kept in memory (for the API) this long, and at most this many.
    keep_closed_ms: int = 3_600_000
    max_closed: int = 1_000
    #: Coverage zones are counted at most this often (each count estimates every
    #: available unit's position).
    coverage_check_ms: int = 1_000


@dataclass
class Unit:
    info: UnitInfo | None
    id: str
    track: Track
    state: str = "unknown"
    online: bool | None = None
    status_seq: int = 0
    incident_id: str | None = None
    last_seen_ms: int = 0
    battery: float | None = None
    #: Recent (gateway receive time - device time), ms: the smallest is the device
    #: clock's offset (network delay only adds), so a late, queued message does not
    #: make an old position look fresh.
    offsets: deque[int] = field(default_factory=lambda: deque(maxlen=OFFSET_SAMPLES))

    @property
    def kind(self) -> str:
        return self.info.kind if self.info is not None else "unknown"

    def estimate(self, now_ms: int) -> TrackEstimate:
        """The track at gateway time `now_ms`, on the device's clock (tracks run on
        device time; an accelerated simulation's clocks run fast)."""
        offset = min(self.offsets) if self.offsets else 0
        return self.track.estimate(now_ms - offset)


@dataclass
class Sensor:
    id: str
    kind: str
    lat: float
    lon: float
    last_seen_ms: int = 0
    tamper: bool = False


@dataclass
class Incident:
    id: str
    type: str
    lat: float
    lon: float
    t_ms: int
    opened_ms: int
    subject: str | None = None
    status: str = "open"
    uncertainty_m: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    updated_ms: int = 0
    by: str = "gateway"

    def view(self) -> IncidentView:
        return IncidentView(self.id, self.type, self.lat, self.lon, self.t_ms, subject=self.subject,
                            detail=dict(self.detail, uncertainty_m=self.uncertainty_m))


@dataclass(frozen=True)
class Delta:
    """One change to the picture: `op` upsert or remove of the feature `id` in `layer`
    (units, sensors, incidents, alerts). `feature` is a GeoJSON Feature (geometry null
    for alerts)."""

    layer: str
    id: str
    op: str
    feature: Mapping[str, Any] | None

    def as_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "id": self.id, "op": self.op, "feature": self.feature}


@dataclass(frozen=True)
class Answer:
    """An officer's answer to an alert, as received in an `ack`."""

    unit_id: str
    alert_id: str
    answer: str
    reason: str
    ts_ms: int


@dataclass
class Update:
    """What changed: `new_incidents` need a decision; `cleared` incidents' last
    attending unit is available again (the incident can close); `forgotten` closed
    incidents were dropped from memory."""

    deltas: list[Delta] = field(default_factory=list)
    new_incidents: list[str] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)
    cleared: list[str] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)

    def extend(self, other: Update) -> Update:
        self.deltas += other.deltas
        self.new_incidents += other.new_incidents
        self.answers += other.answers
        self.cleared += other.cleared
        self.forgotten += other.forgotten
        return self


@dataclass
class _Shot:
    first_ms: int
    detections: dict[str, Detection] = field(default_factory=dict)
    incident_id: str | None = None


def feature(layer: str, fid: str, lat: float | None, lon: float | None, props: Mapping[str, Any]) -> dict[str, Any]:
    geometry = None if lat is None or lon is None else {"type": "Point", "coordinates": [round(lon, 7), round(lat, 7)]}
    return {"type": "Feature", "id": f"{layer}/{fid}", "geometry": geometry,
            "properties": {"layer": layer, "id": fid, **props}}


class Picture:
    """The live picture. Not thread-safe: one owner (the gateway's event loop) calls it."""

    def __init__(
        self,
        registry: Registry,
        *,
        hotlist: Hotlist | None = None,
        config: PictureConfig | None = None,
        incident_prefix: str = "inc",
    ) -> None:
        self.registry = registry
        self.hotlist = hotlist or Hotlist([])
        self.config = config or PictureConfig()
        self.units: dict[str, Unit] = {}
        self.sensors: dict[str, Sensor] = {}
        self.incidents: dict[str, Incident] = {}
        self.sightings = PlateSightings()
        self.geofences = GeofenceMonitor(registry.zones)
        #: When coverage zones were last counted (gateway ms; `coverage_check_ms`).
        self._coverage_ms = -(1 << 62)
        self.bad_fixes = 0
        self._prefix = incident_prefix
        self._next_incident = 1
        self._shots: list[_Shot] = []
        self._seen: set[tuple[str, int]] = set()
        self._seen_order: deque[tuple[str, int]] = deque()
        #: Units and sensors changed by messages since `take_changes` (their deltas are
        #: built once a tick, not per message: 2,000 units report every second).
        self._dirty: set[tuple[str, str]] = set()
        for site in registry.sites.values():
            self.sensors[site.id] = Sensor(site.id, site.kind, site.lat, site.lon)

    # -- input -------------------------------------------------------------------------------

    def observe(self, message: StoredMessage, now_ms: int) -> Update:
        """Take one verified, stored message into the picture."""
        device_id, seq, kind, ts_ms, body = message.device_id, message.seq, message.kind, message.ts, message.body
        if kind in ("event", "ack"):
            key = (device_id, seq)
            if key in self._seen:
                return Update()
            self._seen.add(key)
            self._seen_order.append(key)
            if len(self._seen_order) > SEEN_EVENTS:
                self._seen.discard(self._seen_order.popleft())
        if self._is_sensor(device_id, body):
            return self._sensor_message(device_id, kind, ts_ms, body, now_ms)
        unit = self._unit(device_id)
        unit.last_seen_ms = max(unit.last_seen_ms, now_ms)
        unit.offsets.append(message.recv_ms - ts_ms)
        update = Update()
        if "lat" in body and "lon" in body and kind in ("telemetry", "event"):
            self._fix(unit, ts_ms, body, update)
        if kind == "telemetry":
            battery = (body.get("sensors") or {}).get("battery")
            if isinstance(battery, int | float):
                unit.battery = float(battery)
        elif kind == "status":
            update.cleared += self._status(unit, seq, body)
        elif kind == "ack":
            update.answers.append(Answer(device_id, str(body["alert_id"]), str(body["answer"]),
                                         str(body.get("reason", "")), ts_ms))
        elif kind == "event" and body.get("type") in UNIT_ALARMS:
            update.extend(self._unit_alarm(unit, seq, ts_ms, body, now_ms))
        self._dirty.add(("units", unit.id))
        return update

    def tick(self, now_ms: int) -> Update:
        """Time passing: unlocated shots reported, coverage checked, arrivals by movement."""
        update = Update()
        for shot in list(self._shots):
            if now_ms - shot.first_ms < self.config.shot_wait_ms:
                continue
            if shot.incident_id is None:
                first = min(shot.detections.values(), key=lambda d: d.t_ns)
                inc = self._open("gunshot", first.lat, first.lon, first.t_ns // 1_000_000, now_ms,
                                 uncertainty_m=self.config.unlocated_shot_radius_m,
                                 detail={"located": False, "sensors": sorted(shot.detections)})
                shot.incident_id = inc.id
                update.new_incidents.append(inc.id)
                update.deltas.append(self._incident_delta(inc))
            if now_ms - shot.first_ms > self.config.shot_spread_ms:
                self._shots.remove(shot)
        if self.geofences.has_coverage and now_ms - self._coverage_ms >= self.config.coverage_check_ms:
            self._coverage_ms = now_ms
            available = {u.id: (e.lat, e.lon) for u in self.units.values()
                         if u.state == "available" and u.track.started and not (e := u.estimate(now_ms)).stale}
            for event in self.geofences.coverage(available, now_ms):
                update.extend(self._geofence(event, now_ms))
        update.forgotten += self._forget_closed(now_ms)
        for unit in self.units.values():
            if unit.state == "committed" and unit.incident_id in self.incidents and unit.track.started:
                inc = self.incidents[unit.incident_id]
                est = unit.estimate(now_ms)
                if distance_m((est.lat, est.lon), (inc.lat, inc.lon)) <= self.config.arrive_radius_m:
                    unit.state = "at_scene"
                    update.deltas.append(self._unit_delta(unit, now_ms))
        return update

    def _forget_closed(self, now_ms: int) -> list[str]:
        """Bound memory: closed incidents are kept `keep_closed_ms`, at most
        `max_closed` of them (the audit log has the record)."""
        closed = sorted((i.updated_ms, i.id) for i in self.incidents.values() if i.status == "closed")
        excess = len(closed) - self.config.max_closed
        gone = [iid for n, (t, iid) in enumerate(closed) if n < excess or now_ms - t > self.config.keep_closed_ms]
        for iid in gone:
            del self.incidents[iid]
        return gone

    def open_incident(
        self, type_: str, lat: float, lon: float, now_ms: int, *, by: str, note: str = "", subject: str | None = None
    ) -> Update:
        """An incident an operator creates."""
        inc = self._open(type_, lat, lon, now_ms, now_ms, subject=subject, detail={"note": note} if note else {})
        inc.by = by
        return Update([self._incident_delta(inc)], [inc.id])

    def close_incident(self, incident_id: str, now_ms: int) -> Update:
        inc = self.incidents[incident_id]
        inc.status, inc.updated_ms = "closed", now_ms
        update = Update([self._incident_delta(inc)])
        for unit in self.units.values():
            if unit.incident_id == incident_id:
                unit.incident_id = None
                if unit.state in ("committed", "at_scene"):
                    unit.state = "available"
                update.deltas.append(self._unit_delta(unit, now_ms))
        return update

    def set_state(self, unit_id: str, state: str, now_ms: int, *, incident_id: str | None = None) -> Delta:
        """A unit's state from the alert book (accepted -> committed, arrived -> at_scene)."""
        if state not in STATES:
            raise ValueError(f"unknown unit state {state!r}")
        unit = self._unit(unit_id)
        unit.state = state
        unit.incident_id = incident_id if state in ("committed", "at_scene") else None
        if incident_id in self.incidents and state in ("committed", "at_scene"):
            self.incidents[incident_id].status = "assigned"
        return self._unit_delta(unit, now_ms)

    def set_registry(self, registry: Registry, now_ms: int) -> Update:
        """A changed registry (units' kinds and capabilities, sensor sites, zones)."""
        self.registry = registry
        self.geofences = GeofenceMonitor(registry.zones)
        self._coverage_ms = -(1 << 62)
        for site in registry.sites.values():
            sensor = self.sensors.get(site.id)
            if sensor is None:
                self.sensors[site.id] = Sensor(site.id, site.kind, site.lat, site.lon)
            else:
                sensor.kind, sensor.lat, sensor.lon = site.kind, site.lat, site.lon
        update = Update()
        for unit in self.units.values():
            unit.info = registry.get(unit.id)
            update.deltas.append(self._unit_delta(unit, now_ms))
        for unit_id in [u.id for u in self.units.values() if u.info is not None and u.info.kind in SENSOR_KINDS]:
            del self.units[unit_id]
            update.deltas.append(Delta("units", unit_id, "remove", None))
        update.deltas += [self._sensor_delta(s) for s in self.sensors.values()]
        return update

    # -- saving and restoring (plain data, see gateway.core.snapshot) -----------------------

    def export_incident(self, incident_id: str) -> Record | None:
        inc = self.incidents.get(incident_id)
        return None if inc is None else dataclasses.asdict(inc)

    def export_unit(self, unit_id: str) -> Record | None:
        """What a unit's track cannot tell again: its state, commitment and status
        sequence (None when there is nothing of that). Tracks are rebuilt from fixes."""
        unit = self.units.get(unit_id)
        if unit is None or (unit.state == "unknown" and unit.online is None and not unit.status_seq):
            return None
        return {"state": unit.state, "online": unit.online, "status_seq": unit.status_seq,
                "incident_id": unit.incident_id, "battery": unit.battery, "last_seen_ms": unit.last_seen_ms}

    def export_meta(self) -> Record:
        return {"next_incident": self._next_incident, "geofences": self.geofences.export_state()}

    def restore_state(self, meta: Mapping[str, Any], incidents: Mapping[str, Mapping[str, Any]],
                      units: Mapping[str, Mapping[str, Any]]) -> None:
        """Incidents, units' states and geofence state as `export_*` gave them. Raises
        `SnapshotError` and changes nothing when a record does not parse."""
        names = {f.name for f in dataclasses.fields(Incident)}
        restored: dict[str, Incident] = {}
        for incident_id, record in incidents.items():
            try:
                values = dict(obj(record, f"incident {incident_id}"))
                if set(values) - names:
                    raise SnapshotError(f"unknown fields {sorted(set(values) - names)}")
                inc = Incident(**values)
                inc.lat, inc.lon, inc.t_ms, inc.opened_ms = float(inc.lat), float(inc.lon), int(inc.t_ms), \
                    int(inc.opened_ms)
                inc.detail, inc.sources = dict(obj(inc.detail, "detail")), [str(x) for x in seq(inc.sources, "sources")]
            except (TypeError, ValueError) as exc:
                raise SnapshotError(f"incident {incident_id}: {exc}") from None
            if inc.id != incident_id or inc.status not in ("open", "assigned", "closed"):
                raise SnapshotError(f"incident {incident_id}: id {inc.id!r}, status {inc.status!r}")
            restored[incident_id] = inc
        fresh: dict[str, Unit] = {}
        for unit_id, record in units.items():
            try:
                r = obj(record, f"unit {unit_id}")
                unit = Unit(self.registry.get(unit_id), unit_id, Track(unit_id), state=str(r["state"]),
                            online=None if r["online"] is None else bool(r["online"]),
                            status_seq=int(r["status_seq"]),
                            incident_id=None if r["incident_id"] is None else str(r["incident_id"]),
                            last_seen_ms=int(r["last_seen_ms"]),
                            battery=None if r["battery"] is None else float(r["battery"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise SnapshotError(f"unit {unit_id}: bad or missing {exc}") from None
            if unit.state not in STATES:
                raise SnapshotError(f"unit {unit_id}: unknown state {unit.state!r}")
            if unit.info is not None and unit.info.kind in SENSOR_KINDS:
                continue
            fresh[unit_id] = unit
        try:
            next_incident = int(meta["next_incident"])
            geofences = GeofenceMonitor(self.registry.zones)
            geofences.restore_state(obj(meta.get("geofences", {}), "geofences"))
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"picture meta: bad or missing {exc}") from None
        self.incidents = restored
        self.units.update(fresh)
        self._dirty.update(("units", u) for u in fresh)
        self._next_incident = max(self._next_incident, next_incident)
        self.geofences = geofences

    # -- output ------------------------------------------------------------------------------

    def unit_views(self, now_ms: int) -> list[UnitView]:
        """Every dispatchable unit (a registered officer or vehicle with a position)."""
        out = []
        for unit in self.units.values():
            if unit.info is None or unit.info.kind not in UNIT_KINDS or not unit.track.started:
                continue
            est = unit.estimate(now_ms)
            state = unit.state if unit.online is not False else "unknown"
            out.append(UnitView(
                unit.id, unit.info.kind, est.lat, est.lon, state=state, capabilities=unit.info.capabilities,
                supervisor=unit.info.supervisor, speed_mps=est.speed_mps, heading_deg=est.heading_deg or 0.0,
                position_age_ms=max(0, est.age_ms),
            ))
        return out

    def take_changes(self, now_ms: int, *, build: bool = True) -> list[Delta]:
        """Deltas for the units and sensors messages changed since the last call (none
        built when nobody is watching: `build=False` just forgets them)."""
        dirty, self._dirty = self._dirty, set()
        if not build:
            return []
        out = []
        for layer, fid in sorted(dirty):
            if layer == "units" and fid in self.units:
                out.append(self._unit_delta(self.units[fid], now_ms))
            elif layer == "sensors" and fid in self.sensors:
                out.append(self._sensor_delta(self.sensors[fid]))
        return out

    def features(self, now_ms: int) -> list[Mapping[str, Any]]:
        """The whole picture as GeoJSON features (units, sensors, incidents)."""
        deltas = [self._unit_delta(u, now_ms) for u in self.units.values()]
        deltas += [self._sensor_delta(s) for s in self.sensors.values()]
        deltas += [self._incident_delta(i) for i in self.incidents.values()]
        return [d.feature for d in deltas if d.feature is not None]

    # -- units -------------------------------------------------------------------------------

    def _unit(self, unit_id: str) -> Unit:
        unit = self.units.get(unit_id)
        if unit is None:
            unit = self.units[unit_id] = Unit(self.registry.get(unit_id), unit_id, Track(unit_id))
        return unit

    def _fix(self, unit: Unit, ts_ms: int, body: Mapping[str, Any], update: Update) -> None:
        if body.get("fix") == "none":
            return
        try:
            unit.track.update(float(body["lat"]), float(body["lon"]), ts_ms, acc_m=_opt(body, "acc"),
                              speed=_opt(body, "speed"), heading=_opt(body, "heading"))
        except BadFix:
            self.bad_fixes += 1
            return
        for event in self.geofences.observe(unit.id, float(body["lat"]), float(body["lon"]), ts_ms):
            update.extend(self._geofence(event, ts_ms))

    def _status(self, unit: Unit, seq: int, body: Mapping[str, Any]) -> list[str]:
        """Apply a status; returns the incident it cleared, if the unit was the last one
        attending it."""
        if seq <= unit.status_seq:
            return []  # an older status arriving late
        unit.status_seq = seq
        held = unit.incident_id
        state = body.get("state")
        if state == "online":
            unit.online = True
            if unit.state == "unknown":
                unit.state = "available"
        elif state == "offline":
            unit.online = False
        elif state in STATES:
            unit.online = True
            unit.state = str(state)
            if state in ("available", "off_duty"):
                unit.incident_id = None  # cleared from its incident
        if isinstance(body.get("battery"), int | float):
            unit.battery = float(body["battery"])
        if held is None or unit.incident_id == held or held not in self.incidents:
            return []
        still = any(u.incident_id == held for u in self.units.values())
        return [] if still or self.incidents[held].status == "closed" else [held]

    def _unit_alarm(self, unit: Unit, seq: int, ts_ms: int, body: Mapping[str, Any], now_ms: int) -> Update:
        type_ = str(body["type"])
        if "lat" in body and "lon" in body:
            lat, lon = float(body["lat"]), float(body["lon"])
        elif unit.track.started:
            est = unit.track.estimate(ts_ms)
            lat, lon = est.lat, est.lon
        else:
            return Update()  # an alarm with no position at all: stored, shown nowhere
        source = f"{unit.id}:{seq}"
        if any(source in inc.sources for inc in self.incidents.values()):
            return Update()  # taken already (replayed from the store after a restart)
        merge_types = OFFICER_DOWN if type_ in OFFICER_DOWN else frozenset({type_})
        for inc in self.incidents.values():
            if (inc.status != "closed" and inc.subject == unit.id and inc.type in merge_types
                    and now_ms - inc.updated_ms <= self.config.merge_window_ms):
                inc.sources.append(source)
                inc.lat, inc.lon, inc.updated_ms = lat, lon, now_ms
                return Update([self._incident_delta(inc)])
        detail = dict(body.get("detail") or {})
        inc = self._open(type_, lat, lon, ts_ms, now_ms, subject=unit.id, detail=detail,
                         uncertainty_m=_opt(body, "acc"))
        inc.sources.append(source)
        return Update([self._incident_delta(inc)], [inc.id])

    # -- sensors -----------------------------------------------------------------------------

    def _is_sensor(self, device_id: str, body: Mapping[str, Any]) -> bool:
        info = self.registry.get(device_id)
        if info is not None:
            return info.kind in SENSOR_KINDS
        return device_id in self.sensors or body.get("type") in ("gunshot", "anpr_read")

    def _sensor_message(
        self, device_id: str, kind: str, ts_ms: int, body: Mapping[str, Any], now_ms: int
    ) -> Update:
        sensor = self.sensors.get(device_id)
        if sensor is None:
            if "lat" not in body or "lon" not in body:
                return Update()
            event_type = body.get("type")
            guess = "acoustic" if event_type == "gunshot" else "anpr" if event_type == "anpr_read" else "sensor"
            info = self.registry.get(device_id)
            sensor = self.sensors[device_id] = Sensor(
                device_id, info.kind if info is not None else guess, float(body["lat"]), float(body["lon"])
            )
        sensor.last_seen_ms = max(sensor.last_seen_ms, now_ms)
        update = Update()
        if kind == "event":
            event_type = body.get("type")
            detail = body.get("detail") or {}
            if event_type == "gunshot" and isinstance(detail.get("t_detect_ns"), int):
                update.extend(self._detection(sensor, int(detail["t_detect_ns"]), now_ms))
            elif event_type == "anpr_read" and isinstance(detail.get("plate"), str):
                update.extend(self._anpr(sensor, detail, ts_ms, now_ms))
            elif event_type == "tamper":
                sensor.tamper = True
        self._dirty.add(("sensors", sensor.id))
        return update

    def _detection(self, sensor: Sensor, t_ns: int, now_ms: int) -> Update:
        t_ms = t_ns // 1_000_000
        shot = next((s for s in self._shots if abs(t_ms - min(d.t_ns for d in s.detections.values()) // 1_000_000)
                     <= self.config.shot_spread_ms), None)
        if shot is None:
            shot = _Shot(now_ms)
            self._shots.append(shot)
        shot.detections[sensor.id] = Detection(sensor.id, sensor.lat, sensor.lon, t_ns)
        if len(shot.detections) < 3:
            return Update()
        try:
            fix = locate(list(shot.detections.values()))
        except MultilatError as exc:
            if shot.incident_id is None:
                return Update()
            self.incidents[shot.incident_id].detail["last_error"] = str(exc)
            return Update()
        detail = {"located": True, "sensors": list(fix.sensors), "residual_m": round(fix.residual_m, 2),
                  "t0_ns": fix.t0_ns}
        if shot.incident_id is not None and shot.incident_id in self.incidents:
            inc = self.incidents[shot.incident_id]
            inc.lat, inc.lon, inc.uncertainty_m, inc.updated_ms = fix.lat, fix.lon, fix.uncertainty_m, now_ms
            inc.detail.update(detail)
            return Update([self._incident_delta(inc)])
        near = self._mergeable("gunshot", fix.lat, fix.lon, now_ms)
        if near is not None:
            shot.incident_id = near.id
            near.updated_ms = now_ms
            near.detail["shots"] = int(near.detail.get("shots", 1)) + 1
            return Update([self._incident_delta(near)])
        inc = self._open("gunshot", fix.lat, fix.lon, fix.t0_ns // 1_000_000, now_ms,
                         uncertainty_m=fix.uncertainty_m, detail=detail)
        shot.incident_id = inc.id
        return Update([self._incident_delta(inc)], [inc.id])

    def _anpr(self, sensor: Sensor, detail: Mapping[str, Any], ts_ms: int, now_ms: int) -> Update:
        plate = str(detail["plate"])
        confidence = detail.get("confidence")
        hits = self.hotlist.match(plate, now_ms, confidence=float(confidence) if isinstance(confidence, int | float)
                                  else 1.0)
        if not hits:
            return Update()
        hit = hits[0]
        seen = detail.get("seen_ts")
        sighting = Sighting(hit.entry.plate, sensor.lat, sensor.lon, int(seen) if isinstance(seen, int) else ts_ms,
                            direction=str(detail["direction"]) if isinstance(detail.get("direction"), str) else None)
        self.sightings.add(sighting)
        prediction = self.sightings.predict(hit.entry.plate, now_ms + self.config.anpr_lookahead_ms)
        facts: dict[str, Any] = {
            "plate": hit.entry.plate, "read": hit.read, "reason": hit.entry.reason, "exact": hit.exact,
            "confidence": round(hit.confidence, 3), "markers": sorted(hit.entry.markers), "camera": sensor.id,
            "seen_lat": sensor.lat, "seen_lon": sensor.lon,
        }
        if prediction is not None:
            facts.update(predicted_lat=prediction.lat, predicted_lon=prediction.lon,
                         heading_deg=prediction.course_deg, predicted_radius_m=round(prediction.radius_m, 1),
                         predicted_ts=prediction.t_ms, speed_mps=round(prediction.speed_mps, 1))
        for inc in self.incidents.values():
            if inc.type == "anpr_hit" and inc.status != "closed" and inc.detail.get("plate") == hit.entry.plate:
                inc.lat, inc.lon, inc.updated_ms = sensor.lat, sensor.lon, now_ms
                inc.detail.update(facts)
                return Update([self._incident_delta(inc)])
        inc = self._open("anpr_hit", sensor.lat, sensor.lon, sighting.t_ms, now_ms, detail=facts)
        return Update([self._incident_delta(inc)], [inc.id])

    # -- geofences ---------------------------------------------------------------------------

    def _geofence(self, event: GeofenceEvent, now_ms: int) -> Update:
        if event.kind == "breach" and event.lat is not None and event.lon is not None:
            inc = self._open("geofence_breach", event.lat, event.lon, event.t_ms, now_ms, subject=event.unit_id,
                             detail={"zone": event.zone_id})
            return Update([self._incident_delta(inc)], [inc.id])
        if event.kind == "coverage_gap":
            zone = next(z for z in self.registry.zones if z.zone_id == event.zone_id)
            points = zone.polygon.points
            lat, lon = sum(p[0] for p in points) / len(points), sum(p[1] for p in points) / len(points)
            inc = self._open("coverage_gap", lat, lon, event.t_ms, now_ms,
                             detail={"zone": event.zone_id, "units_inside": event.units_inside,
                                     "min_units": event.min_units})
            return Update([self._incident_delta(inc)], [inc.id])
        if event.kind == "coverage_restored":
            for inc in self.incidents.values():
                if inc.type == "coverage_gap" and inc.status != "closed" and inc.detail.get("zone") == event.zone_id:
                    return self.close_incident(inc.id, now_ms)
        return Update()

    # -- incidents ---------------------------------------------------------------------------

    def _mergeable(self, type_: str, lat: float, lon: float, now_ms: int) -> Incident | None:
        for inc in self.incidents.values():
            if (inc.type == type_ and inc.status != "closed" and now_ms - inc.updated_ms <= self.config.merge_window_ms
                    and distance_m((lat, lon), (inc.lat, inc.lon)) <= self.config.merge_radius_m):
                return inc
        return None

    def _open(
        self, type_: str, lat: float, lon: float, t_ms: int, now_ms: int, *, subject: str | None = None,
        detail: Mapping[str, Any] | None = None, uncertainty_m: float | None = None,
    ) -> Incident:
        inc = Incident(f"{self._prefix}-{self._next_incident}", type_, lat, lon, t_ms, now_ms, subject=subject,
                       uncertainty_m=uncertainty_m, detail=dict(detail or {}), updated_ms=now_ms)
        self._next_incident += 1
        self.incidents[inc.id] = inc
        return inc

    # -- features ----------------------------------------------------------------------------

    def _unit_delta(self, unit: Unit, now_ms: int) -> Delta:
        props: dict[str, Any] = {
            "kind": unit.kind, "callsign": unit.info.callsign if unit.info else "", "state": unit.state,
            "online": unit.online, "incident_id": unit.incident_id, "last_seen": unit.last_seen_ms,
            "battery": unit.battery,
        }
        if unit.info is not None:
            props["capabilities"] = sorted(unit.info.capabilities)
            props["supervisor"] = unit.info.supervisor
        lat = lon = None
        if unit.track.started:
            est = unit.estimate(now_ms)
            lat, lon = est.lat, est.lon
            props.update(speed=round(est.speed_mps, 1), heading=None if est.heading_deg is None
                         else round(est.heading_deg), sigma_m=round(est.sigma_m, 1), stale=est.stale)
        return Delta("units", unit.id, "upsert", feature("unit", unit.id, lat, lon, props))

    def _sensor_delta(self, sensor: Sensor) -> Delta:
        props = {"kind": sensor.kind, "last_seen": sensor.last_seen_ms, "tamper": sensor.tamper}
        return Delta("sensors", sensor.id, "upsert", feature("sensor", sensor.id, sensor.lat, sensor.lon, props))

    def _incident_delta(self, inc: Incident) -> Delta:
        props = {
            "type": inc.type, "status": inc.status, "t_ms": inc.t_ms, "opened_ms": inc.opened_ms,
            "subject": inc.subject, "uncertainty_m": None if inc.uncertainty_m is None else round(inc.uncertainty_m, 1),
            "detail": inc.detail, "sources": len(inc.sources), "by": inc.by,
        }
        return Delta("incidents", inc.id, "upsert", feature("incident", inc.id, inc.lat, inc.lon, props))


def _opt(body: Mapping[str, Any], key: str) -> float | None:
    value = body.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

