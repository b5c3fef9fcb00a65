"""One simulated device = its drivers + handles on its models (for the timeline).

    unit = officer_drivers("off-1", loop, seed=7, truth=truth, tunnels=city.tunnels)
    agent = Agent(settings, clock=clock, drivers=unit.drivers)
    unit.body.press_panic(at_ms=t)          # triggers go to the models
    unit.gnss.trajectory.follow(path, 3.0, at_ms=t)

Officer: GNSS -> the agent's real `NmeaGps` (telemetry with battery, temperature, heart
rate, holster, bodycam), body sensors, IMU, device health (status at start). Vehicle:
GNSS -> `NmeaGps` (telemetry with battery, temperature, ignition, vehicle_speed,
blue_lights), IMU, vehicle unit (status at start). Acoustic / ANPR: the sensor and
device health (status at start, a heartbeat telemetry at the site every `heartbeat_s`).

Every model gets its own seed derived from (`seed`, device, model), so adding a device
or a model never changes another's randomness. `gnss_clock`: the clock the GNSS
receiver keeps (satellite time); default the agent's, but under a clock-skew fault pass
the true clock, since a GNSS receiver's time is not skewed.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_agent.drivers import Clock, Driver
from edge_agent.drivers.gps import Fix, Route
from edge_agent.drivers.nmea import NmeaGps
from edge_agent.wire.geo import LatLon
from firmware_sim.city import Tunnel
from firmware_sim.models.acoustic import AcousticSensor
from firmware_sim.models.anpr import AnprCamera
from firmware_sim.models.base import FIRMWARE_VERSION, sub_seed
from firmware_sim.models.body import BodySensors
from firmware_sim.models.device import DeviceHealth, VehicleUnit
from firmware_sim.models.gnss import GnssReceiver
from firmware_sim.models.imu import Imu
from firmware_sim.models.motion import Trajectory
from firmware_sim.truth import TruthLog

#: Walking pace of an officer on foot patrol, typical urban patrol speed of a car.
OFFICER_SPEED_MPS = 1.4
VEHICLE_SPEED_MPS = 9.0


@dataclass
class Unit:
    """A device's `drivers` (give them to `Agent`) and its models (to trigger)."""

    device: str
    role: str  # officer | vehicle | acoustic | anpr
    drivers: list[Driver]
    health: DeviceHealth
    gnss: GnssReceiver | None = None
    gps: NmeaGps | None = None
    body: BodySensors | None = None
    imu: Imu | None = None
    vehicle: VehicleUnit | None = None
    acoustic: AcousticSensor | None = None
    anpr: AnprCamera | None = None
    models: list[Any] = field(default_factory=list)

    def drop_out(self, duration_s: float, at_ms: int | None = None) -> None:
        """Every model of the device goes quiet (a whole-device sensor dropout)."""
        for model in self.models:
            model.drop_out(duration_s, at_ms)


