"""ANPR: the hotlist of wanted vehicles, matching reads against it (tolerating the
look-alike characters ANPR engines confuse) and where a sighted vehicle is heading.

    hotlist = Hotlist.from_records([{"plate": "AB12 CDE", "reason": "stolen", "expires_ts": t,
                                     "markers": ["stolen"], "priority": 1}])
    hits = hotlist.match("AB12 CDF", now_ms)     # exact first, then fuzzy (lower confidence)
    sightings = PlateSightings()
    sightings.add(Sighting("AB12CDE", cam_lat, cam_lon, t_ms, camera_heading_deg=90, direction="receding"))
    sightings.predict("AB12CDE", later_ms)        # dead reckoning from the last sightings

Matching: plates are normalised (upper case, letters and digits only). A read matches
an entry exactly, or fuzzily when it differs in at most `max_substitutions` positions
and each differing pair is a look-alike (`CONFUSABLE`: 0/O/D/Q, 1/I, 8/B, 5/S, 2/Z,
6/G, ...). A fuzzy hit's confidence is the read's confidence times
`FUZZY_CONFIDENCE_FACTOR` per substitution, and it is flagged `exact=False` so the
officer is told to check the plate. Expired entries never match.

Prediction: from two sightings of the same plate (the last two at different places,
taken at most `MAX_PAIR_AGE_MS` apart) the vehicle's speed and bearing (straight
line, capped at `MAX_SPEED_MPS`); from one, `ASSUMED_URBAN_SPEED_MPS` along the
direction of travel the camera saw. The radius grows with time: a city is not a
straight line, so the position is a search area, not a point.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from edge_agent.wire.geo import LatLon, bearing_deg, distance_m, offset
from gateway.core.track import FusionError

#: Groups of characters an ANPR engine confuses with one another.
CONFUSABLE: tuple[str, ...] = ("0ODQ", "1I", "8B", "5S", "2Z", "6G", "UV", "MN", "EF", "7T", "4A")
FUZZY_CONFIDENCE_FACTOR = 0.6
DEFAULT_MAX_SUBSTITUTIONS = 1
#: Urban driving speed assumed when only one sighting is known (about 30 mph).
ASSUMED_URBAN_SPEED_MPS = 13.0
#: A speed between two sightings above this is not believed (misread or wrong pairing).
MAX_SPEED_MPS = 70.0
MAX_PAIR_AGE_MS = 15 * 60_000
#: Dead reckoning stops after this long: the prediction then only grows its radius.
MAX_PREDICT_MS = 10 * 60_000
#: Search radius: a base plus this fraction of the distance dead-reckoned.
BASE_RADIUS_M = 50.0
RADIUS_PER_M = 0.5


class HotlistError(FusionError):
    """A hotlist record that cannot be used; `index` is its position in the input."""

    def __init__(self, index: int, detail: str) -> None:
        super().__init__(f"hotlist entry {index}: {detail}")
        self.index = index
        self.detail = detail


def normalise_plate(plate: str) -> str:
    """Upper case, letters and digits only (how ANPR systems store plates)."""
    return "".join(c for c in plate.upper() if c.isalnum())


def _classes(groups: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for group in groups:
        for c in group:
            out[c] = group[0]
    return out


@dataclass(frozen=True, slots=True)
class HotlistEntry:
    """A wanted plate: why, until when (UTC ms), how urgent (1 = highest) and warning
    markers for the officer (`armed`, `stolen`, `violent`, ...)."""

    plate: str
    reason: str
    expires_ts: int
    priority: int = 3
    markers: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        plate = normalise_plate(self.plate)
        if not plate:
            raise ValueError(f"plate {self.plate!r} has no letters or digits")
        if not self.reason:
            raise ValueError("an entry needs a reason")
        if isinstance(self.expires_ts, bool) or not isinstance(self.expires_ts, int) or self.expires_ts < 0:
            raise ValueError(f"expires_ts must be UTC ms (int >= 0), got {self.expires_ts!r}")
        if not 1 <= self.priority <= 9:
            raise ValueError(f"priority must be 1-9, got {self.priority}")
        object.__setattr__(self, "plate", plate)
        object.__setattr__(self, "markers", frozenset(m.strip().lower() for m in self.markers if m.strip()))

    def live(self, now_ms: int) -> bool:
        return now_ms < self.expires_ts

    def as_record(self) -> dict[str, Any]:
        """The entry as a hotlist file record (what `Hotlist.from_records` reads)."""
        return {"plate": self.plate, "reason": self.reason, "expires_ts": self.expires_ts,
                "priority": self.priority, "markers": sorted(self.markers)}


@dataclass(frozen=True, slots=True)
class HotlistHit:
    """A read that matched an entry. `exact` False: a look-alike match, check the plate."""

    entry: HotlistEntry
    read: str
    exact: bool
    substitutions: int
    confidence: float


class Hotlist:
    """Entries by plate, with an index by look-alike class for fuzzy matching."""

    def __init__(
        self,
        entries: Iterable[HotlistEntry] = (),
        *,
        max_substitutions: int = DEFAULT_MAX_SUBSTITUTIONS,
        confusable: Iterable[str] = CONFUSABLE,
    ) -> None:
        if max_substitutions < 0:
            raise ValueError("max_substitutions must be >= 0")
        self.max_substitutions = max_substitutions
        self._class = _classes(confusable)
        self._exact: dict[str, HotlistEntry] = {}
        self._fuzzy: dict[str, list[HotlistEntry]] = {}
        for entry in entries:
            self.add(entry)

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]], **options: Any) -> Hotlist:
        """From parsed records (`plate`, `reason`, `expires_ts` → `priority`, `markers`);
        raises `HotlistError` naming the first bad record."""
        entries = []
        for i, record in enumerate(records):
            try:
                markers = record.get("markers") or ()
                if isinstance(markers, str):
                    markers = markers.replace(";", ",").split(",")
                entries.append(HotlistEntry(
                    str(record["plate"]), str(record["reason"]), int(record["expires_ts"]),
                    int(record.get("priority", 3)), frozenset(str(m) for m in markers),
                ))
            except KeyError as exc:
                raise HotlistError(i, f"missing field {exc}") from None
            except (TypeError, ValueError, AttributeError) as exc:
                raise HotlistError(i, str(exc)) from None
        return cls(entries, **options)

    def _key(self, plate: str) -> str:
        return "".join(self._class.get(c, c) for c in plate)

    def add(self, entry: HotlistEntry) -> None:
        """Add or replace the entry for its plate."""
        old = self._exact.get(entry.plate)
        if old is not None:
            self._fuzzy[self._key(old.plate)].remove(old)
        self._exact[entry.plate] = entry
        self._fuzzy.setdefault(self._key(entry.plate), []).append(entry)

    def remove(self, plate: str) -> HotlistEntry:
        """Remove and return the entry for `plate` (normalised); `KeyError` if none."""
        entry = self._exact.pop(normalise_plate(plate))
        key = self._key(entry.plate)
        self._fuzzy[key].remove(entry)
        if not self._fuzzy[key]:
            del self._fuzzy[key]
        return entry

    def get(self, plate: str) -> HotlistEntry | None:
        """The entry for `plate` (normalised), expired or not."""
        return self._exact.get(normalise_plate(plate))

    def __iter__(self) -> Iterator[HotlistEntry]:
        """Every entry, expired ones too, by plate."""
        return iter(sorted(self._exact.values(), key=lambda e: e.plate))

    def __len__(self) -> int:
        return len(self._exact)

    def match(self, plate: str, now_ms: int, *, confidence: float = 1.0) -> list[HotlistHit]:
        """Live entries the read `plate` matches: the exact one first, then look-alikes
        with fewest substitutions. `confidence` is the ANPR engine's for the read."""
        read = normalise_plate(plate)
        if not read:
            return []
        hits: list[HotlistHit] = []
        exact = self._exact.get(read)
        if exact is not None and exact.live(now_ms):
            hits.append(HotlistHit(exact, read, True, 0, confidence))
        if self.max_substitutions == 0:
            return hits
        for entry in self._fuzzy.get(self._key(read), ()):
            if entry is exact or not entry.live(now_ms):
                continue
            subs = sum(a != b for a, b in zip(entry.plate, read, strict=True))
            if subs <= self.max_substitutions:
                hits.append(HotlistHit(entry, read, False, subs, confidence * FUZZY_CONFIDENCE_FACTOR**subs))
        hits.sort(key=lambda h: (h.substitutions, h.entry.priority))
        return hits


