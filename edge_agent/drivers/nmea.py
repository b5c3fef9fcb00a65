"""NMEA 0183 GNSS driver: GGA + RMC sentences in, `telemetry` readings out.

    gps = NmeaGps(lines)                         # lines: async iterable of sentences
    gps = NmeaGps(receiver.sentences)            # or a callable taking the agent's Clock
    async for reading in gps.readings(clock): ...

On a Pi `lines` wraps a serial port (`lines_from_stream(reader)`) or gpsd's raw NMEA
(`?WATCH={"nmea":true}`); in the simulator it is `GnssReceiver.sentences`.

Parsing is pure (`parse_sentence`, `FixAssembler`) and never raises on bad input: a line
that is not a sentence, fails its checksum, has fields that do not parse, or is of a
type this driver does not use is counted in `NmeaStats` and skipped. Any two-letter
talker is accepted (GP, GN, GL, GA, GB, ...). GGA and RMC with the same UTC time are one
fix; a fix is emitted as soon as the sentence types the receiver sends each epoch have
arrived (learned from the previous epoch), so readings come at the rate the receiver
reports, without waiting for the next epoch.

Telemetry: `lat`, `lon` (GGA, else RMC), `acc` = HDOP x `uere_m` (the 68% radius a
receiver with user-equivalent range error `uere_m` achieves), `alt` = GGA altitude +
geoid separation (height above the ellipsoid), `speed`/`heading` from RMC (heading
omitted when the receiver leaves it empty), `fix` (`3d` with altitude and 4+
satellites, else `2d`), plus `fix_ts` (UTC ms of the fix), `hdop`, `sats`.

Loss of fix (GGA quality 0 / RMC status V, no position): once a position has been
known, the driver keeps reporting at the receiver's rate with `fix: "none"`, the LAST
KNOWN `lat`/`lon`, its `fix_ts` (so readers know its age) and an `acc` grown by the
last speed (at least 2 m/s) times the age: a conservative bound, so that sensor
readings keep flowing in a tunnel. Before the first fix nothing is emitted (telemetry
needs a position).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import math
import operator
import re
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_agent.drivers import Clock, Reading
from edge_agent.drivers.gps import Fix

#: Metres per second in one knot.
KNOT_MPS = 1852.0 / 3600.0
#: User-equivalent range error: acc = HDOP x UERE.
DEFAULT_UERE_M = 5.0
#: Longer lines are garbage (NMEA's limit is 82 characters; some receivers exceed it).
MAX_LINE = 200
#: Growth of the uncertainty of a stale position, per second without a fix.
MIN_STALE_SPEED_MPS = 2.0
DAY_MS = 86_400_000

_NUMBER = re.compile(r"-?\d+(?:\.\d*)?")
_LAT = re.compile(r"(\d{2})(\d{2}(?:\.\d*)?)")
_LON = re.compile(r"(\d{3})(\d{2}(?:\.\d*)?)")
_TIME = re.compile(r"(\d{2})(\d{2})(\d{2}(?:\.\d*)?)")
_DATE = re.compile(r"(\d{2})(\d{2})(\d{2})")
_ADDRESS = re.compile(r"[A-Z]{2}[A-Z]{3}")


class NmeaError(ValueError):
    """A line was not a usable sentence. `reason`: garbage, checksum, invalid, unsupported."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def checksum(payload: str) -> str:
    """The two-hex-digit XOR checksum of the characters between `$` and `*`."""
    return f"{functools.reduce(operator.xor, payload.encode('ascii'), 0):02X}"


def sentence(payload: str) -> str:
    """`$payload*CS` (without line ending)."""
    return f"${payload}*{checksum(payload)}"


@dataclass(frozen=True)
class Gga:
    """GGA: position, fix quality, satellites, HDOP, altitude (MSL) and geoid separation."""

    talker: str
    time_ms: int | None  # milliseconds of the UTC day
    lat: float | None
    lon: float | None
    quality: int
    sats: int | None
    hdop: float | None
    alt_msl: float | None
    geoid_sep: float | None


