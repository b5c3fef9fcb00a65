"""The dispatch benchmark's harness, run briefly: a few background devices, a few panics,
real Mosquitto, the real gateway. Every panic must be alerted to the units the policy
chooses, never to its subject, and the figures must have their documented keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.officers import FIGURE_KEYS, LATENCY_KEYS, DispatchConfig, run_dispatch

pytestmark = pytest.mark.integration


def test_dispatch_bench_alerts_the_right_units(tmp_path: Path) -> None:
    cfg = DispatchConfig(devices=5, rate_hz=2, officers=8, supervisors=2, incidents=3, spacing_s=2.0,
                         settle_s=1.0, tail_s=2.0, drain_timeout=10)

    figures = run_dispatch(cfg, tmp_path / "bench", log=lambda line: None)

    assert set(figures) == FIGURE_KEYS
    assert set(figures["latency"]) == LATENCY_KEYS
    choice, latency, background = figures["choice"], figures["latency"], figures["background"]
    assert choice["incidents"] == choice["with_alerts"] == 3
    assert choice["subject_alerted"] == 0
    assert choice["count_right"] == 3  # two nearest + a supervisor each time
    assert choice["matched_gateway"] == 3
    assert choice["matched_policy"] == choice["settled"]
    assert choice["merged"] == 0
    assert choice["bad_downlinks"] == 0
    assert latency["first"]["n"] == latency["all"]["n"] == 3
    assert 0 < latency["first"]["p50_ms"] <= latency["all"]["max_ms"]
    assert background["lost"] == background["duplicates"] == background["missing"] == 0
    assert background["rejected"] == {}
    assert figures["cpu"]["gateway"]["core_pct"] > 0
    assert len(figures["incidents"]) == 3
