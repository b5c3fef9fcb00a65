"""Every device's housekeeping (battery, temperature, firmware) and the vehicle unit.

`DeviceHealth` is a driver: at start it sends a `status` with the firmware version and
battery; for fixed sensors (no GNSS) it also sends a heartbeat `telemetry` at their
surveyed site every `heartbeat_s`. Its `sensors(t_ms)` gives `battery` (percent) and
`temperature` (degrees C, the device's internal temperature: diurnal ambient + self
heating + noise) for the GNSS telemetry of mobile devices. `tamper()` raises a `tamper`
event (an enclosure opened, a device removed from its mount).

`VehicleUnit` is the in-car terminal: the same plus `ignition`, `vehicle_speed` (m/s,
from the vehicle bus: the true speed within 1%) and `blue_lights`; its backup battery
charges while the ignition is on.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from typing import Any

from edge_agent.drivers import Reading
from edge_agent.wire.geo import LatLon
from firmware_sim.models.base import FIRMWARE_VERSION, EventModel, PositionSource
from firmware_sim.truth import TruthLog

DAY_MS = 86_400_000


class DeviceHealth(EventModel):
    """Battery, temperature, firmware and tamper for one device."""

    name = "health"

    def __init__(
        self,
        seed: int | None = None,
        truth: TruthLog | None = None,
        *,
        device: str = "",
        firmware: str = FIRMWARE_VERSION,
        state: str = "available",
        battery: float | None = None,
        drain_per_h: float | None = None,
        mains: bool = False,
        site: LatLon | None = None,
        site_acc_m: float = 0.5,
        heartbeat_s: float | None = None,
        ambient_c: float = 12.0,
        self_heating_c: float | None = None,
        position: PositionSource | None = None,
    ) -> None:
        super().__init__(seed=seed, truth=truth, device=device, position=position)
        if heartbeat_s is not None and (heartbeat_s <= 0 or site is None):
            raise ValueError("a heartbeat needs a site and heartbeat_s > 0")
        rng = self.rng
        self.firmware = firmware
        self.state = state
        self.mains = mains
        self.site = site
        self.site_acc_m = site_acc_m
        self.heartbeat_s = heartbeat_s
        self.ambient_c = ambient_c
        self.self_heating_c = rng.uniform(4.0, 12.0) if self_heating_c is None else self_heating_c
        self._battery0 = rng.uniform(80.0, 100.0) if battery is None else battery
        self.drain_per_h = rng.uniform(4.0, 7.0) if drain_per_h is None else drain_per_h
        self._t0: int | None = None

    def _origin(self, t_ms: int) -> int:
        if self._t0 is None:
            self._t0 = t_ms
        return self._t0

    def battery(self, t_ms: int) -> float:
        """Charge in percent at `t_ms` (mains-powered devices stay at 100)."""
        if self.mains:
            return 100.0
        hours = max(0.0, (t_ms - self._origin(t_ms)) / 3_600_000)
        return max(0.0, self._battery0 - self.drain_per_h * hours)

    def temperature(self, t_ms: int) -> float:
        """Internal temperature: ambient with a day cycle (warmest mid-afternoon) + self heating."""
        hour = (t_ms % DAY_MS) / 3_600_000
        ambient = self.ambient_c + 4.0 * math.sin(2 * math.pi * (hour - 9.0) / 24.0)
        return ambient + self.self_heating_c + self.rng.gauss(0, 0.2)

    def sensors(self, t_ms: int) -> dict[str, Any]:
        """`battery` and `temperature` (empty during a dropout)."""
        if self.dropped(t_ms):
            return {}
        return {"battery": round(self.battery(t_ms), 1), "temperature": round(self.temperature(t_ms), 1)}

    def status_body(self, t_ms: int) -> dict[str, Any]:
        return {"state": self.state, "firmware": self.firmware, "battery": round(self.battery(t_ms), 1)}

    def on_start(self, t_ms: int) -> None:
        self._origin(t_ms)
        self._schedule(t_ms, lambda t: Reading("status", self.status_body(t)))
        if self.heartbeat_s is not None:
            self._schedule(t_ms, self._heartbeat)

    def _heartbeat(self, t_ms: int) -> Reading:
        assert self.site is not None
        assert self.heartbeat_s is not None
        self._schedule(t_ms + round(self.heartbeat_s * 1000), self._heartbeat)
        body: dict[str, Any] = {"lat": self.site[0], "lon": self.site[1], "acc": self.site_acc_m}
        if sensors := self.sensors(t_ms):
            body["sensors"] = sensors
        return Reading("telemetry", body)

    def tamper(self, what: str = "enclosure", at_ms: int | None = None) -> None:
        """A `tamper` event now (or at `at_ms`): `detail.what` says what was disturbed."""
        t = self._now(at_ms)
        self._record(t, "tamper", what=what)
        body: dict[str, Any] = {"type": "tamper", "detail": {"what": what}}
        if self.site is not None:
            body.update(lat=self.site[0], lon=self.site[1], acc=self.site_acc_m)
        self._event(t + 50, body, locate=self.site is None)


class VehicleUnit(DeviceHealth):
    """The in-car terminal. `speed(t_ms)` is the vehicle's true speed (the GNSS
    receiver's `true_speed`); the ignition starts on, the blue lights off."""

    name = "vehicle"

    def __init__(
        self,
        seed: int | None = None,
        truth: TruthLog | None = None,
        *,
        device: str = "",
        speed: Callable[[int], float] | None = None,
        ignition: bool = True,
        firmware: str = FIRMWARE_VERSION,
        battery: float | None = None,
        position: PositionSource | None = None,
    ) -> None:
        super().__init__(seed, truth, device=device, firmware=firmware, battery=battery, position=position)
        self.self_heating_c = self.rng.uniform(8.0, 15.0)
        self._speed = speed
        self._speed_scale = 1.0 + self.rng.uniform(-0.01, 0.01)  # odometer calibration
        self._ignition: list[tuple[int, bool]] = [(-(2**62), ignition)]
        self._lights: list[tuple[int, bool]] = [(-(2**62), False)]
        self._level = self._battery0
        self._level_t: int | None = None

    @staticmethod
    def _at(timeline: list[tuple[int, bool]], t_ms: int) -> bool:
        return timeline[bisect.bisect_right(timeline, (t_ms, True)) - 1][1]

    def ignition(self, on: bool, at_ms: int | None = None) -> None:
        t = self._now(at_ms)
        bisect.insort(self._ignition, (t, on))
        self._record(t, "ignition", on=on)

    def blue_lights(self, on: bool, at_ms: int | None = None) -> None:
        t = self._now(at_ms)
        bisect.insort(self._lights, (t, on))
        self._record(t, "blue_lights", on=on)

    def ignition_on(self, t_ms: int) -> bool:
        return self._at(self._ignition, t_ms)

    def blue_lights_on(self, t_ms: int) -> bool:
        return self._at(self._lights, t_ms)

    def battery(self, t_ms: int) -> float:
        """Backup battery: +20 %/h while the ignition is on, -3 %/h while off."""
        if self._level_t is None:
            self._level_t = self._origin(t_ms)
        changes = [t for t, _ in self._ignition if self._level_t < t < t_ms]
        for end in [*changes, t_ms]:
            if end <= self._level_t:
                continue
            rate = 20.0 if self.ignition_on(self._level_t) else -3.0
            self._level = max(0.0, min(100.0, self._level + rate * (end - self._level_t) / 3_600_000))
            self._level_t = end
        return self._level

    def sensors(self, t_ms: int) -> dict[str, Any]:
        out = super().sensors(t_ms)
        if self.dropped(t_ms):
            return out
        out["ignition"] = self.ignition_on(t_ms)
        out["blue_lights"] = self.blue_lights_on(t_ms)
        if self._speed is not None:
            speed = self._speed(t_ms) * self._speed_scale if out["ignition"] else 0.0
            out["vehicle_speed"] = round(speed, 2)
        return out


__all__ = ["DeviceHealth", "VehicleUnit"]
