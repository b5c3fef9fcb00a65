"""Simulated sensors. Each model is pure and seeded (time comes from the clock its driver
runs on, or from `at_ms` arguments), records what really happened in a `TruthLog`, and is
an agent `Driver` or feeds one (the GNSS receiver feeds the agent's real `NmeaGps`).
`units` assembles the drivers of one officer, vehicle, acoustic sensor or ANPR camera."""

from firmware_sim.models.acoustic import SPEED_OF_SOUND_MPS, AcousticSensor, gunshot
from firmware_sim.models.anpr import AnprCamera, normalise_plate
from firmware_sim.models.base import FIRMWARE_VERSION, EventModel, Model, NotStarted, sub_seed
from firmware_sim.models.body import BodySensors
from firmware_sim.models.device import DeviceHealth, VehicleUnit
from firmware_sim.models.gnss import GnssReceiver, NmeaFix, format_gga, format_rmc
from firmware_sim.models.imu import Imu
from firmware_sim.models.motion import MotionState, Trajectory
from firmware_sim.models.units import (
    Unit,
    acoustic_drivers,
    anpr_drivers,
    merge_sensors,
    officer_drivers,
    vehicle_drivers,
)

__all__ = [
    "FIRMWARE_VERSION",
    "SPEED_OF_SOUND_MPS",
    "AcousticSensor",
    "AnprCamera",
    "BodySensors",
    "DeviceHealth",
    "EventModel",
    "GnssReceiver",
    "Imu",
    "Model",
    "MotionState",
    "NmeaFix",
    "NotStarted",
    "Trajectory",
    "Unit",
    "VehicleUnit",
    "acoustic_drivers",
    "anpr_drivers",
    "format_gga",
    "format_rmc",
    "gunshot",
    "merge_sensors",
    "normalise_plate",
    "officer_drivers",
    "sub_seed",
    "vehicle_drivers",
]
