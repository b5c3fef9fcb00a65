"""Simulated drivers: route geometry, noise statistics, the GPS and panic loops."""

from __future__ import annotations

import itertools
import math
import random
import statistics

import pytest

from edge_agent.drivers import Reading
from edge_agent.drivers.gps import LONDON_LOOP, Fix, Route, SimulatedGps, initial_noise, noise_step, position_at
from edge_agent.drivers.panic import SimulatedPanicButton
from edge_agent.wire.geo import bearing_deg, displacement_m, distance_m, offset
from edge_agent.wire.model import validate_body


class FakeClock:
    """Time that advances only when someone sleeps: a run of hours takes milliseconds."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self.ms = start_ms

    def now_ms(self) -> int:
        return self.ms

    async def sleep(self, seconds: float) -> None:
        self.ms += round(seconds * 1000)


def test_distance_and_bearing_on_known_points() -> None:
    # One degree of latitude is ~111.2 km; due north is 0, due east ~90.
    assert distance_m((51.0, 0.0), (52.0, 0.0)) == pytest.approx(111_195, rel=1e-3)
    assert bearing_deg((51.0, 0.0), (52.0, 0.0)) == pytest.approx(0.0, abs=1e-9)
    assert bearing_deg((51.0, 0.0), (51.0, 0.01)) == pytest.approx(90.0, abs=0.01)
    assert bearing_deg((51.0, 0.0), (50.9, 0.0)) == pytest.approx(180.0)
    assert bearing_deg((51.0, 0.0), (51.0, -0.01)) == pytest.approx(270.0, abs=0.01)


def test_offset_and_displacement_round_trip() -> None:
    start = (51.5, -0.12)
    moved = offset(start, 30.0, -40.0)
    assert distance_m(start, moved) == pytest.approx(50.0, rel=1e-3)
    assert displacement_m(start, moved) == pytest.approx((30.0, -40.0), abs=1e-6)


def test_route_is_a_closed_loop_through_its_waypoints() -> None:
    route = Route(LONDON_LOOP)
    assert 3_000 < route.length_m < 4_000
    assert route.at(0.0)[:2] == pytest.approx(LONDON_LOOP[0])
    assert route.at(route.length_m)[:2] == pytest.approx(LONDON_LOOP[0])
    first_leg = distance_m(LONDON_LOOP[0], LONDON_LOOP[1])
    assert route.at(first_leg)[:2] == pytest.approx(LONDON_LOOP[1], abs=1e-9)
    lat, lon, heading = route.at(first_leg / 2)
    assert distance_m(LONDON_LOOP[0], (lat, lon)) == pytest.approx(first_leg / 2, rel=1e-3)
    assert heading == pytest.approx(bearing_deg(LONDON_LOOP[0], LONDON_LOOP[1]))


def test_route_rejects_bad_waypoints() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        Route(((51.5, -0.1),))
    with pytest.raises(ValueError, match="WGS84"):
        Route(((95.0, 0.0), (51.0, 0.0)))
    with pytest.raises(ValueError, match="length"):
        Route(((51.0, 0.0), (51.0, 0.0)))


def test_position_moves_at_the_set_speed_and_heading_follows_the_leg() -> None:
    route = Route(LONDON_LOOP)
    speed = 10.0
    positions = [position_at(route, speed, t) for t in range(0, 600)]
    for (lat1, lon1, heading), (lat2, lon2, _) in itertools.pairwise(positions):
        step = distance_m((lat1, lon1), (lat2, lon2))
        assert step <= speed * 1.001  # a corner cuts the straight-line step short
        assert 0.0 <= heading < 360.0
    straight = [distance_m(a[:2], b[:2]) for a, b in itertools.pairwise(positions) if a[2] == b[2]]
    assert statistics.median(straight) == pytest.approx(speed, rel=1e-3)
    # Heading on each step agrees with the bearing of the step itself.
    for a, b in itertools.pairwise(positions[:51]):
        if a[2] == b[2]:
            assert bearing_deg(a[:2], b[:2]) == pytest.approx(a[2], abs=0.5)


def test_white_noise_statistics() -> None:
    rng = random.Random(42)
    sigma = 5.0
    errors = [noise_step((0.0, 0.0), sigma, 1.0, 0.0, rng) for _ in range(20_000)]
    for axis in (0, 1):
        values = [e[axis] for e in errors]
        assert statistics.fmean(values) == pytest.approx(0.0, abs=0.15)
        rms = math.sqrt(statistics.fmean(v * v for v in values))
        assert rms == pytest.approx(sigma, rel=0.03)


def test_correlated_noise_keeps_sigma_and_wanders_smoothly() -> None:
    rng = random.Random(7)
    sigma = 5.0
    error = initial_noise(sigma, rng)
    errors = [error]
    for _ in range(40_000):
        error = noise_step(error, sigma, 1.0, 5.0, rng)
        errors.append(error)
    north = [e[0] for e in errors]
    assert statistics.fmean(north) == pytest.approx(0.0, abs=0.3)
    assert math.sqrt(statistics.fmean(v * v for v in north)) == pytest.approx(sigma, rel=0.05)
    # Lag-1 autocorrelation is exp(-dt/tau) for a Gauss-Markov process.
    lag1 = statistics.correlation(north[:-1], north[1:])
    assert lag1 == pytest.approx(math.exp(-1 / 5.0), abs=0.03)


async def test_simulated_gps_emits_valid_noisy_telemetry_at_its_rate() -> None:
    clock = FakeClock()
    route = Route(LONDON_LOOP)
    gps = SimulatedGps(route, speed_mps=8.0, rate_hz=2.0, sigma_m=5.0, correlation_s=0.0, seed=1)
    readings: list[tuple[int, Reading]] = []
    async for reading in gps.readings(clock):
        readings.append((clock.now_ms(), reading))
        if len(readings) == 2000:
            break
    times = [t for t, _ in readings]
    assert {b - a for a, b in itertools.pairwise(times)} == {500}
    errors = []
    for t, reading in readings:
        assert reading.kind == "telemetry"
        validate_body("telemetry", reading.body)
        body = reading.body
        assert body["fix"] == "3d"
        assert body["acc"] == 5.0
        assert body["speed"] == 8.0
        assert 0 <= body["sensors"]["battery"] <= 100
        true = position_at(route, 8.0, (t - times[0]) / 1000)
        errors.append(displacement_m(true[:2], (body["lat"], body["lon"])))
        assert body["heading"] == pytest.approx(true[2], abs=0.06)
    north = [e[0] for e in errors]
    assert statistics.fmean(north) == pytest.approx(0.0, abs=0.4)
    assert math.sqrt(statistics.fmean(v * v for v in north)) == pytest.approx(5.0, rel=0.06)
    assert gps.last_fix == Fix(readings[-1][1].body["lat"], readings[-1][1].body["lon"], 5.0)


async def test_same_seed_same_run() -> None:
    async def run(seed: int) -> list[Reading]:
        out = []
        async for reading in SimulatedGps(seed=seed).readings(FakeClock()):
            out.append(reading)
            if len(out) == 20:
                return out
        return out

    assert await run(3) == await run(3)
    assert await run(3) != await run(4)


async def test_panic_button_presses_and_schedule() -> None:
    clock = FakeClock()
    fix = Fix(51.5, -0.12, 5.0)
    button = SimulatedPanicButton(at_s=(30.0,), position=lambda: fix)
    start = clock.now_ms()
    readings = button.readings(clock)
    button.press()
    first = await anext(readings)
    assert first == Reading(
        "event", {"type": "panic", "detail": {"source": "button"}, "lat": 51.5, "lon": -0.12, "acc": 5.0}
    )
    second = await anext(readings)
    assert second.body["detail"] == {"source": "schedule"}
    assert clock.now_ms() - start == 30_000
    assert button.pressed == 2
    validate_body("event", second.body)
    await readings.aclose()


async def test_panic_without_a_fix_has_no_position() -> None:
    button = SimulatedPanicButton()
    readings = button.readings(FakeClock())
    button.press()
    assert (await anext(readings)).body == {"type": "panic", "detail": {"source": "button"}}
    await readings.aclose()
