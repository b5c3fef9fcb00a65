"""Simulated sensors: statistics against their ground truth, faults, events, determinism."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
import statistics
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from edge_agent.drivers import Driver, Reading
from edge_agent.drivers.gps import Fix, Route
from edge_agent.drivers.nmea import FixAssembler, NmeaGps
from edge_agent.wire.geo import LatLon, displacement_m, distance_m, offset
from edge_agent.wire.model import validate_body
from firmware_sim.city import City
from firmware_sim.models import (
    SPEED_OF_SOUND_MPS,
    AcousticSensor,
    AnprCamera,
    BodySensors,
    DeviceHealth,
    GnssReceiver,
    Imu,
    NotStarted,
    Trajectory,
    VehicleUnit,
    acoustic_drivers,
    anpr_drivers,
    gunshot,
    officer_drivers,
    sub_seed,
    vehicle_drivers,
)
from firmware_sim.models.anpr import LOOKALIKES
from firmware_sim.models.gnss import R68_PER_SIGMA
from firmware_sim.truth import TruthLog

T0 = 1_767_254_400_000  # 2026-01-01T08:00:00Z
ORIGIN: LatLon = (51.5, -0.12)
#: A straight street 5 km due east of ORIGIN, driven as an open path.
EAST = (ORIGIN, offset(ORIGIN, 0.0, 5000.0))


class FakeClock:
    """Time that moves only when someone sleeps."""

    def __init__(self, ms: int = T0) -> None:
        self.ms = ms

    def now_ms(self) -> int:
        return self.ms

    async def sleep(self, seconds: float) -> None:
        self.ms += max(0, round(seconds * 1000))
        await asyncio.sleep(0)


class StepClock:
    """A discrete-event clock for several drivers at once: `sleep` waits until `run_until`
    moves time to its wake-up, and time moves only when every task is idle."""

    def __init__(self, ms: int = T0) -> None:
        self.ms = ms
        self._sleepers: list[tuple[int, int, asyncio.Future[None]]] = []
        self._n = 0

    def now_ms(self) -> int:
        return self.ms

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._n += 1
        heapq.heappush(self._sleepers, (self.ms + max(0, round(seconds * 1000)), self._n, future))
        await future

    async def run_until(self, end_ms: int) -> None:
        while True:
            for _ in range(30):  # let every task run until it waits again
                await asyncio.sleep(0)
            while self._sleepers and self._sleepers[0][2].done():
                heapq.heappop(self._sleepers)
            if not self._sleepers or self._sleepers[0][0] > end_ms:
                self.ms = end_ms
                return
            self.ms = self._sleepers[0][0]
            while self._sleepers and self._sleepers[0][0] <= self.ms:
                future = heapq.heappop(self._sleepers)[2]
                if not future.done():
                    future.set_result(None)


def _errors(gnss: GnssReceiver, seconds: int, start: int = T0) -> list[tuple[int, tuple[float, float] | None]]:
    """Run the receiver's epochs through the agent's parser: (t, (north, east) error or None)."""
    assembler = FixAssembler()
    out: list[tuple[int, tuple[float, float] | None]] = []
    for s in range(seconds):
        t = start + s * 1000
        fixes = [fix for line in gnss.epoch(t) for fix in assembler.feed(line)]
        assert len(fixes) <= 1
        if not fixes:
            continue
        position = fixes[0].position if fixes[0].valid else None
        truth = gnss.true_state(t).position
        out.append((t, None if position is None else displacement_m(truth, position)))
    return out


# -- GNSS ------------------------------------------------------------------------------


def test_gnss_urban_noise_statistics_and_honest_accuracy() -> None:
    truth = TruthLog()
    gnss = GnssReceiver(Trajectory(EAST, 0.3, loop=False), seed=11, truth=truth, urban_sigma_m=7.0, multipath_prob=0)
    errors = [e for _, e in _errors(gnss, 4 * 3600)]
    assert all(e is not None for e in errors)
    north = [e[0] for e in errors if e is not None]
    east = [e[1] for e in errors if e is not None]
    radial = [math.hypot(n, e) for n, e in zip(north, east, strict=True)]
    # per-axis sigma is the 68% radius / 1.51; the canyon factor (mean 1) adds ~3% RMS
    expected = 7.0 / R68_PER_SIGMA * 1.03
    for axis in (north, east):
        assert statistics.fmean(axis) == pytest.approx(0.0, abs=1.0)
        assert math.sqrt(statistics.fmean(v * v for v in axis)) == pytest.approx(expected, rel=0.15)
    # "urban noise ~5-10 m": the 68% radius of the error
    assert 5.0 < sorted(radial)[int(0.68 * len(radial))] < 10.0
    # temporally correlated: it wanders, it does not jump from second to second
    assert statistics.correlation(north[:-1], north[1:]) > 0.9
    assert abs(statistics.correlation(north[:-300], north[300:])) < 0.3
    # the reported accuracy (HDOP x UERE) is honest: about 68% of fixes lie within it
    positions = truth.records("position")
    within = sum(1 for p in positions if p["error_m"] <= p["acc"])
    assert within / len(positions) == pytest.approx(0.68, abs=0.06)
    assert all(p["error_m"] == pytest.approx(r, abs=0.02) for p, r in zip(positions, radial, strict=True))


def test_gnss_multipath_jumps_are_occasional_and_tens_of_metres() -> None:
    truth = TruthLog()
    gnss = GnssReceiver(Trajectory(EAST, 0.3, loop=False), seed=3, truth=truth, multipath_prob=0.01)
    _errors(gnss, 7200)
    events = truth.records("multipath")
    # 1% per second outside the 3-15 s episodes: about 7200 * 0.01 / 1.09
    assert 40 < len(events) < 100
    assert all(15 <= e["offset_m"] <= 60 for e in events)
    affected = [p for p in truth.records("position") if p["multipath"]]
    assert len(affected) == pytest.approx(len(events) * 9, rel=0.3)
    assert statistics.median(p["error_m"] for p in affected) > 20
    clean = [p["error_m"] for p in truth.records("position") if not p["multipath"]]
    assert statistics.median(clean) < 10


def test_gnss_jump_fault_offsets_the_fix_then_returns() -> None:
    truth = TruthLog()
    gnss = GnssReceiver(Trajectory(EAST, 8.0, loop=False), seed=4, truth=truth, multipath_prob=0)
    gnss.jump(200.0, 20.0, bearing_deg=0.0, at_ms=T0 + 60_000)
    errors = dict(_errors(gnss, 120))
    during = [errors[T0 + s * 1000] for s in range(60, 80)]
    after = [errors[T0 + s * 1000] for s in range(80, 120)]
    assert all(e is not None and e[0] == pytest.approx(200, abs=30) for e in during)
    assert all(e is not None and math.hypot(*e) < 30 for e in after)
    assert truth.records("gnss_jump")[0]["offset_m"] == 200.0


def test_tunnel_loses_the_fix_and_reacquires_after_the_exit() -> None:
    city = City.builtin()
    tunnel = city.tunnels[0]
    truth = TruthLog()
    # drive through the tunnel and back along its street at 5 m/s
    gnss = GnssReceiver(Route(tunnel.path), 5.0, seed=8, truth=truth, tunnels=city.tunnels)
    readings: list[dict[str, object]] = []
    gps = NmeaGps(_no_lines())
    assembler = gps.assembler
    for s in range(300):
        for line in gnss.epoch(T0 + s * 1000):
            for fix in assembler.feed(line):
                body = gps.body_for(fix, T0 + s * 1000)
                assert body is not None
                validate_body("telemetry", body)
                readings.append(body)
    positions = truth.records("position")
    covered = [p for p in positions if p["tunnel"]]
    assert len(covered) > 50
    assert not any(p["fix"] for p in covered)
    # every outage ends 2-6 s after the exit
    gaps = []
    run = 0
    for p in positions:
        if not p["fix"] and not p["tunnel"]:
            run += 1
        elif p["fix"] and run:
            gaps.append(run)
            run = 0
        elif p["tunnel"]:
            run = 0
    assert gaps
    assert all(2 <= g <= 6 for g in gaps)
    # the driver reports fix "none" at the last known position meanwhile
    assert len([b for b in readings if b["fix"] == "none"]) == sum(1 for p in positions if not p["fix"])
    for before, body in itertools.pairwise(readings):
        if body["fix"] == "none":
            assert (body["lat"], body["lon"]) == (before["lat"], before["lon"])
            assert body["acc"] > before["acc"]  # type: ignore[operator]


async def _no_lines() -> AsyncIterator[str]:
    lines: tuple[str, ...] = ()
    for line in lines:
        yield line


def test_lose_fix_and_dropout_faults() -> None:
    truth = TruthLog()
    gnss = GnssReceiver(Trajectory(EAST, 5.0, loop=False), seed=2, truth=truth)
    gnss.lose_fix(10, at_ms=T0 + 5_000)
    gnss.drop_out(7, at_ms=T0 + 30_000)
    lines = {s: gnss.epoch(T0 + s * 1000) for s in range(60)}
    assert all(len(lines[s]) == 2 for s in range(30))
    assert all(",0,00," in lines[s][0] or ",0,0" in lines[s][0] for s in range(5, 15))
    assert all(lines[s] == [] for s in range(30, 37))
    assert all(len(lines[s]) == 2 for s in range(37, 60))
    dropped = [p for p in truth.records("position") if p["dropout"]]
    assert len(dropped) == 7  # the truth keeps the true position through the dropout


def test_gnss_receiver_loop_emits_at_whole_seconds() -> None:
    async def run() -> list[tuple[int, str]]:
        clock = FakeClock(T0 + 250)
        gnss = GnssReceiver(Trajectory(EAST, 5.0), seed=1)
        out: list[tuple[int, str]] = []
        async for line in gnss.sentences(clock):
            out.append((clock.now_ms(), line))
            if len(out) == 10:
                return out
        return out

    out = asyncio.run(run())
    assert [t for t, _ in out[::2]] == [T0 + 1000 * k for k in range(1, 6)]
    assert out[0][1].startswith("$GNGGA,080001.00,")


def test_trajectory_follow_and_hold() -> None:
    motion = Trajectory(EAST, 10.0, start_ms=T0)
    assert distance_m(ORIGIN, motion.state(T0 + 60_000).position) == pytest.approx(600, rel=1e-3)
    here = motion.state(T0 + 60_000).position
    target = offset(here, 300.0, 0.0)
    motion.follow([target], 5.0, at_ms=T0 + 60_000)
    assert motion.state(T0 + 60_000).position == pytest.approx(here)
    state = motion.state(T0 + 90_000)
    assert distance_m(here, state.position) == pytest.approx(150, rel=1e-3)
    assert state.heading == pytest.approx(0.0, abs=0.1)
    assert state.speed == 5.0
    assert motion.state(T0 + 200_000).position == pytest.approx(target)
    assert motion.state(T0 + 200_000).speed == 0.0
    motion.hold(T0 + 70_000)  # legs after it are replaced
    assert motion.state(T0 + 200_000).position == pytest.approx(motion.state(T0 + 70_000).position)


# -- acoustic ----------------------------------------------------------------------------


def test_acoustic_detection_times_are_distance_over_343_plus_clock_error() -> None:
    truth = TruthLog()
    source = offset(ORIGIN, 120.0, -80.0)
    sensors = [
        AcousticSensor(offset(ORIGIN, 900 * math.sin(k), 900 * math.cos(k)), 1.0, seed=k, truth=truth, device=f"ac-{k}")
        for k in range(400)
    ]
    t_emit_ms = T0 + 12_345.678
    detections = gunshot(sensors, source, t_emit_ms, truth, label="shot-1")
    residual_ms = []
    for sensor in sensors:
        if sensor.device not in detections:
            continue
        expected_ns = t_emit_ms * 1e6 + distance_m(source, sensor.site) / SPEED_OF_SOUND_MPS * 1e9
        residual_ms.append((detections[sensor.device] - expected_ns) / 1e6)
        # the error is this sensor's fixed clock bias plus a small picking jitter
        assert residual_ms[-1] == pytest.approx(sensor.clock_bias_ms, abs=0.5)
    assert len(residual_ms) > 300
    assert statistics.fmean(residual_ms) == pytest.approx(0.0, abs=0.15)
    assert statistics.stdev(residual_ms) == pytest.approx(math.sqrt(1.0 + 0.1**2), rel=0.12)
    assert truth.records("impulse")[0]["t_emit_ns"] == round(t_emit_ms * 1e6)
    assert len(truth.records("detection")) == 400


def test_acoustic_perfect_clocks_give_exact_tdoa() -> None:
    source = offset(ORIGIN, 300.0, 200.0)
    sensors = [AcousticSensor(offset(ORIGIN, n, e), 0.0, seed=1, pick_jitter_ms=0.0) for n, e in
               [(0, 0), (800, 0), (0, 800), (-600, -600)]]
    times = [s.impulse(source, T0) for s in sensors]
    for sensor, t in zip(sensors, times, strict=True):
        assert t is not None
        assert t - T0 * 1_000_000 == pytest.approx(distance_m(source, sensor.site) / 343.0 * 1e9, abs=1)


def test_acoustic_range_and_event_body() -> None:
    sensor = AcousticSensor(ORIGIN, 1.0, seed=5, device="ac-1", range_m=1500)
    assert sensor.impulse(offset(ORIGIN, 1600.0, 0.0), T0) is None
    t_detect = sensor.impulse(offset(ORIGIN, 343.0, 0.0), T0)
    assert t_detect is not None
    assert sensor.due(T0 + 999) == []
    (reading,) = sensor.due(T0 + 1100)
    validate_body("event", reading.body)
    assert reading.body["type"] == "gunshot"
    assert (reading.body["lat"], reading.body["lon"]) == ORIGIN
    detail = reading.body["detail"]
    assert detail["t_detect_ns"] == t_detect
    assert 0 < detail["confidence"] <= 1
    assert 90 < detail["level_db"] < 110  # 150 dB - 20 log10(343 m)


# -- ANPR --------------------------------------------------------------------------------


def _plate(rng: random.Random) -> str:
    letters = "ABCDEFGHJKLMNOPRSTUVWXYZ"
    return "".join(rng.choice(letters) for _ in range(2)) + f"{rng.randrange(100):02d}" + "".join(
        rng.choice(letters) for _ in range(3)
    )


def test_anpr_misread_rate_and_lookalike_substitutions() -> None:
    truth = TruthLog()
    camera = AnprCamera(ORIGIN, 90.0, seed=21, truth=truth, device="anpr-1", misread_rate=0.02)
    rng = random.Random(1)
    passes = 20_000
    for k in range(passes):
        camera.vehicle_passes(_plate(rng), T0 + k * 1000, direction=270.0)
    records = truth.records("anpr_pass")
    wrong = [r for r in records if r["read"] != r["plate"]]
    assert len(wrong) / passes == pytest.approx(0.02, abs=0.004)
    assert camera.misreads == len(wrong)
    for r in wrong:
        plate, read = r["plate"], r["read"]
        if len(read) == len(plate):
            diffs = [(a, b) for a, b in zip(plate, read, strict=True) if a != b]
            assert 1 <= len(diffs) <= 2
            assert all(LOOKALIKES[a] == b for a, b in diffs)
        else:
            assert read == plate[:-1]
    readings = camera.due(T0 + passes * 1000)
    assert len(readings) == passes
    confidence = {True: [], False: []}  # type: dict[bool, list[float]]
    for reading, record in zip(readings, records, strict=True):
        validate_body("event", reading.body)
        detail = reading.body["detail"]
        assert detail["plate"] == record["read"]
        assert detail["direction"] == "approaching"  # driving west at a camera facing east
        confidence[record["read"] != record["plate"]].append(detail["confidence"])
    assert statistics.fmean(confidence[True]) < statistics.fmean(confidence[False]) - 0.1


def test_anpr_examples_and_misses() -> None:
    camera = AnprCamera(ORIGIN, 0.0, seed=1, misread_rate=1.0)
    assert camera.misread("AB12CDE") != "AB12CDE"
    assert camera.misread("HHH") == "HH"  # nothing looks like an H: the last character is lost
    assert camera.direction_of(10.0) == "receding"
    assert camera.direction_of(170.0) == "approaching"
    blind = AnprCamera(ORIGIN, 0.0, seed=1, miss_rate=1.0)
    assert blind.vehicle_passes("ab12 cde", T0) is None
    assert blind.due(T0 + 10_000) == []
    with pytest.raises(NotStarted):
        AnprCamera(ORIGIN, 0.0, seed=1).vehicle_passes("AB12CDE")


# -- IMU ---------------------------------------------------------------------------------


def test_man_down_only_after_the_no_movement_period() -> None:
    imu = Imu(seed=1, device="off-1", still_s=30.0, position=lambda: Fix(51.5, -0.12, 6.0))
    due = imu.fall(at_ms=T0)
    assert T0 + 30_000 <= due <= T0 + 31_000
    assert imu.due(T0 + 29_999) == []
    assert imu.due(due - 1) == []
    (reading,) = imu.due(due)
    validate_body("event", reading.body)
    assert reading.body["type"] == "man_down"
    assert reading.body["detail"]["impact_ts"] == T0
    assert (reading.body["lat"], reading.body["lon"], reading.body["acc"]) == (51.5, -0.12, 6.0)


def test_movement_within_the_window_cancels_man_down() -> None:
    truth = TruthLog()
    imu = Imu(seed=2, truth=truth, still_s=30.0)
    imu.fall(at_ms=T0)
    imu.move(at_ms=T0 + 29_000)
    imu.fall(at_ms=T0 + 100_000, recover_after_s=5.0)
    imu.fall(at_ms=T0 + 200_000)
    imu.move(at_ms=T0 + 199_000)  # before that fall: no effect
    imu.move(at_ms=T0 + 240_000)  # after its window: too late, it was raised
    readings = imu.due(T0 + 400_000)
    assert [r.body["detail"]["impact_ts"] for r in readings] == [T0 + 200_000]
    assert len(truth.records("recovered")) == 2


def test_crash_detection_threshold() -> None:
    imu = Imu(seed=3, crash_threshold_g=3.0)
    assert imu.crash(0.9, at_ms=T0) is False  # hard braking
    assert imu.crash(12.0, at_ms=T0 + 5_000) is True
    (reading,) = imu.due(T0 + 10_000)
    validate_body("event", reading.body)
    assert reading.body["type"] == "crash"
    assert reading.body["detail"]["decel_g"] == pytest.approx(12.0, rel=0.2)


# -- body sensors, vehicle, health -------------------------------------------------------


def test_heart_rate_rest_exertion_and_recovery() -> None:
    body = BodySensors(seed=4, resting_bpm=70.0, max_bpm=180.0)
    rest = [body.sensors(T0 + s * 1000)["heart_rate"] for s in range(0, 120)]
    assert statistics.fmean(rest) == pytest.approx(70, abs=3)
    body.exertion(0.8, at_ms=T0 + 120_000)
    hard = [body.heart_rate(T0 + s * 1000) for s in range(120, 360)]
    assert hard[5] < 120  # it takes time to rise
    assert hard[-1] == pytest.approx(70 + 0.8 * 110, abs=3)  # ~150
    body.exertion(0.0, at_ms=T0 + 360_000)
    assert body.heart_rate(T0 + 660_000) < 80


def test_walking_and_stress_raise_heart_rate() -> None:
    walking = BodySensors(seed=1, resting_bpm=65.0, speed=lambda t: 1.4)
    running = BodySensors(seed=1, resting_bpm=65.0, speed=lambda t: 4.0)
    assert 65 < walking.heart_rate(T0 + 300_000) < running.heart_rate(T0 + 300_000)
    stressed = BodySensors(seed=1, resting_bpm=65.0)
    stressed.heart_rate(T0)
    stressed.press_panic(at_ms=T0)
    assert stressed.heart_rate(T0 + 60_000) > 80


def test_panic_holster_and_bodycam_events() -> None:
    truth = TruthLog()
    body = BodySensors(seed=5, truth=truth, device="off-1", position=lambda: Fix(51.5, -0.12, 5.0))
    body.press_panic(at_ms=T0)
    body.holster_draw(at_ms=T0 + 10_000)
    readings = body.due(T0 + 20_000)
    types = [r.body["type"] for r in readings]
    assert types == ["panic", "holster_draw", "bodycam_on"]
    for r in readings:
        validate_body("event", r.body)
        assert (r.body["lat"], r.body["lon"]) == (51.5, -0.12)
    assert readings[2].body["detail"] == {"trigger": "holster"}
    sensors = body.sensors(T0 + 20_000)
    assert (sensors["holster"], sensors["bodycam"]) == ("drawn", "recording")
    # a dropout blanks the sensors and loses the events it covers
    body.drop_out(60, at_ms=T0 + 30_000)
    body.press_panic(at_ms=T0 + 40_000)
    assert body.due(T0 + 50_000) == []
    assert body.sensors(T0 + 50_000) == {}
    assert truth.records("suppressed")[0]["type"] == "panic"


def test_vehicle_unit_and_device_health() -> None:
    vehicle = VehicleUnit(seed=1, device="veh-1", speed=lambda t: 10.0, battery=50.0)
    s = vehicle.sensors(T0)
    assert (s["ignition"], s["blue_lights"], s["vehicle_speed"]) == (True, False, pytest.approx(10.0, rel=0.011))
    vehicle.blue_lights(True, at_ms=T0 + 1000)
    vehicle.ignition(False, at_ms=T0 + 3_600_000)
    assert vehicle.sensors(T0 + 2000)["blue_lights"] is True
    assert vehicle.sensors(T0 + 3_600_000)["battery"] == pytest.approx(70.0, abs=0.1)  # charged 1 h
    off = vehicle.sensors(T0 + 7_200_000)
    assert (off["ignition"], off["vehicle_speed"], off["battery"]) == (False, 0.0, pytest.approx(67.0, abs=0.1))
    assert 10 < off["temperature"] < 40

    health = DeviceHealth(seed=2, device="ac-1", mains=True, site=ORIGIN, heartbeat_s=60.0, state="online")
    health.on_start(T0)
    readings = health.due(T0 + 125_000)
    assert [r.kind for r in readings] == ["status", "telemetry", "telemetry", "telemetry"]
    assert readings[0].body["firmware"].startswith("bluelight-sim/")
    for r in readings:
        validate_body(r.kind, r.body)
    assert readings[1].body["sensors"]["battery"] == 100.0
    health.tamper(at_ms=T0 + 130_000)
    (tamper,) = health.due(T0 + 131_000)
    assert tamper.body["type"] == "tamper"
    assert (tamper.body["lat"], tamper.body["lon"]) == ORIGIN


# -- assembled units through their drivers ------------------------------------------------


async def _run_drivers(drivers: Sequence[Driver], clock: StepClock, seconds: int) -> list[tuple[int, Reading]]:
    out: list[tuple[int, Reading]] = []

    async def pump(driver: Driver) -> None:
        async for reading in driver.readings(clock):
            validate_body(reading.kind, reading.body)
            out.append((clock.now_ms(), reading))

    end = clock.now_ms() + seconds * 1000
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(pump(d)) for d in drivers]
        await clock.run_until(end)
        for task in tasks:
            task.cancel()
    return out


async def test_officer_unit_end_to_end_through_the_nmea_driver() -> None:
    city = City.builtin()
    truth = TruthLog()
    loop = city.patrol_route(random.Random(1), 2000)
    clock = StepClock()
    unit = officer_drivers("off-1", loop, seed=7, truth=truth, tunnels=city.tunnels)
    assert unit.body is not None
    assert unit.imu is not None
    unit.body.press_panic(at_ms=T0 + 30_000)
    unit.imu.fall(at_ms=T0 + 60_000)
    out = await _run_drivers(unit.drivers, clock, 180)
    kinds = [r.kind for _, r in out]
    assert kinds.count("status") == 1
    assert 170 <= kinds.count("telemetry") <= 181
    events = [(t, r.body) for t, r in out if r.kind == "event"]
    assert [b["type"] for _, b in events] == ["panic", "man_down"]
    assert events[0][0] == T0 + 30_000
    assert events[1][0] >= T0 + 90_000
    # the event carries the device's own last fix, near the true position
    assert unit.gnss is not None
    assert distance_m((events[0][1]["lat"], events[0][1]["lon"]), unit.gnss.true_state(T0 + 30_000).position) < 60
    telemetry = [r.body for _, r in out if r.kind == "telemetry"]
    assert {"battery", "temperature", "heart_rate", "holster", "bodycam"} <= telemetry[-1]["sensors"].keys()
    assert len(truth.records("position")) >= 180


async def test_a_trigger_wakes_a_waiting_driver() -> None:
    clock = FakeClock()
    unit = anpr_drivers("anpr-1", ORIGIN, 90.0, seed=1, heartbeat_s=None)
    assert unit.anpr is not None
    readings = unit.anpr.readings(clock)
    waiting = asyncio.ensure_future(anext(readings))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    unit.anpr.vehicle_passes("AB12CDE")  # "now" on the driver's clock
    reading = await asyncio.wait_for(waiting, 5)
    assert reading.body["type"] == "anpr_read"
    await readings.aclose()


async def _units_run(seed: int) -> tuple[list[tuple[int, Reading]], list[dict[str, object]]]:
    city = City.builtin()
    truth = TruthLog()
    clock = StepClock()
    rng = random.Random(seed)
    veh = vehicle_drivers("veh-1", city.patrol_route(rng, 4000), seed=seed, truth=truth, tunnels=city.tunnels)
    ac = acoustic_drivers("ac-1", city.random_node(rng), seed=seed, truth=truth)
    assert veh.imu is not None
    assert ac.acoustic is not None
    veh.imu.crash(9.0, at_ms=T0 + 20_000)
    ac.acoustic.impulse(city.random_node(rng), T0 + 40_000)
    out = await _run_drivers([*veh.drivers, *ac.drivers], clock, 90)
    return sorted(out, key=lambda x: (x[0], repr(x[1]))), truth.records()


async def test_same_seed_same_run() -> None:
    first, second, other = await _units_run(5), await _units_run(5), await _units_run(6)
    assert first == second
    assert first[0] != other[0]
    assert first[1] != other[1]


def test_sub_seeds_are_stable_and_distinct() -> None:
    assert sub_seed(1, "veh-1", "gnss") == sub_seed(1, "veh-1", "gnss")
    seeds = {sub_seed(s, d, m) for s in range(3) for d in ("a", "b") for m in ("gnss", "imu")}
    assert len(seeds) == 12


def test_truth_log_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "truth.jsonl"
    with TruthLog(path) as truth:
        truth.record(T0, "position", device="veh-1", lat=51.5, lon=-0.12)
        truth.record(T0 + 1, "fall", device="off-1")
        assert [r["kind"] for r in truth.records()] == ["position", "fall"]
    assert path.read_text().count("\n") == 2
    with TruthLog(path, append=True) as again:
        assert again.records("fall") == [{"t_ms": T0 + 1, "kind": "fall", "device": "off-1"}]


def test_each_device_gets_its_own_gnss_epoch_phase() -> None:
    from firmware_sim.fleet import unit_routes  # noqa: PLC0415
    from firmware_sim.kit import build_kit  # noqa: PLC0415
    from firmware_sim.scenario import load_scenario  # noqa: PLC0415

    fleet = load_scenario("fleet-scale", devices=20)
    routes = unit_routes(fleet)
    phases = []
    for spec in fleet.units:
        gnss = build_kit(spec, route=routes[spec.id], truth=None, city=fleet.city).unit.gnss
        assert gnss is not None
        assert 0 <= gnss.phase_ms < gnss.period_ms
        phases.append(gnss.phase_ms)
    assert len(set(phases)) > 15  # spread over the second, and the same on every run
    again = build_kit(fleet.units[0], route=routes[fleet.units[0].id], truth=None, city=fleet.city).unit.gnss
    assert again is not None
    assert again.phase_ms == phases[0]
