"""An ANPR (automatic number-plate recognition) camera at a fixed site.

`vehicle_passes(plate, t_ms, direction)` is one vehicle going past. With probability
`miss_rate` nothing is read (default 0: every pass is read); otherwise with probability
`misread_rate` the read differs from the plate: one character (two, one time in five)
is replaced by a look-alike (0/O, 8/B, 1/I, 5/S, 2/Z, 6/G, D/0, ...), or, if the plate
has none, its last character is lost. Confidence is 0.80-0.99 for a good read and
0.55-0.90 for a misread, so a low score hints at a misread but does not prove one.
The `anpr_read` event is sent 150-450 ms after the pass with the camera's site,
`detail.plate` (as read), `confidence`, `direction` and `seen_ts` (UTC ms of the pass).

`direction` is passed through if it is text; a number is the vehicle's course in
degrees and becomes `approaching` (driving towards the camera, against the way it
faces) or `receding`.
"""

from __future__ import annotations

from typing import Any

from edge_agent.wire.geo import LatLon
from firmware_sim.models.base import EventModel
from firmware_sim.truth import TruthLog

#: Characters an ANPR engine confuses, both ways.
LOOKALIKES: dict[str, str] = {
    "0": "O", "O": "0", "8": "B", "B": "8", "1": "I", "I": "1", "5": "S", "S": "5",
    "2": "Z", "Z": "2", "6": "G", "G": "6", "D": "0", "Q": "O", "U": "V", "V": "U",
    "M": "N", "N": "M", "E": "F", "F": "E", "7": "T", "T": "7", "4": "A", "A": "4",
}


def normalise_plate(plate: str) -> str:
    """Upper case, letters and digits only (how ANPR systems store plates)."""
    return "".join(c for c in plate.upper() if c.isalnum())


class AnprCamera(EventModel):
    """A camera at `site` facing `heading` degrees."""

    name = "anpr"

    def __init__(
        self,
        site: LatLon,
        heading: float,
        seed: int | None = None,
        truth: TruthLog | None = None,
        *,
        device: str = "",
        misread_rate: float = 0.02,
        miss_rate: float = 0.0,
        site_acc_m: float = 0.5,
    ) -> None:
        super().__init__(seed=seed, truth=truth, device=device)
        if not 0 <= misread_rate <= 1 or not 0 <= miss_rate <= 1:
            raise ValueError("misread_rate and miss_rate must be in [0, 1]")
        self.site = (float(site[0]), float(site[1]))
        self.heading = float(heading) % 360.0
        self.misread_rate = misread_rate
        self.miss_rate = miss_rate
        self.site_acc_m = site_acc_m
        self.reads = 0
        self.misreads = 0

    def direction_of(self, course_deg: float) -> str:
        """`approaching` if a vehicle on `course_deg` drives towards the camera, else `receding`."""
        diff = abs((course_deg - self.heading + 180.0) % 360.0 - 180.0)
        return "approaching" if diff > 90.0 else "receding"

    def misread(self, plate: str) -> str:
        """A plausible wrong read of `plate` (always different from it)."""
        rng = self.rng
        positions = [i for i, c in enumerate(plate) if c in LOOKALIKES]
        if not positions:
            return plate[:-1] if len(plate) > 1 else plate + "0"
        count = 2 if len(positions) > 1 and rng.random() < 0.2 else 1
        chars = list(plate)
        for i in rng.sample(positions, count):
            chars[i] = LOOKALIKES[chars[i]]
        return "".join(chars)

    def vehicle_passes(self, plate: str, t_ms: int | None = None, direction: str | float = "approaching") -> str | None:
        """A vehicle with `plate` passes at `t_ms` (default now). Returns the plate as read,
        or None if the camera missed it."""
        t = self._now(t_ms)
        rng = self.rng
        true_plate = normalise_plate(plate)
        if not true_plate:
            raise ValueError("a plate needs letters or digits")
        miss_draw, misread_draw, latency = rng.random(), rng.random(), rng.uniform(150, 450)
        good_conf, bad_conf = rng.uniform(0.80, 0.99), rng.uniform(0.55, 0.90)
        seen = self.direction_of(direction) if isinstance(direction, int | float) else str(direction)
        if miss_draw < self.miss_rate:
            self._record(t, "anpr_pass", plate=true_plate, read=None, direction=seen, camera=self.site)
            return None
        wrong = misread_draw < self.misread_rate
        read = self.misread(true_plate) if wrong else true_plate
        self.reads += 1
        self.misreads += wrong
        self._record(t, "anpr_pass", plate=true_plate, read=read, direction=seen, camera=self.site)
        body: dict[str, Any] = {
            "type": "anpr_read",
            "lat": self.site[0],
            "lon": self.site[1],
            "acc": self.site_acc_m,
            "detail": {
                "plate": read,
                "confidence": round(bad_conf if wrong else good_conf, 3),
                "direction": seen,
                "seen_ts": t,
            },
        }
        self._event(t + round(latency), body, locate=False)
        return read


__all__ = ["LOOKALIKES", "AnprCamera", "normalise_plate"]