@dataclass(frozen=True)
class Rmc:
    """RMC: position, validity, speed and course over ground, date."""

    talker: str
    time_ms: int | None
    valid: bool
    lat: float | None
    lon: float | None
    speed_mps: float | None
    course: float | None
    date: dt.date | None


def _number(text: str, what: str) -> float | None:
    if not text:
        return None
    if not _NUMBER.fullmatch(text):
        raise NmeaError("invalid", f"{what} {text!r} is not a number")
    return float(text)


def _coordinate(value: str, hemisphere: str, *, lon: bool) -> float | None:
    if not value and not hemisphere:
        return None
    match = (_LON if lon else _LAT).fullmatch(value)
    if match is None or hemisphere not in ("EW" if lon else "NS"):
        raise NmeaError("invalid", f"bad {'longitude' if lon else 'latitude'} {value!r},{hemisphere!r}")
    degrees, minutes = int(match.group(1)), float(match.group(2))
    result = degrees + minutes / 60.0
    if minutes >= 60.0 or result > (180.0 if lon else 90.0):
        raise NmeaError("invalid", f"coordinate out of range {value!r}")
    return -result if hemisphere in "SW" else result


def _time_ms(text: str) -> int | None:
    if not text:
        return None
    match = _TIME.fullmatch(text)
    if match is None:
        raise NmeaError("invalid", f"bad time {text!r}")
    hours, minutes, seconds = int(match.group(1)), int(match.group(2)), float(match.group(3))
    if hours > 23 or minutes > 59 or seconds >= 61:
        raise NmeaError("invalid", f"bad time {text!r}")
    return min(round((hours * 3600 + minutes * 60 + seconds) * 1000), DAY_MS - 1)


@functools.lru_cache(maxsize=16)
def _date(text: str) -> dt.date | None:
    if not text:
        return None
    match = _DATE.fullmatch(text)
    if match is None:
        raise NmeaError("invalid", f"bad date {text!r}")
    day, month, yy = (int(g) for g in match.groups())
    try:
        return dt.date(2000 + yy if yy < 80 else 1900 + yy, month, day)
    except ValueError:
        raise NmeaError("invalid", f"bad date {text!r}") from None


def _padded(fields: list[str], n: int) -> list[str]:
    """`fields` with empty ones added up to `n` (missing trailing fields are empty)."""
    return fields if len(fields) >= n else fields + [""] * (n - len(fields))


def _parse_gga(talker: str, f: list[str]) -> Gga:
    f = _padded(f, 11)
    quality_text = f[5]
    if quality_text and not quality_text.isdigit():
        raise NmeaError("invalid", f"bad GGA quality {quality_text!r}")
    sats_text = f[6]
    if sats_text and not sats_text.isdigit():
        raise NmeaError("invalid", f"bad GGA satellites {sats_text!r}")
    lat = _coordinate(f[1], f[2], lon=False)
    lon = _coordinate(f[3], f[4], lon=True)
    if (lat is None) != (lon is None):
        raise NmeaError("invalid", "GGA has only one of latitude and longitude")
    hdop = _number(f[7], "HDOP")
    if hdop is not None and not 0 <= hdop <= 99.99:
        raise NmeaError("invalid", f"HDOP {hdop} out of range")
    return Gga(
        talker,
        _time_ms(f[0]),
        lat,
        lon,
        int(quality_text) if quality_text else 0,
        int(sats_text) if sats_text else None,
        hdop,
        _number(f[8], "altitude"),
        _number(f[10], "geoid separation"),
    )


def _parse_rmc(talker: str, f: list[str]) -> Rmc:
    f = _padded(f, 12)
    status = f[1]
    if status not in ("A", "V"):
        raise NmeaError("invalid", f"bad RMC status {status!r}")
    lat = _coordinate(f[2], f[3], lon=False)
    lon = _coordinate(f[4], f[5], lon=True)
    if (lat is None) != (lon is None):
        raise NmeaError("invalid", "RMC has only one of latitude and longitude")
    knots = _number(f[6], "speed")
    course = _number(f[7], "course")
    if knots is not None and not 0 <= knots * KNOT_MPS <= 1000:
        raise NmeaError("invalid", f"speed {knots} out of range")
    if course is not None and not 0 <= course <= 360:
        raise NmeaError("invalid", f"course {course} out of range")
    mode = f[11]
    return Rmc(
        talker,
        _time_ms(f[0]),
        status == "A" and mode != "N" and lat is not None,
        lat,
        lon,
        None if knots is None else knots * KNOT_MPS,
        course,
        _date(f[8]),
    )


