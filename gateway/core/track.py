"""A unit's track, filtered from its noisy GNSS fixes (pure: times are passed in, UTC ms).

    track = Track("van-17")
    track.update(lat, lon, t_ms, acc_m=body.get("acc"), speed=body.get("speed"), heading=body.get("heading"))
    track.estimate(now_ms)        # TrackEstimate(lat, lon, speed_mps, heading_deg, sigma_m, age_ms, stale)

The filter is a constant-velocity Kalman filter in a local tangent plane (metres east and
north of the track's first fix), state [x, y, vx, vy], augmented with the GNSS receiver's
own slowly varying position error [bx, by]:

- Motion: white acceleration with spectral density `accel_psd` (default
  `DEFAULT_ACCEL_PSD` = 1.0 m^2/s^3, i.e. about 1 m/s of unmodelled velocity change
  per second: a car turning at a junction, an officer stopping or breaking into a run).
- GNSS position error: urban GNSS error is not white. Multipath and atmosphere make it
  a first-order Gauss-Markov process with a correlation time of tens of seconds
  (`GNSS_ERROR_CORRELATION_S`, 20 s, what the project's simulator models too), with a
  stationary 1-sigma per axis of `acc / R68_PER_SIGMA`: `acc` is the data model's 68%
  horizontal radius (`DEFAULT_ACC_M` when absent). A filter that treated that error as
  white would average it away on paper only, grow overconfident and then gate good
  fixes. Modelling it as a state keeps the covariance honest: a fix alone cannot tell
  the error from the position, so a track from fixes only is about as accurate as one
  fix (less the multipath it gates) and smoother.
- Velocity: when a fix carries `speed` (and `heading`), they are a second measurement
  (GNSS Doppler velocity, `SPEED_SIGMA_MPS` per axis). Doppler velocity is nearly free of
  the correlated position error, so integrated velocity tells how the unit moved
  between fixes, and the filter can then average the position error over many fixes:
  this is what makes the track clearly better than the raw fixes.

The two horizontal axes are independent in this model (isotropic noise), so the filter
runs as two 3-state filters [p, v, b] in plain floats: ~8 us an update with speed and
heading, against ~100 us for the same step as one 6x6 filter in numpy (numpy's per-call
overhead dominates at this size; Python 3.11, 2-core EPYC), so 2,000 units at 1 Hz cost
under 2% of a core.

Outliers: a fix whose innovation fails the chi-square gate (`GATE_CHI2`, 2 dof, 99.9%)
is not used (a multipath jump of 15-60 m does not drag the track); its velocity still
is. A jump moves the fixes sideways but they go on moving with the unit; a turn the
filter missed (no reported velocity) makes them move differently: when two or more
consecutive gated fixes move, between them, at a velocity that differs from the track's
by more than `MANOEUVRE_MPS` (and 3 sigma), the track restarts from them. After
`REINIT_AFTER_GATED` consecutive gated fixes spanning at least `REINIT_AFTER_MS`, the
track re-initialises at the latest fix, so it is never stuck on a wrong position (a
multipath reflection lasts seconds, not tens of seconds). A fix older than (or as old
as) the last one used is ignored and counted in `late`.

`StreetMap` snaps an estimate onto the street network (map matching by projection onto
the nearest street segment that agrees with the heading): for vehicles on the road
network, and in the simulator for everyone, since simulated officers walk the street
centre lines.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from edge_agent.wire.geo import LatLon, displacement_m, offset

#: The 68% radius of a circular 2-D Gaussian is this many times its per-axis sigma.
R68_PER_SIGMA = math.sqrt(-2.0 * math.log(0.32))
#: `acc` (68% radius, metres) assumed for a fix that does not report one.
DEFAULT_ACC_M = 10.0
#: Smallest `acc` believed (receivers report optimistic values in open sky).
MIN_ACC_M = 1.0
#: White-acceleration spectral density of the motion model, m^2/s^3.
DEFAULT_ACCEL_PSD = 1.0
#: Correlation time of the GNSS position error (first-order Gauss-Markov), seconds.
GNSS_ERROR_CORRELATION_S = 20.0
#: The white (uncorrelated) part of a fix's error, as a fraction of its per-axis sigma.
WHITE_FRACTION = 0.25
#: 1-sigma per axis of a reported Doppler velocity (speed + heading), m/s.
SPEED_SIGMA_MPS = 0.3
#: Below this reported speed without a heading the unit is taken as standing still.
STILL_SPEED_MPS = 0.5
#: Prior 1-sigma of the velocity of a new track without a reported speed, m/s.
UNKNOWN_VELOCITY_SIGMA_MPS = 10.0
#: Chi-square gate on the 2-D position innovation (2 dof, 99.9%).
GATE_CHI2 = 13.82
#: Consecutive gated fixes whose own motion differs from the track's velocity by more
#: than this (and by 3 sigma) are a manoeuvre the track missed: it restarts from them.
MANOEUVRE_MPS = 2.0
#: The gated run must span this long, and move no faster than `MAX_SPEED_MPS`.
MIN_MANOEUVRE_SPAN_MS = 1_000
MAX_SPEED_MPS = 70.0
#: Re-initialise after this many consecutive gated fixes ...
REINIT_AFTER_GATED = 5
#: ... that span at least this long (multipath reflections last seconds).
REINIT_AFTER_MS = 20_000
#: A track without an accepted fix for longer than this is stale.
STALE_AFTER_MS = 30_000
#: An estimate is dead-reckoned at most this far past the last fix; then it holds still
#: (its uncertainty keeps growing).
MAX_EXTRAPOLATE_MS = STALE_AFTER_MS


class FusionError(ValueError):
    """Input the fusion core cannot use. Subclasses say which and carry the facts."""


class BadFix(FusionError):
    """A fix with impossible values (lat 91, NaN, negative accuracy, ...)."""

    def __init__(self, unit_id: str, detail: str) -> None:
        super().__init__(f"{unit_id}: {detail}")
        self.unit_id = unit_id
        self.detail = detail


@dataclass(frozen=True, slots=True)
class TrackEstimate:
    """Where a unit is estimated to be at some time: `sigma_m` is the 68% horizontal
    radius (like `acc`), `age_ms` the time since the last accepted fix, `heading_deg`
    None while the unit is (nearly) still."""

    lat: float
    lon: float
    speed_mps: float
    heading_deg: float | None
    sigma_m: float
    age_ms: int
    stale: bool

    def __post_init__(self) -> None:
        if not (-90.0 <= self.lat <= 90.0 and -180.0 <= self.lon <= 180.0):
            raise ValueError(f"({self.lat}, {self.lon}) is not a WGS84 lat/lon")
        if not (self.speed_mps >= 0.0 and self.sigma_m >= 0.0 and self.age_ms >= 0):
            raise ValueError("speed, sigma and age must be >= 0")

    @property
    def position(self) -> LatLon:
        return self.lat, self.lon


@dataclass(frozen=True, slots=True)
class TrackCounts:
    """What a track did with its fixes."""

    accepted: int
    gated: int
    late: int
    reinitialised: int


class _Axis:
    """One horizontal axis: state [p, v, b] and its symmetric 3x3 covariance."""

    __slots__ = ("b", "p", "pbb", "ppb", "ppp", "ppv", "pvb", "pvv", "v")

    def __init__(self, p: float, v: float, var_b: float, var_w: float, var_v: float) -> None:
        # z = p + b + w with b ~ N(0, var_b): the position is z less an unknown error
        self.p, self.v, self.b = p, v, 0.0
        self.ppp, self.ppv, self.ppb = var_b + var_w, 0.0, -var_b
        self.pvv, self.pvb, self.pbb = var_v, 0.0, var_b

    def predict(self, dt: float, q: float, a: float, var_b: float) -> None:
        ppv, pvv = self.ppv, self.pvv
        self.p += self.v * dt
        self.b *= a
        self.ppp += 2.0 * dt * ppv + dt * dt * pvv + q * dt * dt * dt / 3.0
        self.ppv = ppv + dt * pvv + q * dt * dt / 2.0
        self.pvv = pvv + q * dt
        self.ppb = a * (self.ppb + dt * self.pvb)
        self.pvb *= a
        self.pbb = a * a * self.pbb + var_b * (1.0 - a * a)

    def innovation(self, z: float, var_w: float) -> tuple[float, float]:
        """(z - predicted z, its variance) for a position measurement."""
        return z - self.p - self.b, self.ppp + 2.0 * self.ppb + self.pbb + var_w

    def update_position(self, y: float, s: float) -> None:
        hp, hv, hb = self.ppp + self.ppb, self.ppv + self.pvb, self.ppb + self.pbb
        self._apply(y, s, hp, hv, hb)

    def update_velocity(self, z: float, var: float) -> None:
        self._apply(z - self.v, self.pvv + var, self.ppv, self.pvv, self.pvb)

    def _apply(self, y: float, s: float, hp: float, hv: float, hb: float) -> None:
        kp, kv, kb = hp / s, hv / s, hb / s
        self.p += kp * y
        self.v += kv * y
        self.b += kb * y
        self.ppp -= kp * hp
        self.ppv -= kp * hv
        self.ppb -= kp * hb
        self.pvv -= kv * hv
        self.pvb -= kv * hb
        self.pbb -= kb * hb


def _check(unit_id: str, lat: float, lon: float, *, acc_m: float | None, speed: float | None,
           heading: float | None) -> None:
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        raise BadFix(unit_id, f"({lat}, {lon}) is not a WGS84 lat/lon")
    if acc_m is not None and not (acc_m >= 0.0 and math.isfinite(acc_m)):
        raise BadFix(unit_id, f"acc {acc_m} must be a finite number >= 0")
    if speed is not None and not (speed >= 0.0 and math.isfinite(speed)):
        raise BadFix(unit_id, f"speed {speed} must be a finite number >= 0")
    if heading is not None and not math.isfinite(heading):
        raise BadFix(unit_id, f"heading {heading} must be finite")


class Track:
    """One unit's filtered track. Feed fixes in time order with `update`; ask for the
    position at any later time with `estimate`."""

    __slots__ = (
        "_gated_first", "_gated_run", "_gated_since", "_last_ms", "_origin", "_x", "_y",
        "accel_psd", "accepted", "gated", "late", "reinitialised", "unit_id",
    )

    def __init__(self, unit_id: str, *, accel_psd: float = DEFAULT_ACCEL_PSD) -> None:
        if not unit_id:
            raise ValueError("a track needs a unit id")
        if not accel_psd > 0.0:
            raise ValueError(f"accel_psd must be > 0 m^2/s^3, got {accel_psd}")
        self.unit_id = unit_id
        self.accel_psd = accel_psd
        self._origin: LatLon | None = None
        self._x: _Axis | None = None  # east
        self._y: _Axis | None = None  # north
        self._last_ms = 0
        self._gated_run = 0
        self._gated_since = 0
        self._gated_first = (0.0, 0.0)  # (east, north) of the first fix of the gated run
        self.accepted = self.gated = self.late = self.reinitialised = 0

    @property
    def started(self) -> bool:
        return self._origin is not None

    @property
    def last_fix_ms(self) -> int | None:
        """UTC ms of the last fix the filter used (None before the first)."""
        return self._last_ms if self._origin is not None else None

    @property
    def counts(self) -> TrackCounts:
        return TrackCounts(self.accepted, self.gated, self.late, self.reinitialised)

    def update(
        self,
        lat: float,
        lon: float,
        t_ms: int,
        *,
        acc_m: float | None = None,
        speed: float | None = None,
        heading: float | None = None,
    ) -> bool:
        """Use one fix. Returns True if its position was accepted, False if it was gated
        or late (older than the last fix used). Raises `BadFix` on impossible values."""
        _check(self.unit_id, lat, lon, acc_m=acc_m, speed=speed, heading=heading)
        sigma = max(MIN_ACC_M, DEFAULT_ACC_M if acc_m is None else acc_m) / R68_PER_SIGMA
        var_b = sigma * sigma
        var_w = (WHITE_FRACTION * sigma) ** 2
        velocity = _velocity(speed, heading)
        if self._origin is None or self._x is None or self._y is None:
            self._start(lat, lon, t_ms, var_b=var_b, var_w=var_w, velocity=velocity)
            return True
        if t_ms <= self._last_ms:
            self.late += 1
            return False
        x, y = self._x, self._y
        dt = (t_ms - self._last_ms) / 1000.0
        a = math.exp(-dt / GNSS_ERROR_CORRELATION_S)
        q = self.accel_psd
        x.predict(dt, q, a, var_b)
        y.predict(dt, q, a, var_b)
        self._last_ms = t_ms
        if velocity is not None:
            (ve, vn), var_v = velocity
            x.update_velocity(ve, var_v)
            y.update_velocity(vn, var_v)
        north, east = displacement_m(self._origin, (lat, lon))
        ix, sx = x.innovation(east, var_w)
        iy, sy = y.innovation(north, var_w)
        if ix * ix / sx + iy * iy / sy > GATE_CHI2:
            self.gated += 1
            if self._gated_run == 0:
                self._gated_since = t_ms
                self._gated_first = (east, north)
            self._gated_run += 1
            restart = self._gated_run >= REINIT_AFTER_GATED and t_ms - self._gated_since >= REINIT_AFTER_MS
            if not restart and self._gated_run >= 2 and velocity is None:
                manoeuvre = self._manoeuvre(east, north, t_ms, var_b)
                if manoeuvre is not None:
                    velocity, restart = manoeuvre, True
            if restart:
                self.reinitialised += 1
                self._start(lat, lon, t_ms, var_b=var_b, var_w=var_w, velocity=velocity)
                return True
            return False
        x.update_position(ix, sx)
        y.update_position(iy, sy)
        self._gated_run = 0
        self.accepted += 1
        return True

    def _manoeuvre(self, east: float, north: float, t_ms: int,
                   var_b: float) -> tuple[tuple[float, float], float] | None:
        """The velocity of the gated run (first to this fix), if it is not the track's."""
        assert self._x is not None
        assert self._y is not None
        if t_ms - self._gated_since < MIN_MANOEUVRE_SPAN_MS:
            return None
        span = (t_ms - self._gated_since) / 1000.0
        ve, vn = (east - self._gated_first[0]) / span, (north - self._gated_first[1]) / span
        if math.hypot(ve, vn) > MAX_SPEED_MPS:
            return None
        # the correlated error mostly cancels in a difference over a short span
        a = math.exp(-span / GNSS_ERROR_CORRELATION_S)
        var_c = 2.0 * var_b * (1.0 - a) / (span * span) + 2.0 * (WHITE_FRACTION**2) * var_b / (span * span)
        de, dn = ve - self._x.v, vn - self._y.v
        dv2 = de * de + dn * dn
        if dv2 > MANOEUVRE_MPS**2 and dv2 > 9.0 * var_c:
            return (ve, vn), var_c
        return None

    def _start(self, lat: float, lon: float, t_ms: int, *, var_b: float, var_w: float,
               velocity: tuple[tuple[float, float], float] | None) -> None:
        self._origin = (lat, lon)
        if velocity is None:
            (ve, vn), var_v = (0.0, 0.0), UNKNOWN_VELOCITY_SIGMA_MPS**2
        else:
            (ve, vn), var_v = velocity
        self._x = _Axis(0.0, ve, var_b, var_w, var_v)
        self._y = _Axis(0.0, vn, var_b, var_w, var_v)
        self._last_ms = t_ms
        self._gated_run = 0
        self.accepted += 1

    def estimate(self, t_ms: int) -> TrackEstimate:
        """The track predicted to `t_ms` (not before the last fix: an earlier time gets the
        estimate at the last fix). Raises `LookupError` before the first fix."""
        if self._origin is None or self._x is None or self._y is None:
            raise LookupError(f"{self.unit_id}: no fix yet")
        x, y = self._x, self._y
        age = max(0, t_ms - self._last_ms)
        dt = age / 1000.0
        moving = min(age, MAX_EXTRAPOLATE_MS) / 1000.0
        east, north = x.p + x.v * moving, y.p + y.v * moving
        q = self.accel_psd
        var = (
            x.ppp + y.ppp + 2.0 * dt * (x.ppv + y.ppv) + dt * dt * (x.pvv + y.pvv) + 2.0 * q * dt**3 / 3.0
        ) / 2.0
        lat, lon = offset(self._origin, north, east)
        speed = math.hypot(x.v, y.v)
        heading = math.degrees(math.atan2(x.v, y.v)) % 360.0 if speed >= STILL_SPEED_MPS else None
        return TrackEstimate(
            lat, lon, speed, heading, R68_PER_SIGMA * math.sqrt(max(0.0, var)), age, age > STALE_AFTER_MS
        )


