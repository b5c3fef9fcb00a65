"""Where a gunshot was fired, from three or more acoustic detections (time difference
of arrival), pure numpy:

    fix = locate([Detection("ac-1", lat, lon, t_detect_ns), ...])
    fix.lat, fix.lon, fix.t0_ns, fix.uncertainty_m, fix.residual_m, fix.sensors

Model: sensor i at s_i (metres east/north in a local plane around the sensors' centroid)
hears the shot at t_i = t0 + |s_i - p| / c. With range units, r_i = c (t_i - t_ref) and
d0 = c (t0 - t_ref), the unknowns are (x, y, d0) and each detection gives the residual
`d0 + |s_i - p| - r_i`. t0 is a free unknown, so only time differences matter: 3 sensors
give 2 independent equations for (x, y) (exactly determined: the residual is ~0 and
may have a mirror solution, the one nearest the best grid point is returned), 4+ sensors
are over-determined.

Solver: a coarse grid search (t0 eliminated in closed form at each point) over the
sensors' area and a margin around it gives the initial guess, then Levenberg-Marquardt
refines it. Uncertainty: the covariance of (x, y) is sigma_r^2 (J^T J)^-1 with
sigma_r = c x `timing_sigma_s` (the sensors' stated clock error, 1 ms by default, i.e.
0.34 m of range), scaled up by the residual's variance factor when that is larger (4+
sensors); `uncertainty_m` is the 95% radius sqrt(5.99 x largest eigenvalue), a
conservative circle around the error ellipse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edge_agent.wire.geo import displacement_m, offset
from gateway.core.track import FusionError

SPEED_OF_SOUND_MPS = 343.0
#: Default 1-sigma timing error of one detection (GNSS-disciplined sensor clock), seconds.
DEFAULT_TIMING_SIGMA_S = 1e-3
#: Chi-square 95% quantile with 2 degrees of freedom.
CHI2_2DOF_95 = 5.991
#: Sensors whose smaller principal spread is below this fraction of the larger (or below
#: `MIN_SPREAD_M`) are collinear (or co-located): the fix is ambiguous or undetermined.
MIN_SPREAD_RATIO = 0.02
MIN_SPREAD_M = 1.0
#: The grid search covers the sensors' bounding box plus this margin (or the span, if larger).
SEARCH_MARGIN_M = 1000.0
GRID_POINTS = 41
MAX_ITERATIONS = 60
#: Converged when a step moves the source less than this.
STEP_TOLERANCE_M = 1e-4
#: A solution further than this from the sensors' centroid did not converge to a real shot.
MAX_RANGE_M = 20_000.0

Vector = npt.NDArray[np.float64]


class MultilatError(FusionError):
    """The detections cannot be turned into a location."""


class TooFewDetections(MultilatError):
    """Fewer than 3 distinct sensors."""


class DegenerateGeometry(MultilatError):
    """The sensors are (nearly) collinear or co-located."""


class NoConvergence(MultilatError):
    """The solver did not converge (inconsistent times, e.g. two shots mixed up)."""


@dataclass(frozen=True, slots=True)
class Detection:
    """One sensor's detection: its surveyed site and its timestamp of the arrival (UTC ns)."""

    sensor_id: str
    lat: float
    lon: float
    t_ns: int

    def __post_init__(self) -> None:
        if not self.sensor_id:
            raise ValueError("a detection needs a sensor id")
        if not (-90.0 <= self.lat <= 90.0 and -180.0 <= self.lon <= 180.0):
            raise ValueError(f"({self.lat}, {self.lon}) is not a WGS84 lat/lon")
        if isinstance(self.t_ns, bool) or not isinstance(self.t_ns, int) or self.t_ns < 0:
            raise ValueError(f"t_ns must be an int >= 0 (UTC ns), got {self.t_ns!r}")


@dataclass(frozen=True, slots=True)
class GunshotFix:
    """The located source: `uncertainty_m` is a 95% radius, `residual_m` the RMS range
    residual over the sensors used (metres), `t0_ns` the emission time (UTC ns)."""

    lat: float
    lon: float
    t0_ns: int
    uncertainty_m: float
    residual_m: float
    sensors: tuple[str, ...]

    def __post_init__(self) -> None:
        if not (-90.0 <= self.lat <= 90.0 and -180.0 <= self.lon <= 180.0):
            raise ValueError(f"({self.lat}, {self.lon}) is not a WGS84 lat/lon")
        if not (self.uncertainty_m >= 0.0 and self.residual_m >= 0.0) or len(self.sensors) < 3:
            raise ValueError("uncertainty and residual must be >= 0, with 3+ sensors")


def _residuals(sites: Vector, ranges: Vector, theta: Vector) -> tuple[Vector, Vector]:
    """(residuals, Jacobian) at theta = (x, y, d0)."""
    delta = theta[:2] - sites
    dist = np.maximum(np.hypot(delta[:, 0], delta[:, 1]), 1e-9)
    residual = theta[2] + dist - ranges
    jacobian = np.column_stack((delta[:, 0] / dist, delta[:, 1] / dist, np.ones(len(ranges))))
    return residual, jacobian