def merge_sensors(*sources: Callable[[int], Mapping[str, Any]]) -> Callable[[int], dict[str, Any]]:
    """One `sensors(t_ms)` callback from several (later ones win on a clash)."""

    def sensors(t_ms: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for source in sources:
            out.update(source(t_ms))
        return out

    return sensors


def _nmea_source(gnss: GnssReceiver, gnss_clock: Clock | None) -> Callable[[Clock], AsyncIterable[str]]:
    if gnss_clock is None:
        return gnss.sentences
    fixed: Clock = gnss_clock
    return lambda _agent_clock: gnss.sentences(fixed)


def _position(gps: NmeaGps) -> Callable[[], Fix | None]:
    return lambda: gps.last_fix


def officer_drivers(
    device: str,
    route: Route | Sequence[LatLon] | Trajectory,
    *,
    seed: int | None,
    truth: TruthLog | None = None,
    speed_mps: float = OFFICER_SPEED_MPS,
    tunnels: Sequence[Tunnel] = (),
    gnss_clock: Clock | None = None,
    firmware: str = FIRMWARE_VERSION,
    still_s: float = 30.0,
    urban_sigma_m: float = 7.0,
    multipath_prob: float = 0.005,
) -> Unit:
    """An officer on foot: radio/phone with GNSS, body sensors and an IMU."""
    gnss = GnssReceiver(
        route, speed_mps, sub_seed(seed, device, "gnss"), truth,
        device=device, tunnels=tunnels, urban_sigma_m=urban_sigma_m, multipath_prob=multipath_prob,
    )
    health = DeviceHealth(sub_seed(seed, device, "health"), truth, device=device, firmware=firmware)
    body = BodySensors(sub_seed(seed, device, "body"), truth, device=device, speed=gnss.true_speed)
    gps = NmeaGps(_nmea_source(gnss, gnss_clock), sensors=merge_sensors(health.sensors, body.sensors))
    imu = Imu(sub_seed(seed, device, "imu"), truth, device=device, still_s=still_s)
    body.position = imu.position = health.position = _position(gps)
    return Unit(device, "officer", [gps, body, imu, health], health, gnss=gnss, gps=gps, body=body, imu=imu,
                models=[gnss, health, body, imu])


def vehicle_drivers(
    device: str,
    route: Route | Sequence[LatLon] | Trajectory,
    *,
    seed: int | None,
    truth: TruthLog | None = None,
    speed_mps: float = VEHICLE_SPEED_MPS,
    tunnels: Sequence[Tunnel] = (),
    gnss_clock: Clock | None = None,
    firmware: str = FIRMWARE_VERSION,
    urban_sigma_m: float = 7.0,
    multipath_prob: float = 0.005,
) -> Unit:
    """A patrol car: in-car terminal with GNSS, vehicle bus and an IMU (crash detection)."""
    gnss = GnssReceiver(
        route, speed_mps, sub_seed(seed, device, "gnss"), truth,
        device=device, tunnels=tunnels, urban_sigma_m=urban_sigma_m, multipath_prob=multipath_prob,
    )
    vehicle = VehicleUnit(sub_seed(seed, device, "vehicle"), truth, device=device, speed=gnss.true_speed,
                          firmware=firmware)
    gps = NmeaGps(_nmea_source(gnss, gnss_clock), sensors=vehicle.sensors)
    imu = Imu(sub_seed(seed, device, "imu"), truth, device=device)
    imu.position = vehicle.position = _position(gps)
    return Unit(device, "vehicle", [gps, imu, vehicle], vehicle, gnss=gnss, gps=gps, imu=imu, vehicle=vehicle,
                models=[gnss, vehicle, imu])


def acoustic_drivers(
    device: str,
    site: LatLon,
    *,
    seed: int | None,
    truth: TruthLog | None = None,
    clock_error_ms: float = 1.0,
    range_m: float = 1500.0,
    heartbeat_s: float | None = 60.0,
    firmware: str = FIRMWARE_VERSION,
) -> Unit:
    """A mains-powered gunshot detector on a building or a pole."""
    sensor = AcousticSensor(site, clock_error_ms, sub_seed(seed, device, "acoustic"), truth,
                            device=device, range_m=range_m)
    health = DeviceHealth(sub_seed(seed, device, "health"), truth, device=device, firmware=firmware, state="online",
                          mains=True, site=sensor.site, heartbeat_s=heartbeat_s)
    return Unit(device, "acoustic", [sensor, health], health, acoustic=sensor, models=[sensor, health])


def anpr_drivers(
    device: str,
    site: LatLon,
    heading: float,
    *,
    seed: int | None,
    truth: TruthLog | None = None,
    misread_rate: float = 0.02,
    miss_rate: float = 0.0,
    heartbeat_s: float | None = 60.0,
    firmware: str = FIRMWARE_VERSION,
) -> Unit:
    """A fixed ANPR camera facing `heading` degrees."""
    camera = AnprCamera(site, heading, sub_seed(seed, device, "anpr"), truth, device=device,
                        misread_rate=misread_rate, miss_rate=miss_rate)
    health = DeviceHealth(sub_seed(seed, device, "health"), truth, device=device, firmware=firmware, state="online",
                          mains=True, site=camera.site, heartbeat_s=heartbeat_s)
    return Unit(device, "anpr", [camera, health], health, anpr=camera, models=[camera, health])


__all__ = [
    "OFFICER_SPEED_MPS",
    "VEHICLE_SPEED_MPS",
    "Unit",
    "acoustic_drivers",
    "anpr_drivers",
    "merge_sensors",
    "officer_drivers",
    "vehicle_drivers",
]