_PARSERS: dict[str, Callable[[str, list[str]], Gga | Rmc]] = {"GGA": _parse_gga, "RMC": _parse_rmc}
_BYTES = (bytes, bytearray)
#: Addresses seen to match `_ADDRESS` (a receiver uses a handful), so most lines skip the regex.
_GOOD_ADDRESSES: set[str] = set()


def parse_sentence(line: str | bytes) -> Gga | Rmc:
    """Parse one GGA or RMC sentence; raise `NmeaError` (never anything else) otherwise.
    Leading noise before the last `$` and trailing whitespace are tolerated."""
    if isinstance(line, _BYTES):
        try:
            line = bytes(line).decode("ascii")
        except UnicodeDecodeError:
            raise NmeaError("garbage", "not ASCII") from None
    line = line.strip()
    if len(line) > MAX_LINE:
        raise NmeaError("garbage", f"longer than {MAX_LINE} characters")
    start = line.rfind("$")
    star = line.rfind("*")
    if start < 0 or star < start or len(line) - star != 3:
        raise NmeaError("garbage", "not a $...*hh sentence")
    payload, given = line[start + 1 : star], line[star + 1 :].upper()
    if not payload.isascii() or not payload.isprintable() or "*" in payload:
        raise NmeaError("garbage", "bad characters")
    if given != checksum(payload):
        raise NmeaError("checksum", f"checksum {given!r} != {checksum(payload)!r}")
    fields = payload.split(",")
    address = fields[0]
    if address not in _GOOD_ADDRESSES:
        if not _ADDRESS.fullmatch(address):
            raise NmeaError("unsupported", f"address {address!r}")
        if len(_GOOD_ADDRESSES) < 64:
            _GOOD_ADDRESSES.add(address)
    parser = _PARSERS.get(address[2:])
    if parser is None:
        raise NmeaError("unsupported", f"sentence type {address[2:]}")
    return parser(address[:2], fields[1:])


@dataclass
class NmeaStats:
    """What the parser saw. `garbage`, `checksum` and `invalid` lines are rejected;
    `unsupported` are valid sentences of types not used here (GSA, GSV, VTG, ...);
    `late` are sentences of an epoch that had already been reported (or repeats)."""

    lines: int = 0
    gga: int = 0
    rmc: int = 0
    fixes: int = 0
    garbage: int = 0
    checksum: int = 0
    invalid: int = 0
    unsupported: int = 0
    late: int = 0

    @property
    def rejected(self) -> int:
        return self.garbage + self.checksum + self.invalid


@dataclass(frozen=True)
class GnssFix:
    """One epoch: what the GGA and/or RMC of the same UTC time said."""

    time_ms: int | None
    gga: Gga | None = None
    rmc: Rmc | None = None

    @property
    def valid(self) -> bool:
        if self.gga is not None:
            return self.gga.quality > 0 and self.gga.lat is not None
        return self.rmc is not None and self.rmc.valid

    @property
    def position(self) -> tuple[float, float] | None:
        for s in (self.gga, self.rmc):
            if s is not None and s.lat is not None and s.lon is not None:
                return s.lat, s.lon
        return None


