"""A GNSS receiver in a city: NMEA 0183 GGA + RMC lines once per epoch (1 Hz).

    gnss = GnssReceiver(route, 8.0, seed=1, truth=truth, device="veh-1", tunnels=city.tunnels)
    gps = NmeaGps(gnss.sentences)          # the agent's real NMEA driver parses them

Error model (all seeded, all recorded in the truth log):
- Urban noise: a first-order Gauss-Markov error per axis (north, east; correlation
  `correlation_s`, default 20 s) scaled by a slowly varying "urban canyon" factor
  (log-normal, about 0.6x-1.6x, correlation 60 s). `urban_sigma_m` is the typical
  68% horizontal radius, i.e. what `acc` means in the data model; per axis the sigma is
  that / 1.51. The receiver reports HDOP = current 68% radius / UERE (5 m), so
  `acc = HDOP x UERE` from the NMEA driver is honest about the noise, and satellites
  drop as the canyon deepens.
- Multipath: with probability `multipath_prob` per second a reflection offsets the fix
  by 15-60 m in a random direction for 3-15 s. HDOP does not show it (as in reality).
- Tunnels: under cover (`Tunnel.contains`) there is no fix (GGA quality 0, RMC V, empty
  position); after the exit the receiver needs 2-6 s to fix again.
- Faults: `jump(offset_m, duration_s)` (a GPS jump), `lose_fix(duration_s)` (jamming:
  sentences without a fix), `drop_out(duration_s)` (no sentences at all: the serial
  link or the receiver is dead).
- Speed: true speed + 0.15 m/s noise; course: true course + noise that grows as speed
  falls (empty when standing still). Altitude: `alt_m` above mean sea level + vertical
  error (1.5x horizontal), geoid separation `geoid_sep_m`.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from edge_agent.drivers import Clock
from edge_agent.drivers.gps import Route
from edge_agent.drivers.nmea import DEFAULT_UERE_M, KNOT_MPS, sentence
from edge_agent.wire.geo import LatLon, displacement_m, offset
from firmware_sim.city import Tunnel
from firmware_sim.models.base import Model
from firmware_sim.models.motion import MotionState, Trajectory
from firmware_sim.truth import TruthLog

#: The 68% radius of a circular 2-D Gaussian is this many times its per-axis sigma.
R68_PER_SIGMA = math.sqrt(-2.0 * math.log(0.32))
#: If the loop falls this many epochs behind its clock, it skips to the present.
MAX_BEHIND_EPOCHS = 5


def _dm(value: float, degree_digits: int) -> str:
    """Degrees as NMEA (d)ddmm.mmmmmm."""
    value = abs(value)
    degrees = int(value)
    minutes = round((value - degrees) * 60.0, 6)
    if minutes >= 60.0:
        degrees, minutes = degrees + 1, 0.0
    if degree_digits == 2:
        return f"{degrees:02d}{minutes:09.6f}"
    return f"{degrees:03d}{minutes:09.6f}"


@functools.lru_cache(maxsize=64)
def _ddmmyy(day: int) -> str:
    """The RMC date field of a UTC day (days since the epoch)."""
    return (dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(days=day)).strftime("%d%m%y")


def _hms(t_ms: int) -> str:
    ms = t_ms % 86_400_000
    return f"{ms // 3_600_000:02d}{ms // 60_000 % 60:02d}{ms // 1000 % 60:02d}.{ms % 1000 // 10:02d}"


@dataclass(frozen=True)
class NmeaFix:
    """What the receiver reports for one epoch (None position: no fix)."""

    t_ms: int
    lat: float | None
    lon: float | None
    alt_msl: float | None = None
    geoid_sep: float = 45.9
    hdop: float | None = None
    sats: int = 0
    speed_mps: float | None = None
    course: float | None = None


def _position_fields(fix: NmeaFix) -> list[str]:
    """lat, N/S, lon, E/W (empty without a fix)."""
    lat, lon = fix.lat, fix.lon
    if lat is None or lon is None:
        return ["", "", "", ""]
    return [_dm(lat, 2), "N" if lat >= 0 else "S", _dm(lon, 3), "E" if lon >= 0 else "W"]


def format_gga(fix: NmeaFix, talker: str = "GN") -> str:
    """A GGA sentence (quality 1 with a position, 0 without)."""
    return _gga(fix, talker, _hms(fix.t_ms), _position_fields(fix))


def _gga(fix: NmeaFix, talker: str, hms: str, position: list[str]) -> str:
    has = fix.lat is not None and fix.lon is not None
    fields = [f"{talker}GGA", hms, *position, "1" if has else "0",
              f"{fix.sats:02d}", f"{fix.hdop:.2f}" if fix.hdop is not None and has else ""]
    if has and fix.alt_msl is not None:
        fields += [f"{fix.alt_msl:.1f}", "M", f"{fix.geoid_sep:.1f}", "M", "", ""]
    else:
        fields += ["", "M", "", "M", "", ""]
    return sentence(",".join(fields))


def format_rmc(fix: NmeaFix, talker: str = "GN") -> str:
    """An RMC sentence (status A with a position, V without; NMEA 2.3 mode A/N)."""
    return _rmc(fix, talker, _hms(fix.t_ms), _position_fields(fix))


def _rmc(fix: NmeaFix, talker: str, hms: str, position: list[str]) -> str:
    has = fix.lat is not None and fix.lon is not None
    date = _ddmmyy(fix.t_ms // 86_400_000)
    if has:
        fields = [f"{talker}RMC", hms, "A", *position,
                  f"{fix.speed_mps / KNOT_MPS:.3f}" if fix.speed_mps is not None else "",
                  f"{fix.course:.2f}" if fix.course is not None else "",
                  date, "", "", "A"]
    else:
        fields = [f"{talker}RMC", hms, "V", "", "", "", "", "", "", date, "", "", "N"]
    return sentence(",".join(fields))


def _gm(previous: float, a: float, rng_gauss: float) -> float:
    """One step of a unit-variance Gauss-Markov process with coefficient `a`."""
    return a * previous + math.sqrt(1.0 - a * a) * rng_gauss


class GnssReceiver(Model):
    """A receiver carried along `route` (a loop, or a `Trajectory` for units that change
    course) at `speed_mps`. `epoch(t_ms)` is the pure step; `sentences(clock)` the loop."""

    name = "gnss"

    def __init__(
        self,
        route: Route | Sequence[LatLon] | Trajectory,
        speed_mps: float = 8.0,
        seed: int | None = None,
        truth: TruthLog | None = None,
        *,
        device: str = "",
        urban_sigma_m: float = 7.0,
        multipath_prob: float = 0.005,
        tunnels: Sequence[Tunnel] = (),
        correlation_s: float = 20.0,
        rate_hz: float = 1.0,
        alt_m: float = 15.0,
        geoid_sep_m: float = 45.9,
        talker: str = "GN",
        corrupt_rate: float = 0.0,
    ) -> None:
        super().__init__(seed=seed, truth=truth, device=device)
        if urban_sigma_m < 0 or not 0 <= multipath_prob <= 1 or correlation_s <= 0 or rate_hz <= 0:
            raise ValueError("need urban_sigma_m >= 0, multipath_prob in [0, 1], correlation_s > 0, rate_hz > 0")
        if not 0 <= corrupt_rate <= 1:
            raise ValueError("corrupt_rate must be in [0, 1]")
        self.trajectory = route if isinstance(route, Trajectory) else Trajectory(route, speed_mps)
        self.urban_sigma_m = urban_sigma_m
        self.multipath_prob = multipath_prob
        self.tunnels = tuple(tunnels)
        self.correlation_s = correlation_s
        self.period_ms = max(1, round(1000 / rate_hz))
        #: Epochs fall at `phase_ms` past each whole period of UTC (0: on the second, as
        #: most receivers do). A fleet gives each device its own phase, so that thousands
        #: of devices do not all report in the same millisecond.
        self.phase_ms = 0
        self.alt_m = alt_m
        self.geoid_sep_m = geoid_sep_m
        self.talker = talker
        self.corrupt_rate = corrupt_rate
        self._last_ms: int | None = None
        self._unit = (self.rng.gauss(0, 1), self.rng.gauss(0, 1), self.rng.gauss(0, 1))
        self._canyon = self.rng.gauss(0, 1)
        self._multipath: tuple[int, float, float] | None = None  # (until, north, east)
        self._jumps: list[tuple[int, int, float, float]] = []  # (from, until, north, east)
        self._outages: list[tuple[int, int]] = []
        self._covered = False
        self._no_fix_until = 0
        self.epochs = 0
        self.last_report: NmeaFix | None = None

    # -- faults and queries -------------------------------------------------------------

    def jump(
        self, offset_m: float, duration_s: float = 30.0, *, bearing_deg: float | None = None, at_ms: int | None = None
    ) -> None:
        """Offset reported fixes by `offset_m` (towards `bearing_deg`, default random) for
        `duration_s` from `at_ms` (default now): the GPS-jump fault."""
        start = self._now(at_ms)
        bearing = self.rng.uniform(0, 360) if bearing_deg is None else bearing_deg
        north = offset_m * math.cos(math.radians(bearing))
        east = offset_m * math.sin(math.radians(bearing))
        self._jumps.append((start, start + round(duration_s * 1000), north, east))
        self._record(start, "gnss_jump", offset_m=offset_m, bearing_deg=round(bearing, 1), duration_s=duration_s)

    def lose_fix(self, duration_s: float, at_ms: int | None = None) -> None:
        """No fix (sentences keep coming, empty) for `duration_s` from `at_ms` (default now)."""
        if duration_s <= 0:
            raise ValueError("duration must be > 0")
        start = self._now(at_ms)
        self._outages.append((start, start + round(duration_s * 1000)))
        self._record(start, "gnss_lost", duration_s=duration_s)

    def true_state(self, t_ms: int) -> MotionState:
        """Where the receiver really is at `t_ms`."""
        self.trajectory.start(t_ms)
        return self.trajectory.state(t_ms)

    def true_speed(self, t_ms: int) -> float:
        return self.true_state(t_ms).speed

    def in_tunnel(self, point: LatLon) -> bool:
        return any(t.contains(point) for t in self.tunnels)

    # -- the pure step ----------------------------------------------------------------

    def epoch(self, t_ms: int) -> list[str]:
        """Advance the error model to `t_ms` and return this epoch's sentences (none in a
        dropout). Call with increasing times; the same calls give the same lines."""
        rng = self.rng
        if self.start_ms is None:
            self.start_ms = t_ms
        dt_s = 0.0 if self._last_ms is None else max(0.0, (t_ms - self._last_ms) / 1000.0)
        self._last_ms = t_ms
        self.epochs += 1
        true = self.true_state(t_ms)

        a = math.exp(-dt_s / self.correlation_s)
        self._unit = (
            _gm(self._unit[0], a, rng.gauss(0, 1)),
            _gm(self._unit[1], a, rng.gauss(0, 1)),
            _gm(self._unit[2], a, rng.gauss(0, 1)),
        )
        self._canyon = _gm(self._canyon, math.exp(-dt_s / 60.0), rng.gauss(0, 1))
        factor = math.exp(0.25 * self._canyon - 0.25**2 / 2)  # mean 1
        r68 = self.urban_sigma_m * factor
        sigma = r68 / R68_PER_SIGMA

        # multipath: start with probability per second, hold for its duration
        if self._multipath is not None and t_ms >= self._multipath[0]:
            self._multipath = None
        p_start = 1.0 - (1.0 - self.multipath_prob) ** dt_s
        start_draw, size = rng.random(), rng.uniform(15, 60)
        bearing, hold = rng.uniform(0, 2 * math.pi), rng.uniform(3, 15)
        if self._multipath is None and start_draw < p_start:
            self._multipath = (t_ms + round(hold * 1000), size * math.cos(bearing), size * math.sin(bearing))
            self._record(t_ms, "multipath", offset_m=round(size, 1), duration_s=round(hold, 1))

        covered = self.in_tunnel(true.position)
        reacquire = rng.uniform(2, 6)
        if self._covered and not covered:
            self._no_fix_until = t_ms + round(reacquire * 1000)
        self._covered = covered
        jammed = any(s <= t_ms < e for s, e in self._outages)
        has_fix = not covered and not jammed and t_ms >= self._no_fix_until

        north = self._unit[0] * sigma
        east = self._unit[1] * sigma
        multipath = self._multipath is not None
        if self._multipath is not None:
            north += self._multipath[1]
            east += self._multipath[2]
        jumped = False
        for s, e, jn, je in self._jumps:
            if s <= t_ms < e:
                north, east, jumped = north + jn, east + je, True
        lat, lon = offset(true.position, north, east)

        speed_noise, course_noise = rng.gauss(0, 0.15), rng.gauss(0, 1)
        sats = max(4, min(20, round(15 - 4 * factor + rng.gauss(0, 0.7))))
        if has_fix:
            speed = max(0.0, true.speed + speed_noise) if true.speed > 0 else abs(speed_noise) * 0.3
            course_sd = min(60.0, math.degrees(0.15 / max(true.speed, 0.05)))
            course = (true.heading + course_sd * course_noise) % 360.0 if true.speed > 0 else None
            report = NmeaFix(
                t_ms, lat, lon,
                alt_msl=self.alt_m + 1.5 * sigma * self._unit[2],
                geoid_sep=self.geoid_sep_m,
                hdop=max(0.5, r68 / DEFAULT_UERE_M),
                sats=sats,
                speed_mps=speed,
                course=course,
            )
        else:
            report = NmeaFix(t_ms, None, None, sats=0 if covered else min(sats, 3))
        self.last_report = report
        if self.truth is not None:
            self._record_position(t_ms, true, north, east, r68, has_fix=has_fix, covered=covered,
                                  multipath=multipath, jumped=jumped)
        hms, position = _hms(t_ms), _position_fields(report)  # shared by both sentences
        lines = [_gga(report, self.talker, hms, position), _rmc(report, self.talker, hms, position)]
        if self.corrupt_rate > 0:
            lines = [self._corrupt(line) if rng.random() < self.corrupt_rate else line for line in lines]
        return [] if self.dropped(t_ms) else lines

    def _record_position(
        self, t_ms: int, true: MotionState, north: float, east: float, r68: float, *,
        has_fix: bool, covered: bool, multipath: bool, jumped: bool,
    ) -> None:
        self._record(
            t_ms, "position",
            lat=round(true.lat, 7), lon=round(true.lon, 7), heading=round(true.heading, 1),
            speed=round(true.speed, 2), fix=has_fix, tunnel=covered,
            error_m=round(math.hypot(north, east), 2) if has_fix else None,
            acc=round(max(0.5, r68 / DEFAULT_UERE_M) * DEFAULT_UERE_M, 2) if has_fix else None,
            multipath=multipath and has_fix, jump=jumped and has_fix, dropout=self.dropped(t_ms),
        )

    def _corrupt(self, line: str) -> str:
        """A serial-line error: a flipped character or a truncated line."""
        if self.rng.random() < 0.5:
            return line[: self.rng.randrange(1, len(line))]
        i = self.rng.randrange(1, len(line) - 3)
        return line[:i] + chr(ord(line[i]) ^ 0x01) + line[i + 1 :]

    def reported_position(self) -> LatLon | None:
        """The position in the last epoch's sentences (None without a fix)."""
        r = self.last_report
        return None if r is None or r.lat is None or r.lon is None else (r.lat, r.lon)

    def error_m(self, t_ms: int) -> tuple[float, float] | None:
        """(north, east) error of the last report against the truth at `t_ms`."""
        reported = self.reported_position()
        return None if reported is None else displacement_m(self.true_state(t_ms).position, reported)

    # -- the driver loop --------------------------------------------------------------

    async def sentences(self, clock: Clock) -> AsyncGenerator[str, None]:
        """NMEA lines at each epoch (whole multiples of the period in UTC, plus
        `phase_ms`), on `clock`."""
        now = self._started(clock)
        phase = self.phase_ms % self.period_ms
        t = -(-(now - phase) // self.period_ms) * self.period_ms + phase
        while True:
            behind = clock.now_ms() - t
            if behind > MAX_BEHIND_EPOCHS * self.period_ms:
                t += behind // self.period_ms * self.period_ms
            if (wait := t - clock.now_ms()) > 0:
                await clock.sleep(wait / 1000.0)
            for line in self.epoch(t):
                yield line
            t += self.period_ms


__all__ = ["R68_PER_SIGMA", "GnssReceiver", "NmeaFix", "format_gga", "format_rmc"]