def _grid_guess(sites: Vector, ranges: Vector) -> Vector:
    """The best point of a grid over the area, with d0 solved in closed form there."""
    lo, hi = sites.min(axis=0), sites.max(axis=0)
    margin = max(SEARCH_MARGIN_M, float((hi - lo).max()))
    xs = np.linspace(lo[0] - margin, hi[0] + margin, GRID_POINTS)
    ys = np.linspace(lo[1] - margin, hi[1] + margin, GRID_POINTS)
    gx, gy = np.meshgrid(xs, ys)
    points = np.column_stack((gx.ravel(), gy.ravel()))  # (G, 2)
    dist = np.hypot(points[:, None, 0] - sites[None, :, 0], points[:, None, 1] - sites[None, :, 1])  # (G, n)
    d0 = (ranges[None, :] - dist).mean(axis=1)
    cost = ((dist + d0[:, None] - ranges[None, :]) ** 2).sum(axis=1)
    best = int(np.argmin(cost))
    return np.array([points[best, 0], points[best, 1], d0[best]])


def _levenberg_marquardt(sites: Vector, ranges: Vector, theta: Vector) -> tuple[Vector, Vector, Vector]:
    """Refine theta; returns (theta, residuals, Jacobian) at the solution."""
    damping = 1e-3
    residual, jacobian = _residuals(sites, ranges, theta)
    cost = float(residual @ residual)
    for _ in range(MAX_ITERATIONS):
        jtj = jacobian.T @ jacobian
        gradient = jacobian.T @ residual
        try:
            step = np.linalg.solve(jtj + damping * np.diag(np.diag(jtj) + 1e-12), -gradient)
        except np.linalg.LinAlgError:
            raise DegenerateGeometry("the normal equations are singular") from None
        candidate = theta + step
        new_residual, new_jacobian = _residuals(sites, ranges, candidate)
        new_cost = float(new_residual @ new_residual)
        if new_cost <= cost:
            theta, residual, jacobian, cost = candidate, new_residual, new_jacobian, new_cost
            damping = max(damping / 10.0, 1e-12)
            if math.hypot(float(step[0]), float(step[1])) < STEP_TOLERANCE_M:
                return theta, residual, jacobian
        else:
            damping *= 10.0
            if damping > 1e12:
                return theta, residual, jacobian  # no step lowers the cost: a minimum
    raise NoConvergence(f"no convergence in {MAX_ITERATIONS} iterations")


def locate(
    detections: Sequence[Detection],
    *,
    speed_of_sound_mps: float = SPEED_OF_SOUND_MPS,
    timing_sigma_s: float = DEFAULT_TIMING_SIGMA_S,
) -> GunshotFix:
    """The source of the shot the `detections` heard (one per sensor: a sensor heard
    twice keeps its earliest detection). Raises `TooFewDetections`, `DegenerateGeometry`
    or `NoConvergence`."""
    if not speed_of_sound_mps > 0.0 or not timing_sigma_s > 0.0:
        raise ValueError("speed of sound and timing sigma must be > 0")
    first: dict[str, Detection] = {}
    for d in detections:
        if d.sensor_id not in first or d.t_ns < first[d.sensor_id].t_ns:
            first[d.sensor_id] = d
    used = sorted(first.values(), key=lambda d: d.t_ns)
    if len(used) < 3:
        raise TooFewDetections(f"need detections from 3+ sensors, got {len(used)}")
    origin = (sum(d.lat for d in used) / len(used), sum(d.lon for d in used) / len(used))
    local = [displacement_m(origin, (d.lat, d.lon)) for d in used]
    sites = np.array([(east, north) for north, east in local], dtype=np.float64)
    spread = np.linalg.svd(sites - sites.mean(axis=0), compute_uv=False)
    if spread[1] < MIN_SPREAD_M or spread[1] < MIN_SPREAD_RATIO * spread[0]:
        raise DegenerateGeometry(
            f"sensors nearly collinear or co-located (principal spreads {spread[0]:.1f}, {spread[1]:.1f})"
        )
    t_ref = used[0].t_ns
    ranges = np.array([(d.t_ns - t_ref) * 1e-9 * speed_of_sound_mps for d in used], dtype=np.float64)
    theta, residual, jacobian = _levenberg_marquardt(sites, ranges, _grid_guess(sites, ranges))
    if math.hypot(float(theta[0]), float(theta[1])) > MAX_RANGE_M:
        raise NoConvergence(f"solution {math.hypot(float(theta[0]), float(theta[1])):.0f} m from the sensors")
    sigma_r = speed_of_sound_mps * timing_sigma_s
    ssr = float(residual @ residual)
    dof = len(used) - 3
    scale = max(1.0, ssr / (dof * sigma_r**2)) if dof > 0 else 1.0
    try:
        covariance = np.linalg.inv(jacobian.T @ jacobian) * sigma_r**2 * scale
    except np.linalg.LinAlgError:
        raise DegenerateGeometry("the solution's geometry is singular") from None
    largest = float(np.linalg.eigvalsh(covariance[:2, :2]).max())
    lat, lon = offset(origin, float(theta[1]), float(theta[0]))
    return GunshotFix(
        lat,
        lon,
        t_ref + round(float(theta[2]) / speed_of_sound_mps * 1e9),
        math.sqrt(CHI2_2DOF_95 * max(0.0, largest)),
        math.sqrt(ssr / len(used)),
        tuple(d.sensor_id for d in used),
    )


__all__ = [
    "DEFAULT_TIMING_SIGMA_S",
    "SPEED_OF_SOUND_MPS",
    "DegenerateGeometry",
    "Detection",
    "GunshotFix",
    "MultilatError",
    "NoConvergence",
    "TooFewDetections",
    "locate",
]