@dataclass(frozen=True, slots=True)
class Sighting:
    """A camera read: where the camera is, which way it faces and whether the vehicle was
    `approaching` (driving towards it, against its heading) or `receding`."""

    plate: str
    lat: float
    lon: float
    t_ms: int
    camera_heading_deg: float | None = None
    direction: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "plate", normalise_plate(self.plate))
        if not self.plate:
            raise ValueError("a sighting needs a plate")
        if not (-90.0 <= self.lat <= 90.0 and -180.0 <= self.lon <= 180.0):
            raise ValueError(f"({self.lat}, {self.lon}) is not a WGS84 lat/lon")
        if self.direction not in (None, "approaching", "receding"):
            raise ValueError(f"direction must be approaching or receding, got {self.direction!r}")

    @property
    def position(self) -> LatLon:
        return self.lat, self.lon

    @property
    def course_deg(self) -> float | None:
        """The vehicle's direction of travel, if the camera tells it."""
        if self.camera_heading_deg is None or self.direction is None:
            return None
        return (self.camera_heading_deg + (180.0 if self.direction == "approaching" else 0.0)) % 360.0


@dataclass(frozen=True, slots=True)
class PlatePrediction:
    """Where the vehicle is expected at `t_ms`: centre, search radius, course and speed
    used, and `basis`: `two_sightings`, `one_sighting` or `last_seen` (no direction)."""

    lat: float
    lon: float
    t_ms: int
    radius_m: float
    course_deg: float | None
    speed_mps: float
    basis: str
    last: Sighting


