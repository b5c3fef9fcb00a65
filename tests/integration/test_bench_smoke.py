"""The ingest benchmark's harness, run briefly: 2 devices, ~2 s a run, real Mosquitto,
the real gateway. Counts must add up and the figures must have their documented keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.loadgen import FIGURE_KEYS, REAL_KEYS, RUN_KEYS, BenchConfig, run_bench

pytestmark = pytest.mark.integration


def test_bench_counts_add_up(tmp_path: Path) -> None:
    lines: list[str] = []
    cfg = BenchConfig(devices=2, duration=2.0, rate=1000, drain_timeout=15)

    figures = run_bench(cfg, tmp_path / "bench", log=lines.append)

    assert set(figures) == FIGURE_KEYS
    assert figures["config"]["devices"] == 2
    assert figures["machine"]["cores"] >= 1
    assert "mosquitto version" in figures["machine"]["mosquitto"]

    raw, real = figures["raw"], figures["real"]
    assert set(raw) >= RUN_KEYS
    assert set(real) >= RUN_KEYS | REAL_KEYS
    for run in (raw, real):
        # ~2 s at 1,000 msg/s plus one warm-up message per device, all acknowledged.
        assert 1800 <= run["published"] <= 2100, run
        assert run["failed"] == 0
        assert run["delivered"] == run["published"]
        assert run["lost"] == 0
        assert run["duplicates"] == 0
        assert 0 < run["latency_p50_ms"] <= run["latency_p99_ms"] <= run["latency_max_ms"]
        assert run["msgs_per_s"] > 500

    # The gateway stored every (device, seq) once, says none is missing, and its signed
    # receipts confirmed each one to the device that sent it.
    assert real["stored_rows"] == real["distinct"] == real["published"]
    assert real["missing"] == 0
    assert real["receipts_confirmed"] == real["published"]
    assert real["bad_receipts"] == 0
    assert real["phantom_receipts"] == 0
    assert real["accepted"] == real["published"]
    assert real["rejected"] == {}
    assert real["store_latency_samples"] == real["published"] - 2
    assert figures["zero_loss"] is True
    assert figures["ratio"] == pytest.approx(real["msgs_per_s"] / raw["msgs_per_s"], rel=0.01)
    assert any("[raw]" in line for line in lines)
    assert any("[real]" in line for line in lines)
