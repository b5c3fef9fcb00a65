"""The agent's NMEA 0183 driver: parsing, checksums, pairing GGA + RMC, garbage, loss of fix."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.drivers import Reading
from edge_agent.drivers.nmea import (
    KNOT_MPS,
    FixAssembler,
    Gga,
    GnssFix,
    NmeaError,
    NmeaGps,
    Rmc,
    checksum,
    fix_utc_ms,
    parse_sentence,
    sentence,
)
from edge_agent.wire.model import validate_body
from firmware_sim.models.gnss import NmeaFix, format_gga, format_rmc

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z

# The classic examples from the NMEA literature (gpsinformation.org).
GGA = "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47"
RMC = "$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A"


class FakeClock:
    def __init__(self, ms: int = T0) -> None:
        self.ms = ms

    def now_ms(self) -> int:
        return self.ms

    async def sleep(self, seconds: float) -> None:
        self.ms += round(seconds * 1000)


async def _lines(lines: Iterable[str | bytes]) -> AsyncIterator[str | bytes]:
    for line in lines:
        yield line


async def _collect(gps: NmeaGps, clock: FakeClock | None = None) -> list[Reading]:
    return [r async for r in gps.readings(clock or FakeClock())]


def test_checksum_and_the_classic_sentences() -> None:
    assert checksum("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,") == "47"
    gga = parse_sentence(GGA)
    assert isinstance(gga, Gga)
    assert gga.talker == "GP"
    assert gga.time_ms == (12 * 3600 + 35 * 60 + 19) * 1000
    assert gga.lat == pytest.approx(48 + 7.038 / 60)
    assert gga.lon == pytest.approx(11 + 31.0 / 60)
    assert (gga.quality, gga.sats, gga.hdop, gga.alt_msl, gga.geoid_sep) == (1, 8, 0.9, 545.4, 46.9)
    rmc = parse_sentence(RMC.encode() + b"\r\n")
    assert isinstance(rmc, Rmc)
    assert rmc.valid
    assert rmc.date == dt.date(1994, 3, 23)
    assert rmc.speed_mps == pytest.approx(22.4 * KNOT_MPS)
    assert rmc.course == 84.4


async def test_gga_and_rmc_of_one_epoch_make_one_telemetry() -> None:
    gps = NmeaGps(_lines([GGA, RMC]))
    (reading,) = await _collect(gps)
    body = reading.body
    validate_body("telemetry", body)
    assert body["lat"] == pytest.approx(48.1173)
    assert body["lon"] == pytest.approx(11.516667, abs=1e-6)
    assert body["alt"] == pytest.approx(545.4 + 46.9)
    assert body["acc"] == pytest.approx(0.9 * 5.0)
    assert body["speed"] == pytest.approx(11.523, abs=1e-3)
    assert body["heading"] == 84.4
    assert body["fix"] == "3d"
    assert body["sats"] == 8
    assert body["fix_ts"] == int(dt.datetime(1994, 3, 23, 12, 35, 19, tzinfo=dt.UTC).timestamp() * 1000)
    assert gps.stats.fixes == 1
    assert gps.stats.rejected == 0


@settings(max_examples=300, deadline=None)
@given(
    lat=st.floats(-89.999, 89.999),
    lon=st.floats(-179.999, 179.999),
    speed=st.floats(0, 90),
    course=st.floats(0, 359.99),
    hdop=st.floats(0.5, 20),
    alt=st.floats(-100, 5000),
    second=st.integers(0, 10 * 365 * 86_400),
)
def test_round_trip_generator_to_parser(
    lat: float, lon: float, speed: float, course: float, hdop: float, alt: float, second: int
) -> None:
    t_ms = T0 + second * 1000
    fix = NmeaFix(t_ms, lat, lon, alt_msl=alt, geoid_sep=45.9, hdop=round(hdop, 2), sats=9,
                  speed_mps=speed, course=round(course, 2))
    assembler = FixAssembler()
    assert assembler.feed(format_gga(fix)) == []
    (got,) = assembler.feed(format_rmc(fix))
    gps = NmeaGps(_lines([]))
    body = gps.body_for(got, t_ms)
    assert body is not None
    validate_body("telemetry", body)
    # 6 decimals of arc minutes: the format's resolution is 1e-6 / 60 degrees
    assert body["lat"] == pytest.approx(lat, abs=1e-8)
    assert body["lon"] == pytest.approx(lon, abs=1e-8)
    assert body["alt"] == pytest.approx(round(alt, 1) + 45.9, abs=0.06)
    assert body["speed"] == pytest.approx(speed, abs=1e-3)
    assert body["heading"] == pytest.approx(course, abs=0.006)
    assert body["acc"] == pytest.approx(round(hdop, 2) * 5.0)
    assert body["fix_ts"] == t_ms
    assert assembler.stats.rejected == 0


def test_checksum_failures_are_rejected_and_counted() -> None:
    bad = GGA.replace("4807.038", "4807.039")  # one digit changed, checksum kept
    with pytest.raises(NmeaError) as info:
        parse_sentence(bad)
    assert info.value.reason == "checksum"
    assembler = FixAssembler()
    assert assembler.feed(bad) == []
    assert assembler.feed(RMC.replace("*6A", "*6B")) == []
    assert assembler.stats.checksum == 2
    assert assembler.stats.fixes == 0
    # lower-case hex digits are valid
    assert isinstance(parse_sentence(RMC.replace("*6A", "*6a")), Rmc)


def test_garbage_is_counted_never_raised() -> None:
    gsv = sentence("GPGSV,3,1,11,03,03,111,00,04,15,270,00,06,01,010,00,13,06,292,00")
    junk: list[str | bytes] = [
        "",
        "   ",
        "hello world",
        "$",
        "$*",
        "$GPGGA,123519*ZZ",
        "$GPGGA,123519,4807.038,N",  # truncated, no checksum
        "$" + "A" * 300 + "*00",
        b"\xff\xfe$GPGGA*00",
        b"\x00\x01\x02",
        sentence("GPGGA,123519,4807.038,N,01131.000,X,1,08,0.9,545.4,M,46.9,M,,"),  # bad hemisphere
        sentence("GPGGA,253519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"),  # hour 25
        sentence("GPGGA,123519,4867.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"),  # 67 minutes
        sentence("GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,320394,003.1,W"),  # 32 March
        sentence("GPRMC,123519,A,4807.038,N,01131.000,E,1_0,084.4,230394,003.1,W"),  # python-only number
        sentence("GPGGA,123519,4807.038,N,01131.000,E,1,08,nan,545.4,M,46.9,M,,"),
        gsv,
        sentence("PUBX,00,123519"),
    ]
    assembler = FixAssembler()
    for line in junk:
        assert assembler.feed(line) == []
    stats = assembler.stats
    assert stats.unsupported == 2
    assert stats.invalid == 6
    assert stats.checksum == 1  # "*ZZ"
    assert stats.garbage == 7
    # noise before the `$` (a serial port opening mid-line) is tolerated
    assert len(assembler.feed("\x00\x00~~" + GGA) + assembler.feed(RMC)) == 1


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=120), st.binary(max_size=120)))
def test_fuzz_random_lines_never_raise(line: str | bytes) -> None:
    assembler = FixAssembler()
    assembler.feed(line)
    assembler.flush()
    with contextlib.suppress(NmeaError):
        parse_sentence(line)


_FIELD = st.text(alphabet="0123456789.,-NSEWAVM", max_size=14)


@settings(max_examples=500, deadline=None)
@given(kind=st.sampled_from(["GPGGA", "GNRMC", "GPRMC", "GLGGA"]), fields=st.lists(_FIELD, max_size=16))
def test_fuzz_well_formed_sentences_with_random_fields(kind: str, fields: list[str]) -> None:
    """Valid checksums, random field contents: a parse or an NmeaError, and any fix
    that comes out makes a valid telemetry body."""
    line = sentence(",".join([kind, *fields]))
    reason = ""
    try:
        parse_sentence(line)
    except NmeaError as exc:
        reason = exc.reason
    assert reason in {"", "invalid", "garbage"}
    assembler = FixAssembler()
    gps = NmeaGps(_lines([]))
    for fix in assembler.feed(line) + assembler.flush():
        body = gps.body_for(fix, T0)
        if body is not None:
            validate_body("telemetry", body)


def _epoch(second: int, *, has_fix: bool = True, lat: float = 51.5, lon: float = -0.12) -> NmeaFix:
    if not has_fix:
        return NmeaFix(T0 + second * 1000, None, None)
    return NmeaFix(T0 + second * 1000, lat + second * 1e-5, lon, alt_msl=20.0, hdop=1.2, sats=10,
                   speed_mps=1.1, course=0.0)


def test_fix_is_emitted_as_soon_as_its_epoch_is_complete() -> None:
    assembler = FixAssembler()
    assert assembler.feed(format_gga(_epoch(0))) == []
    (first,) = assembler.feed(format_rmc(_epoch(0)))
    assert first.gga is not None
    assert first.rmc is not None
    # the RMC of epoch 1 is lost: its GGA alone is reported when epoch 2 begins, and
    # having learnt that only GGA comes, epoch 2 goes out on its GGA at once
    assert assembler.feed(format_gga(_epoch(1))) == []
    partial, second = assembler.feed(format_gga(_epoch(2)))
    assert partial.rmc is None
    assert partial.time_ms == (T0 + 1000) % 86_400_000
    assert second.time_ms == (T0 + 2000) % 86_400_000
    # the RMC of epoch 2 arrives late: counted, and GGA + RMC is expected again
    assert assembler.feed(format_rmc(_epoch(2))) == []
    assert assembler.feed(format_gga(_epoch(3))) == []
    (third,) = assembler.feed(format_rmc(_epoch(3)))
    assert third.gga is not None
    assert third.rmc is not None
    assert assembler.feed(format_rmc(_epoch(3))) == []  # a repeat
    assert assembler.stats.late == 2


def test_gga_only_receiver_reports_every_epoch_without_waiting() -> None:
    assembler = FixAssembler()
    out = [len(assembler.feed(format_gga(_epoch(s)))) for s in range(5)]
    # the first epoch waits for an RMC that never comes; then every GGA is reported at once
    assert out == [0, 2, 1, 1, 1]
    assert assembler.flush() == []


async def test_loss_of_fix_reports_the_last_position_with_fix_none() -> None:
    lines: list[str] = []
    for s in range(6):
        fix = _epoch(s, has_fix=s in (2, 3))
        lines += [format_gga(fix), format_rmc(fix)]
    clock = FakeClock(T0 + 5000)
    gps = NmeaGps(_lines(lines), sensors=lambda t: {"battery": 50})
    readings = await _collect(gps, clock)
    bodies = [r.body for r in readings]
    assert len(bodies) == 4  # nothing before the first fix (epochs 0, 1)
    for body in bodies:
        validate_body("telemetry", body)
        assert body["sensors"] == {"battery": 50}
    assert [b["fix"] for b in bodies] == ["3d", "3d", "none", "none"]
    last = bodies[1]
    for n, stale in enumerate(bodies[2:], start=1):
        assert (stale["lat"], stale["lon"], stale["fix_ts"]) == (last["lat"], last["lon"], last["fix_ts"])
        # the bound grows by max(last speed, 2 m/s) per second of age
        assert stale["acc"] == pytest.approx(last["acc"] + 2.0 * n)
    assert gps.last_fix is not None
    assert gps.last_fix.acc == bodies[-1]["acc"]


async def test_min_interval_thins_a_fast_receiver() -> None:
    clock = FakeClock()

    async def ten_hz() -> AsyncIterator[str]:
        for tenth in range(30):  # 10 Hz for 3 s
            clock.ms = T0 + tenth * 100
            fix = NmeaFix(clock.ms, 51.5, -0.12, alt_msl=10.0, hdop=1.0, sats=8, speed_mps=0.0)
            yield format_gga(fix)
            yield format_rmc(fix)

    readings = await _collect(NmeaGps(ten_hz(), min_interval_s=1.0), clock)
    assert [r.body["fix_ts"] - T0 for r in readings] == [0, 1000, 2000]


def test_fix_time_without_a_date_is_placed_on_the_nearest_day() -> None:
    late_evening = Gga("GP", (23 * 3600 + 59 * 60 + 59) * 1000, 51.5, -0.1, 1, 8, 1.0, 10.0, 45.0)
    just_after_midnight = T0 + 500  # 2026-01-01T00:00:00.5Z: the fix was on 31 December
    assert fix_utc_ms(GnssFix(late_evening.time_ms, gga=late_evening), just_after_midnight) == T0 - 1000
    assert fix_utc_ms(GnssFix(None, gga=late_evening), T0) is None


async def test_source_may_be_a_callable_taking_the_clock() -> None:
    seen: list[object] = []

    def source(clock: object) -> AsyncIterator[str]:
        seen.append(clock)
        return _lines([GGA, RMC])  # type: ignore[return-value]

    clock = FakeClock()
    assert len(await _collect(NmeaGps(source), clock)) == 1
    assert seen == [clock]