@dataclass
class FixAssembler:
    """Pairs GGA and RMC of the same time into `GnssFix`es. Pure: lines in, fixes out."""

    stats: NmeaStats = field(default_factory=NmeaStats)
    _pending: GnssFix | None = None
    _expect: frozenset[str] = frozenset({"GGA", "RMC"})
    _last_time: int | None = None

    def feed(self, line: str | bytes) -> list[GnssFix]:
        """Take one line; return the fixes it completes (zero, one, or two)."""
        self.stats.lines += 1
        if not line.strip():
            return []
        try:
            parsed = parse_sentence(line)
        except NmeaError as exc:
            setattr(self.stats, exc.reason, getattr(self.stats, exc.reason) + 1)
            return []
        is_gga = type(parsed) is Gga
        kind = "GGA" if is_gga else "RMC"
        if is_gga:
            self.stats.gga += 1
        else:
            self.stats.rmc += 1
        out: list[GnssFix] = []
        if parsed.time_ms is not None and parsed.time_ms == self._last_time and self._pending is None:
            self.stats.late += 1  # its epoch was reported without it: wait for it next time
            self._expect = self._expect | {kind}
            return out
        pending = self._pending
        if pending is not None and pending.time_ms == parsed.time_ms and _has(pending, kind):
            self.stats.late += 1  # a repeated sentence: keep the first
            return out
        if pending is not None and pending.time_ms != parsed.time_ms:
            out.extend(self._finish(partial=True))
            pending = None
        if isinstance(parsed, Gga):
            pending = (GnssFix(parsed.time_ms, parsed) if pending is None
                       else GnssFix(pending.time_ms, parsed, pending.rmc))
        else:
            pending = (GnssFix(parsed.time_ms, None, parsed) if pending is None
                       else GnssFix(pending.time_ms, pending.gga, parsed))
        self._pending = pending
        if parsed.time_ms is None or self._expect <= _kinds(pending):
            out.extend(self._finish(partial=False))
        return out

    def flush(self) -> list[GnssFix]:
        """The fix still waiting for its partner (at the end of the input)."""
        return self._finish(partial=True) if self._pending is not None else []

    def _finish(self, *, partial: bool) -> list[GnssFix]:
        fix = self._pending
        assert fix is not None
        self._pending = None
        if partial:
            self._expect = _kinds(fix)
        self._last_time = fix.time_ms
        self.stats.fixes += 1
        return [fix]


_KINDS = {
    (True, True): frozenset({"GGA", "RMC"}),
    (True, False): frozenset({"GGA"}),
    (False, True): frozenset({"RMC"}),
    (False, False): frozenset[str](),
}


def _kinds(fix: GnssFix) -> frozenset[str]:
    return _KINDS[fix.gga is not None, fix.rmc is not None]


def _has(fix: GnssFix, kind: str) -> bool:
    return kind in _kinds(fix)


@functools.lru_cache(maxsize=16)
def _midnight_ms(date: dt.date) -> int:
    return int(dt.datetime.combine(date, dt.time(), tzinfo=dt.UTC).timestamp()) * 1000


def fix_utc_ms(fix: GnssFix, now_ms: int) -> int | None:
    """UTC ms of the fix: RMC's date + time, or (GGA only) the time on the day that puts it
    nearest `now_ms`."""
    if fix.time_ms is None:
        return None
    if fix.rmc is not None and fix.rmc.date is not None:
        return _midnight_ms(fix.rmc.date) + fix.time_ms
    day = now_ms - now_ms % DAY_MS
    return min((day + k * DAY_MS + fix.time_ms for k in (-1, 0, 1)), key=lambda t: abs(t - now_ms))


def _round(value: float, digits: int) -> float:
    return round(value, digits) if math.isfinite(value) else 0.0


