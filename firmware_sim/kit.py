"""A device's kit: the sensor-model drivers a simulated device runs (`firmware_sim.models`)
and the handles the fleet's timeline pulls (press panic, fall, crash, hear a shot, see a
plate, lose GNSS, drop out).

An officer carries a GNSS receiver (NMEA, parsed by the agent's real `NmeaGps` driver),
body sensors and an IMU; a vehicle a GNSS receiver, the vehicle unit and an IMU; a
tracker a GNSS receiver and its device health; fixed sites an acoustic sensor or an ANPR
camera with device health. Every trigger is given its scheduled sim time (`at_ms`), so
a run is reproducible from its seed. Triggers return a short text saying what they did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edge_agent.drivers import Clock, Driver
from edge_agent.drivers.nmea import NmeaGps
from edge_agent.wire.geo import LatLon
from firmware_sim.city import City
from firmware_sim.models import (
    AcousticSensor,
    DeviceHealth,
    GnssReceiver,
    Unit,
    acoustic_drivers,
    anpr_drivers,
    officer_drivers,
    sub_seed,
    vehicle_drivers,
)
from firmware_sim.scenario import SensorSpec, UnitSpec
from firmware_sim.truth import TruthLog

#: How long a GPS jump lasts unless the fault says.
GPS_JUMP_S = 30.0


@dataclass
class Kit:
    """The drivers of one device and its trigger handles."""

    spec: UnitSpec | SensorSpec
    unit: Unit

    @property
    def drivers(self) -> list[Driver]:
        return self.unit.drivers

    @property
    def acoustic(self) -> AcousticSensor | None:
        return self.unit.acoustic

    def incident(self, kind: str, *, t_ms: int, decel_g: float = 8.0, on: bool = True) -> str:
        """panic, man_down, crash, holster or bodycam happening to this unit at `t_ms`."""
        u, ident = self.unit, self.spec.id
        if kind == "panic" and u.body is not None:
            u.body.press_panic(at_ms=t_ms)
            return f"{ident} pressed panic"
        if kind == "man_down" and u.imu is not None:
            due = u.imu.fall(at_ms=t_ms)
            return f"{ident} fell and lies still (man-down due after {(due - t_ms) / 1000:.0f} s)"
        if kind == "crash" and u.imu is not None:
            detected = u.imu.crash(decel_g, at_ms=t_ms)
            return f"{ident} crashed at {decel_g:g} g ({'detected' if detected else 'below the detector threshold'})"
        if kind == "holster" and u.body is not None:
            u.body.holster_draw(at_ms=t_ms)
            return f"{ident} drew from the holster"
        if kind == "bodycam" and u.body is not None:
            if on:
                u.body.bodycam_on(at_ms=t_ms)
            else:
                u.body.bodycam_off(at_ms=t_ms)
            return f"{ident} switched the body camera {'on' if on else 'off'}"
        return f"{ident} has no sensor for {kind}"

    def vehicle_passes(self, plate: str, t_ms: int, course_deg: float) -> str | None:
        """A vehicle with `plate` driving `course_deg` passes this ANPR camera."""
        if self.unit.anpr is None:
            return None
        return self.unit.anpr.vehicle_passes(plate, t_ms, course_deg)

    def gps_jump(self, offset_m: float, duration_s: float, t_ms: int) -> bool:
        if self.unit.gnss is None:
            return False
        self.unit.gnss.jump(offset_m, duration_s, at_ms=t_ms)
        return True

    def gps_loss(self, duration_s: float, t_ms: int) -> bool:
        if self.unit.gnss is None:
            return False
        self.unit.gnss.lose_fix(duration_s, at_ms=t_ms)
        return True

    def dropout(self, duration_s: float, sensor: str | None, t_ms: int) -> list[str]:
        """Silence one model (`sensor`) or all of them; returns the names silenced."""
        models: list[Any] = list(self.unit.models)
        if sensor is not None:
            models = [m for m in models if _model_name(m) == sensor]
        for model in models:
            model.drop_out(duration_s, at_ms=t_ms)
        return [_model_name(m) for m in models]


def _model_name(model: Any) -> str:
    if isinstance(model, GnssReceiver):
        return "gnss"
    return str(getattr(model, "name", type(model).__name__.lower()))


def build_kit(
    spec: UnitSpec | SensorSpec,
    *,
    route: Sequence[LatLon] | None,
    truth: TruthLog | None,
    city: City,
    gnss_clock: Clock | None = None,
) -> Kit:
    """The sensor models and drivers for one device."""
    seed = spec.seed
    if isinstance(spec, SensorSpec):
        if spec.type == "acoustic":
            unit = acoustic_drivers(spec.id, spec.site, seed=seed, truth=truth, clock_error_ms=spec.clock_error_ms,
                                    range_m=spec.range_m)
        else:
            unit = anpr_drivers(spec.id, spec.site, spec.heading, seed=seed, truth=truth,
                                misread_rate=spec.misread_rate)
        return Kit(spec, unit)
    assert route is not None
    common: dict[str, Any] = {"seed": seed, "truth": truth, "speed_mps": spec.speed_mps, "tunnels": city.tunnels,
                              "gnss_clock": gnss_clock}
    if spec.type == "officer":
        unit = officer_drivers(spec.id, route, **common)
    elif spec.type == "vehicle":
        unit = vehicle_drivers(spec.id, route, **common)
    else:
        unit = _tracker(spec.id, route, rate_hz=spec.rate_hz, **common)
    if unit.gnss is not None:
        # officer_drivers / vehicle_drivers take no rate: set the receiver's epoch period.
        unit.gnss.period_ms = max(1, round(1000 / spec.rate_hz))
        # Each device its own epoch phase: a fleet's reports spread over the period
        # instead of arriving in one burst (a separate seed: other draws do not change).
        unit.gnss.phase_ms = sub_seed(seed, spec.id, "gnss-phase") % unit.gnss.period_ms
    return Kit(spec, unit)


def _tracker(
    device: str,
    route: Sequence[LatLon],
    *,
    seed: int | None,
    truth: TruthLog | None,
    speed_mps: float,
    tunnels: Sequence[Any],
    gnss_clock: Clock | None,
    rate_hz: float = 1.0,
) -> Unit:
    """A plain vehicle tracker: GNSS and its device health, nothing else."""
    gnss = GnssReceiver(route, speed_mps, sub_seed(seed, device, "gnss"), truth, device=device, tunnels=tunnels,
                        rate_hz=rate_hz)
    health = DeviceHealth(sub_seed(seed, device, "health"), truth, device=device)
    fixed = gnss_clock
    source = gnss.sentences if fixed is None else (lambda _clock: gnss.sentences(fixed))
    gps = NmeaGps(source, sensors=health.sensors)
    health.position = lambda: gps.last_fix
    return Unit(device, "tracker", [gps, health], health, gnss=gnss, gps=gps, models=[gnss, health])


__all__ = ["GPS_JUMP_S", "Kit", "build_kit"]