def _velocity(speed: float | None, heading: float | None) -> tuple[tuple[float, float], float] | None:
    """((east, north) m/s, variance per axis) from a fix's speed and heading, if usable."""
    if speed is None:
        return None
    if heading is None:
        if speed >= STILL_SPEED_MPS:
            return None  # moving, direction unknown: the speed alone is not used
        return (0.0, 0.0), max(SPEED_SIGMA_MPS, speed) ** 2
    h = math.radians(heading)
    return (speed * math.sin(h), speed * math.cos(h)), SPEED_SIGMA_MPS**2


@dataclass(frozen=True, slots=True)
class Snap:
    """A point snapped onto a street: where, how far it moved, and the street's bearing."""

    lat: float
    lon: float
    moved_m: float
    street_bearing_deg: float


#: Map cells for the street index, metres.
_CELL_M = 50.0


class StreetMap:
    """Street segments in a local plane with a grid index, for map matching. Built from
    polylines of (lat, lon), e.g. the LineStrings of the city's GeoJSON."""

    __slots__ = ("_cells", "_origin", "_segments")

    def __init__(self, polylines: Iterable[Sequence[LatLon]]) -> None:
        lines = [list(line) for line in polylines if len(line) >= 2]
        if not lines:
            raise FusionError("a street map needs at least one polyline of 2+ points")
        points = [p for line in lines for p in line]
        self._origin: LatLon = (
            sum(p[0] for p in points) / len(points), sum(p[1] for p in points) / len(points)
        )
        self._segments: list[tuple[float, float, float, float]] = []  # (e0, n0, e1, n1)
        self._cells: dict[tuple[int, int], list[int]] = {}
        for line in lines:
            local = [self._local(p) for p in line]
            for (e0, n0), (e1, n1) in itertools.pairwise(local):
                if (e0, n0) == (e1, n1):
                    continue
                index = len(self._segments)
                self._segments.append((e0, n0, e1, n1))
                length = math.hypot(e1 - e0, n1 - n0)
                steps = max(1, math.ceil(length / (_CELL_M / 2)))
                cells = {
                    (math.floor((e0 + (e1 - e0) * k / steps) / _CELL_M),
                     math.floor((n0 + (n1 - n0) * k / steps) / _CELL_M))
                    for k in range(steps + 1)
                }
                for cell in cells:
                    self._cells.setdefault(cell, []).append(index)

    def _local(self, p: LatLon) -> tuple[float, float]:
        north, east = displacement_m(self._origin, p)
        return east, north

    def snap(self, lat: float, lon: float, *, heading_deg: float | None = None, max_m: float = 40.0) -> Snap | None:
        """The nearest point on a street within `max_m` (None if there is none). With a
        heading, a street across the direction of travel costs as if it were 15 m
        further away for each unit of sin(angle), so at a junction the track stays on the
        street it is driving along."""
        e, n = self._local((lat, lon))
        ce, cn = math.floor(e / _CELL_M), math.floor(n / _CELL_M)
        reach = math.ceil(max_m / _CELL_M)
        seen: set[int] = set()
        best: tuple[float, float, float, float, float] | None = None  # cost, e, n, dist, bearing
        h = math.radians(heading_deg) if heading_deg is not None else None
        for de in range(-reach, reach + 1):
            for dn in range(-reach, reach + 1):
                for index in self._cells.get((ce + de, cn + dn), ()):
                    if index in seen:
                        continue
                    seen.add(index)
                    e0, n0, e1, n1 = self._segments[index]
                    se, sn = e1 - e0, n1 - n0
                    length2 = se * se + sn * sn
                    t = max(0.0, min(1.0, ((e - e0) * se + (n - n0) * sn) / length2))
                    pe, pn = e0 + t * se, n0 + t * sn
                    dist = math.hypot(e - pe, n - pn)
                    if dist > max_m:
                        continue
                    bearing = math.atan2(se, sn)
                    cost = dist
                    if h is not None:
                        cost += 15.0 * abs(math.sin(h - bearing))
                    if best is None or cost < best[0]:
                        best = (cost, pe, pn, dist, bearing)
        if best is None:
            return None
        _, pe, pn, dist, bearing = best
        slat, slon = offset(self._origin, pn, pe)
        return Snap(slat, slon, dist, math.degrees(bearing) % 360.0)

    def snap_estimate(self, estimate: TrackEstimate, *, max_m: float = 40.0) -> TrackEstimate:
        """`estimate` moved onto the nearest street that agrees with its heading (unchanged
        if no street is within `max_m`)."""
        snapped = self.snap(estimate.lat, estimate.lon, heading_deg=estimate.heading_deg, max_m=max_m)
        if snapped is None:
            return estimate
        return replace(estimate, lat=snapped.lat, lon=snapped.lon)


__all__ = [
    "DEFAULT_ACC_M",
    "DEFAULT_ACCEL_PSD",
    "GATE_CHI2",
    "GNSS_ERROR_CORRELATION_S",
    "MAX_EXTRAPOLATE_MS",
    "R68_PER_SIGMA",
    "REINIT_AFTER_GATED",
    "REINIT_AFTER_MS",
    "STALE_AFTER_MS",
    "BadFix",
    "FusionError",
    "Snap",
    "StreetMap",
    "Track",
    "TrackCounts",
    "TrackEstimate",
]