class NmeaGps:
    """The agent's GNSS driver. `source` is an async iterable of NMEA lines, or a callable
    that takes the agent's clock and returns one. `sensors(now_ms)` adds readings (battery,
    temperature, ...) to each telemetry. `min_interval_s` thins a fast receiver (10 Hz) to
    the telemetry rate wanted; 0 reports every fix."""

    def __init__(
        self,
        source: AsyncIterable[str | bytes] | Callable[[Clock], AsyncIterable[str | bytes]],
        *,
        sensors: Callable[[int], Mapping[str, Any]] | None = None,
        uere_m: float = DEFAULT_UERE_M,
        min_interval_s: float = 0.0,
    ) -> None:
        if uere_m <= 0 or min_interval_s < 0:
            raise ValueError("uere_m must be > 0 and min_interval_s >= 0")
        self._source = source
        self._sensors = sensors
        self.uere_m = uere_m
        self.min_interval_s = min_interval_s
        self.assembler = FixAssembler()
        self.last_fix: Fix | None = None
        self._last: dict[str, Any] | None = None  # the last body with a fix
        self._last_emit_ms: int | None = None

    @property
    def stats(self) -> NmeaStats:
        return self.assembler.stats

    def body_for(self, fix: GnssFix, now_ms: int) -> dict[str, Any] | None:
        """The telemetry body for one fix (None before the first position is known)."""
        fix_ts = fix_utc_ms(fix, now_ms)
        if fix.valid and (position := fix.position) is not None:
            body: dict[str, Any] = {"lat": _round(position[0], 9), "lon": _round(position[1], 9)}
            gga, rmc = fix.gga, fix.rmc
            if gga is not None and gga.hdop is not None:
                body["acc"] = _round(gga.hdop * self.uere_m, 2)
                body["hdop"] = gga.hdop
            if gga is not None and gga.alt_msl is not None:
                alt = gga.alt_msl + (gga.geoid_sep or 0.0)
                if -1000 <= alt <= 100_000:
                    body["alt"] = _round(alt, 2)
            if rmc is not None and rmc.speed_mps is not None:
                body["speed"] = _round(rmc.speed_mps, 3)
            if rmc is not None and rmc.course is not None:
                body["heading"] = rmc.course
            three_d = "alt" in body and (gga is not None and (gga.sats is None or gga.sats >= 4))
            body["fix"] = "3d" if three_d else "2d"
            if gga is not None and gga.sats is not None:
                body["sats"] = gga.sats
            if fix_ts is not None:
                body["fix_ts"] = fix_ts
            self._last = body
            self.last_fix = Fix(body["lat"], body["lon"], body.get("acc", 0.0))
            return dict(body)
        if self._last is None:
            return None
        last = self._last
        stale: dict[str, Any] = {"lat": last["lat"], "lon": last["lon"], "fix": "none"}
        if "fix_ts" in last:
            stale["fix_ts"] = last["fix_ts"]
            age_s = max(0.0, ((fix_ts if fix_ts is not None else now_ms) - last["fix_ts"]) / 1000.0)
            grown = last.get("acc", 0.0) + max(last.get("speed", 0.0), MIN_STALE_SPEED_MPS) * age_s
            stale["acc"] = _round(min(grown, 1e6), 1)
        self.last_fix = Fix(stale["lat"], stale["lon"], stale.get("acc", 0.0))
        return stale

    def feed(self, line: str | bytes, now_ms: int) -> list[Reading]:
        """Take one line, received at `now_ms` on the agent's clock; return the readings
        it completes (usually none or one). `readings()` is this over its source; a
        simulator running thousands of receivers calls it from one scheduler instead of
        one task per receiver."""
        out: list[Reading] = []
        for fix in self.assembler.feed(line):
            reading = self._reading(fix, now_ms)
            if reading is not None:
                out.append(reading)
        return out

    async def readings(self, clock: Clock) -> AsyncGenerator[Reading, None]:
        source = self._source(clock) if callable(self._source) else self._source
        async for line in source:
            for reading in self.feed(line, clock.now_ms()):
                yield reading
        for fix in self.assembler.flush():
            last = self._reading(fix, clock.now_ms())
            if last is not None:
                yield last

    def _reading(self, fix: GnssFix, now_ms: int) -> Reading | None:
        body = self.body_for(fix, now_ms)
        if body is None:
            return None
        if self._last_emit_ms is not None and now_ms - self._last_emit_ms < self.min_interval_s * 1000:
            return None
        self._last_emit_ms = now_ms
        if self._sensors is not None and (extra := self._sensors(now_ms)):
            body["sensors"] = dict(extra)
        return Reading("telemetry", body)


async def lines_from_stream(reader: asyncio.StreamReader) -> AsyncGenerator[bytes, None]:
    """Lines from an `asyncio.StreamReader` (a serial port or gpsd socket), as bytes;
    the parser decodes and rejects what is not ASCII."""
    while line := await reader.readline():
        yield line


__all__ = [
    "DEFAULT_UERE_M",
    "KNOT_MPS",
    "FixAssembler",
    "Gga",
    "GnssFix",
    "NmeaError",
    "NmeaGps",
    "NmeaStats",
    "Rmc",
    "checksum",
    "fix_utc_ms",
    "lines_from_stream",
    "parse_sentence",
    "sentence",
]