class PlateSightings:
    """The recent sightings of each plate (the last `keep` of each)."""

    def __init__(self, *, keep: int = 8) -> None:
        if keep < 2:
            raise ValueError("keep at least 2 sightings a plate")
        self.keep = keep
        self._by_plate: dict[str, list[Sighting]] = {}

    def add(self, sighting: Sighting) -> None:
        seen = self._by_plate.setdefault(sighting.plate, [])
        seen.append(sighting)
        seen.sort(key=lambda s: s.t_ms)
        del seen[: -self.keep]

    def last(self, plate: str) -> Sighting | None:
        seen = self._by_plate.get(normalise_plate(plate))
        return seen[-1] if seen else None

    def predict(self, plate: str, t_ms: int) -> PlatePrediction | None:
        """Dead-reckoned position of `plate` at `t_ms` (None if never seen)."""
        seen = self._by_plate.get(normalise_plate(plate))
        if not seen:
            return None
        last = seen[-1]
        course, speed, basis = last.course_deg, ASSUMED_URBAN_SPEED_MPS, "one_sighting"
        for previous in reversed(seen[:-1]):
            gap = last.t_ms - previous.t_ms
            if gap > MAX_PAIR_AGE_MS:
                break
            apart = distance_m(previous.position, last.position)
            if gap > 0 and apart > 20.0:
                if apart / (gap / 1000.0) <= MAX_SPEED_MPS:
                    course, speed = bearing_deg(previous.position, last.position), apart / (gap / 1000.0)
                    basis = "two_sightings"
                break
        if course is None:
            speed, basis = 0.0, "last_seen"
        elapsed_s = max(0, min(t_ms - last.t_ms, MAX_PREDICT_MS)) / 1000.0
        travelled = speed * elapsed_s
        if course is None:
            lat, lon = last.position
            # no direction: anywhere within the distance an urban vehicle could cover
            radius = BASE_RADIUS_M + ASSUMED_URBAN_SPEED_MPS * elapsed_s
        else:
            h = math.radians(course)
            lat, lon = offset(last.position, travelled * math.cos(h), travelled * math.sin(h))
            radius = BASE_RADIUS_M + RADIUS_PER_M * travelled
        return PlatePrediction(lat, lon, t_ms, radius, course, speed, basis, last)


__all__ = [
    "ASSUMED_URBAN_SPEED_MPS",
    "CONFUSABLE",
    "FUZZY_CONFIDENCE_FACTOR",
    "Hotlist",
    "HotlistEntry",
    "HotlistError",
    "HotlistHit",
    "PlatePrediction",
    "PlateSightings",
    "Sighting",
    "normalise_plate",
]
