"""The fusion core: Kalman track, gunshot multilateration, ANPR hotlist and sightings,
geofences. Pure and fast; the simulator's models give realistic inputs."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.wire.geo import bearing_deg, distance_m, offset
from firmware_sim.models.acoustic import AcousticSensor, gunshot
from firmware_sim.models.anpr import LOOKALIKES
from gateway.core.anpr import Hotlist, HotlistEntry, HotlistError, PlateSightings, Sighting
from gateway.core.geofence import GeofenceError, GeofenceMonitor, Polygon, Zone
from gateway.core.multilat import DegenerateGeometry, Detection, TooFewDetections, locate
from gateway.core.track import STALE_AFTER_MS, BadFix, StreetMap, Track

T0 = 1_760_000_000_000
HOME = (51.5, -0.12)


# -- track ----------------------------------------------------------------------
def gm_noise(rng: random.Random, n: int, sigma: float, tau_s: float) -> list[tuple[float, float]]:
    """Gauss-Markov (north, east) errors at 1 Hz, per-axis sigma."""
    a = math.exp(-1.0 / tau_s)
    e = (rng.gauss(0, sigma), rng.gauss(0, sigma))
    out = []
    for _ in range(n):
        w = math.sqrt(1 - a * a) * sigma
        e = (a * e[0] + w * rng.gauss(0, 1), a * e[1] + w * rng.gauss(0, 1))
        out.append(e)
    return out


def path(kind: str, n: int, speed: float) -> list[tuple[tuple[float, float], float]]:
    """(true position, heading) each second: a straight line or a constant-rate turn."""
    out = []
    pos = HOME
    heading = 60.0
    for _ in range(n):
        out.append((pos, heading))
        if kind == "turn":
            heading = (heading + 3.0) % 360.0
        h = math.radians(heading)
        pos = offset(pos, speed * math.cos(h), speed * math.sin(h))
    return out


def rms(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values))


@pytest.mark.parametrize("kind", ["straight", "turn"])
def test_track_beats_raw_fixes(kind: str) -> None:
    rng = random.Random(7)
    n, speed = 300, 9.0
    truth = path(kind, n, speed)
    noise = gm_noise(rng, n, 8.0 / 1.51, 20.0)
    track = Track("van-1")
    raw, filtered = [], []
    for k, ((pos, heading), (dn, de)) in enumerate(zip(truth, noise, strict=True)):
        fix = offset(pos, dn, de)
        track.update(*fix, T0 + k * 1000, acc_m=8.0, speed=speed + rng.gauss(0, 0.15),
                     heading=heading + rng.gauss(0, 1.0))
        if k >= 20:
            raw.append(distance_m(pos, fix))
            filtered.append(distance_m(pos, track.estimate(T0 + k * 1000).position))
    assert rms(filtered) < 0.7 * rms(raw)


def test_track_without_velocity_is_no_worse_than_raw() -> None:
    rng = random.Random(3)
    n = 300
    truth = path("straight", n, 1.4)
    noise = gm_noise(rng, n, 8.0 / 1.51, 20.0)
    track = Track("off-1")
    raw, filtered = [], []
    for k, ((pos, _), (dn, de)) in enumerate(zip(truth, noise, strict=True)):
        fix = offset(pos, dn, de)
        track.update(*fix, T0 + k * 1000, acc_m=8.0)
        if k >= 20:
            raw.append(distance_m(pos, fix))
            filtered.append(distance_m(pos, track.estimate(T0 + k * 1000).position))
    assert rms(filtered) < 1.05 * rms(raw)
    est = track.estimate(T0 + n * 1000)
    assert est.speed_mps == pytest.approx(1.4, abs=0.6)


def test_a_40_m_jump_for_5_s_is_gated() -> None:
    track = Track("van-1")
    speed, heading = 9.0, 90.0
    pos = HOME
    errors_during_jump = []
    for k in range(60):
        t = T0 + k * 1000
        fix = offset(pos, 40.0, 0.0) if 30 <= k < 35 else pos
        accepted = track.update(*fix, t, acc_m=5.0, speed=speed, heading=heading)
        if 30 <= k < 35:
            assert not accepted
            errors_during_jump.append(distance_m(pos, track.estimate(t).position))
        elif k > 36:
            assert accepted
        pos = offset(pos, 0.0, speed)
    assert max(errors_during_jump) < 5.0
    assert track.counts.gated == 5
    assert track.counts.reinitialised == 0


def test_turn_without_velocity_is_followed() -> None:
    """A 90-degree turn at a junction with position-only fixes: the manoeuvre restart
    (or the gate) keeps the track on the unit, not running straight on."""
    track = Track("van-2")
    pos, heading = HOME, 0.0
    for k in range(80):
        if k == 40:
            heading = 90.0
        track.update(*pos, T0 + k * 1000, acc_m=5.0)
        h = math.radians(heading)
        pos = offset(pos, 9.0 * math.cos(h), 9.0 * math.sin(h))
    est = track.estimate(T0 + 79 * 1000)
    assert distance_m(est.position, offset(pos, -9.0 * math.cos(h), -9.0 * math.sin(h))) < 10.0
    assert est.heading_deg is not None
    assert abs(est.heading_deg - 90.0) < 15.0


def test_track_never_stuck_after_a_real_jump() -> None:
    track = Track("off-2")
    for k in range(30):
        track.update(*HOME, T0 + k * 1000, acc_m=4.0, speed=0.0)
    moved = offset(HOME, 300.0, 0.0)
    for k in range(30, 60):
        track.update(*moved, T0 + k * 1000, acc_m=4.0, speed=0.0)
    assert distance_m(track.estimate(T0 + 60_000).position, moved) < 5.0
    assert track.counts.reinitialised == 1


def test_stale_late_and_bad_fixes() -> None:
    track = Track("off-3")
    with pytest.raises(LookupError):
        track.estimate(T0)
    assert track.update(*HOME, T0, acc_m=5.0)
    assert track.update(*HOME, T0 + 1000)
    assert not track.update(*HOME, T0 + 500)  # out of order
    assert track.counts.late == 1
    assert not track.estimate(T0 + 1000 + STALE_AFTER_MS).stale
    stale = track.estimate(T0 + 1001 + STALE_AFTER_MS)
    assert stale.stale
    assert stale.age_ms == STALE_AFTER_MS + 1
    assert stale.sigma_m > track.estimate(T0 + 1000).sigma_m
    for bad in ({"acc_m": -1.0}, {"speed": math.nan}, {"heading": math.inf}):
        with pytest.raises(BadFix):
            track.update(*HOME, T0 + 5000, **bad)
    with pytest.raises(BadFix):
        track.update(91.0, 0.0, T0 + 5000)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(-30, 30), st.floats(-30, 30), st.integers(1, 5000)), min_size=1, max_size=40))
def test_track_estimate_always_valid(steps: list[tuple[float, float, int]]) -> None:
    track = Track("any")
    t = T0
    for dn, de, dt in steps:
        t += dt
        track.update(*offset(HOME, dn, de), t, acc_m=6.0)
        est = track.estimate(t)
        assert distance_m(est.position, HOME) < 1000.0
        assert est.sigma_m > 0.0


def test_street_map_snaps_onto_the_street_along_the_heading() -> None:
    a, b = HOME, offset(HOME, 0.0, 500.0)  # an east-west street
    c = offset(HOME, 0.0, 250.0)
    cross = (offset(c, -200.0, 0.0), offset(c, 200.0, 0.0))  # a north-south street at c
    streets = StreetMap([(a, b), cross])
    near_junction = offset(c, 6.0, 4.0)
    east_west = streets.snap(*near_junction, heading_deg=90.0)
    assert east_west is not None
    assert east_west.moved_m == pytest.approx(6.0, abs=0.1)
    north_south = streets.snap(*near_junction, heading_deg=0.0)
    assert north_south is not None
    assert north_south.moved_m == pytest.approx(4.0, abs=0.1)
    assert streets.snap(*offset(HOME, 300.0, 0.0)) is None


# -- multilateration ----------------------------------------------------------------
SITES = [offset(HOME, n, e) for n, e in ((400, -300), (-350, -400), (-300, 450), (420, 380), (0, 600), (-600, 0))]


def detections(source: tuple[float, float], sites: list[tuple[float, float]], *, noise_ms: float = 0.0,
               seed: int = 1) -> list[Detection]:
    rng = random.Random(seed)
    t_emit = T0 * 1_000_000
    return [
        Detection(f"ac-{i}", *site,
                  t_emit + round((distance_m(source, site) / 343.0 + rng.gauss(0, noise_ms / 1000)) * 1e9))
        for i, site in enumerate(sites)
    ]


@pytest.mark.parametrize("count", [3, 4, 6])
def test_multilat_exact_with_perfect_times(count: int) -> None:
    source = offset(HOME, 120.0, -80.0)
    fix = locate(detections(source, SITES[:count]))
    assert distance_m(source, (fix.lat, fix.lon)) < 0.05
    assert abs(fix.t0_ns - T0 * 1_000_000) < 100_000  # 0.1 ms: the local plane is flat
    assert fix.residual_m < 0.01
    assert len(fix.sensors) == count


def test_multilat_within_metres_with_1_ms_noise_and_honest_uncertainty() -> None:
    rng = random.Random(5)
    inside = 0
    for trial in range(40):
        source = offset(HOME, rng.uniform(-300, 300), rng.uniform(-300, 300))
        fix = locate(detections(source, SITES[:5], noise_ms=1.0, seed=trial))
        error = distance_m(source, (fix.lat, fix.lon))
        assert error < 5.0
        inside += error <= fix.uncertainty_m
    assert inside >= 34  # ~95% radius


def test_multilat_with_the_simulated_sensors() -> None:
    rng = random.Random(11)
    source = offset(HOME, 50.0, 70.0)
    sensors = [AcousticSensor(site, 1.0, seed=rng.getrandbits(32), device=f"ac-{i}") for i, site in enumerate(SITES)]
    heard = gunshot(sensors, source, float(T0))
    fix = locate([Detection(s.device, *s.site, heard[s.device]) for s in sensors if s.device in heard])
    assert distance_m(source, (fix.lat, fix.lon)) < 5.0


def test_multilat_errors() -> None:
    source = offset(HOME, 100.0, 0.0)
    with pytest.raises(TooFewDetections):
        locate(detections(source, SITES[:2]))
    dets = detections(source, SITES[:3])
    with pytest.raises(TooFewDetections):
        locate([dets[0], dets[1], Detection("ac-0", dets[0].lat, dets[0].lon, dets[0].t_ns + 5)])
    line = [offset(HOME, 0.0, e) for e in (-500.0, 0.0, 300.0, 700.0)]
    with pytest.raises(DegenerateGeometry):
        locate(detections(source, line))
    with pytest.raises(ValueError):
        Detection("ac-1", 91.0, 0.0, 1)


# -- ANPR --------------------------------------------------------------------------------
def hotlist() -> Hotlist:
    return Hotlist.from_records([
        {"plate": "ab12 cde", "reason": "stolen vehicle", "expires_ts": T0 + 3_600_000, "markers": "stolen"},
        {"plate": "XY05 OSB", "reason": "firearms", "expires_ts": T0 + 3_600_000, "priority": 1,
         "markers": ["Armed", "violent"]},
        {"plate": "OLD 1", "reason": "expired warrant", "expires_ts": T0 - 1},
    ])


def test_hotlist_exact_fuzzy_and_expired() -> None:
    hl = hotlist()
    [exact] = hl.match("AB12CDE", T0, confidence=0.9)
    assert exact.exact
    assert exact.confidence == 0.9
    assert exact.entry.markers == frozenset({"stolen"})
    [fuzzy] = hl.match("XY05 0SB", T0, confidence=0.9)  # O read as 0
    assert not fuzzy.exact
    assert fuzzy.substitutions == 1
    assert fuzzy.confidence < 0.9
    assert fuzzy.entry.markers == frozenset({"armed", "violent"})
    assert hl.match("XY0S 0SB", T0) == []  # two look-alikes: over the limit of one
    assert Hotlist(hl_entries(), max_substitutions=2).match("XY0S0SB", T0)[0].substitutions == 2
    assert hl.match("AB12CDX", T0) == []  # E/X are not look-alikes
    assert hl.match("OLD1", T0) == []  # expired
    assert hl.match("AB12CDE", T0 + 3_600_000) == []  # expires_ts is exclusive


def hl_entries() -> list[HotlistEntry]:
    return [HotlistEntry("XY05OSB", "firearms", T0 + 1000)]


def test_hotlist_get_remove_iterate_and_records_round_trip() -> None:
    hl = hotlist()
    assert [e.plate for e in hl] == ["AB12CDE", "OLD1", "XY05OSB"]
    assert hl.get("xy05 osb") is not None
    assert Hotlist.from_records([e.as_record() for e in hl]).get("XY05OSB") == hl.get("XY05OSB")
    removed = hl.remove("xy05-osb")
    assert (removed.plate, len(hl), hl.get("XY05OSB")) == ("XY05OSB", 2, None)
    assert hl.match("XY05 0SB", T0) == []  # gone from the look-alike index too
    with pytest.raises(KeyError):
        hl.remove("XY05OSB")
    hl.add(removed)
    assert hl.match("XY05 0SB", T0)[0].entry is removed


def test_hotlist_rejects_bad_records() -> None:
    with pytest.raises(HotlistError, match="entry 1: missing field 'reason'"):
        Hotlist.from_records([{"plate": "A1", "reason": "x", "expires_ts": 1}, {"plate": "B2", "expires_ts": 1}])
    with pytest.raises(HotlistError):
        Hotlist.from_records([{"plate": " - ", "reason": "x", "expires_ts": 1}])
    with pytest.raises(HotlistError):
        Hotlist.from_records([{"plate": "A1", "reason": "x", "expires_ts": "soon"}])


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="ABCDEFGHJKLMNOPRSTUVWXYZ0123456789", min_size=2, max_size=8), st.data())
def test_any_single_lookalike_misread_matches(plate: str, data: st.DataObject) -> None:
    positions = [i for i, c in enumerate(plate) if c in LOOKALIKES]
    hl = Hotlist([HotlistEntry(plate, "wanted", T0 + 1)])
    if positions:
        i = data.draw(st.sampled_from(positions))
        misread = plate[:i] + LOOKALIKES[plate[i]] + plate[i + 1 :]
        hits = hl.match(misread, T0)
        assert len(hits) == 1
        assert hits[0].exact is (misread == plate)
    assert hl.match(plate, T0)[0].exact


def test_sightings_predict_from_two_and_from_one() -> None:
    log = PlateSightings()
    assert log.predict("AB12CDE", T0) is None
    log.add(Sighting("AB12 CDE", *HOME, T0, camera_heading_deg=270.0, direction="approaching"))
    one = log.predict("AB12CDE", T0 + 10_000)
    assert one is not None
    assert one.basis == "one_sighting"
    assert one.course_deg == pytest.approx(90.0)  # approaching a camera facing west: driving east
    assert distance_m(HOME, (one.lat, one.lon)) == pytest.approx(130.0, rel=0.01)
    second = offset(HOME, 300.0, 400.0)  # 500 m in 50 s: 10 m/s
    log.add(Sighting("AB12CDE", *second, T0 + 50_000))
    two = log.predict("AB12CDE", T0 + 80_000)
    assert two is not None
    assert two.basis == "two_sightings"
    assert two.speed_mps == pytest.approx(10.0, rel=0.01)
    assert two.course_deg == pytest.approx(bearing_deg(HOME, second), abs=0.1)
    assert distance_m(second, (two.lat, two.lon)) == pytest.approx(300.0, rel=0.01)
    assert two.radius_m > one.radius_m
    assert log.last("ab12 cde") == Sighting("AB12CDE", *second, T0 + 50_000)


# -- geofences -----------------------------------------------------------------------
SQUARE = Polygon(tuple(offset(HOME, n, e) for n, e in ((0, 0), (0, 200), (200, 200), (200, 0), (0, 0))))


def test_polygon_contains_and_validation() -> None:
    assert len(SQUARE.points) == 4  # the closing point is dropped
    assert SQUARE.contains(offset(HOME, 100, 100))
    assert not SQUARE.contains(offset(HOME, 100, 210))
    assert not SQUARE.contains(offset(HOME, -5, 100))
    corners = ((0, 0), (0, 200), (100, 200), (100, 100), (200, 100), (200, 0))
    l_shape = Polygon(tuple(offset(HOME, n, e) for n, e in corners))
    assert not l_shape.contains(offset(HOME, 150, 150))
    assert l_shape.contains(offset(HOME, 150, 50))
    with pytest.raises(GeofenceError):
        Polygon((HOME, offset(HOME, 0, 10), HOME))
    with pytest.raises(GeofenceError):
        Polygon((HOME, offset(HOME, 0, 10), offset(HOME, 0, 20)))  # collinear
    with pytest.raises(GeofenceError):
        Zone("z", SQUARE, "exclusion")  # nobody monitored


def test_exclusion_breach_reported_once_with_hysteresis() -> None:
    monitor = GeofenceMonitor([Zone("school", SQUARE, "exclusion", monitored=frozenset({"tag-7"}))])
    events = []
    # approach, cross the edge, jitter around it (GNSS noise), then leave for good
    track = [(-30, 100), (-5, 100), (3, 100), (-4, 100), (5, 100), (-15, 100), (50, 100), (-20, 100), (-40, 100)]
    for k, (n, e) in enumerate(track):
        events += monitor.observe("tag-7", *offset(HOME, n, e), T0 + k * 1000)
    assert [(ev.kind, ev.t_ms) for ev in events] == [("breach", T0 + 2000), ("left", T0 + 8000)]
    assert monitor.observe("someone-else", *offset(HOME, 100, 100), T0) == []


def test_coverage_gap_and_recovery() -> None:
    monitor = GeofenceMonitor([Zone("centre", SQUARE, "coverage", min_units=2)])
    inside, outside = offset(HOME, 100, 100), offset(HOME, 500, 500)
    first = monitor.coverage({"van-1": inside}, T0)
    assert [(e.kind, e.units_inside) for e in first] == [("coverage_gap", 1)]
    assert monitor.coverage({"van-1": inside}, T0 + 1000) == []  # still short: not repeated
    restored = monitor.coverage({"van-1": inside, "van-2": inside}, T0 + 2000)
    assert [(e.kind, e.units_inside) for e in restored] == [("coverage_restored", 2)]
    assert monitor.coverage({"van-1": inside, "van-2": offset(HOME, 100, 210)}, T0 + 3000) == []  # margin
    gap = monitor.coverage({"van-1": inside, "van-2": outside}, T0 + 4000)
    assert [e.kind for e in gap] == ["coverage_gap"]
    assert monitor.gaps == frozenset({"centre"})
    assert monitor.coverage({"van-1": inside}, T0 + 5000) == []
