"""The benchmark harnesses, run briefly (ingest: 2 devices, ~2 s a run, real Mosquitto,
the real gateway; the agent footprint: a few seconds). Counts must add up and the
figures must have their documented keys."""

from __future__ import annotations

import json
import subprocess
import sys
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


def test_agent_footprint_bench_runs_briefly() -> None:
    """`bench/agent-footprint` end to end for a few seconds: figures present, nothing lost."""
    script = Path(__file__).resolve().parents[2] / "bench" / "agent-footprint"
    out = subprocess.run([sys.executable, str(script), "--duration", "6", "--interval", "1", "--json"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "| steady RSS (median; spread) |" in out.stdout
    figures = json.loads(out.stdout[out.stdout.index("{"):])
    assert figures["produced"] >= 3
    assert figures["stored"] >= figures["produced"]
    assert 5 < figures["steady_rss_mb"] < 500
    assert figures["steady_pss_mb"] <= figures["steady_rss_mb"]
    assert figures["cpu_s_per_hour"] is not None


def test_fleet_bench_runs_briefly() -> None:
    """`bench/fleet` end to end with a handful of devices: nothing lost, the simulator
    runs below the broker's and gateway's priority, and the figures are all there."""
    script = Path(__file__).resolve().parents[2] / "bench" / "fleet"
    out = subprocess.run([sys.executable, str(script), "--devices", "4", "--duration", "8", "--drain", "30",
                          "--sample", "1", "--json"], capture_output=True, text=True, timeout=240, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    figures = json.loads(out.stdout[out.stdout.index("\n{") :])
    assert figures["devices_started"] == 4
    assert figures["produced"] >= 4 * 5
    assert figures["stored"] == figures["produced"]
    assert figures["missing"] == 0
    assert figures["zero_loss"] is True
    [priority] = figures["config"]["sim_priority"]
    assert priority["nice"] == figures["config"]["sim_nice"] == 10
    assert priority["autogroup_nice"] in (None, 10)  # None: a kernel without autogroups
    assert figures["config"]["device_dir"].startswith("/dev/shm/" if Path("/dev/shm").is_dir() else "/")
    assert not Path(figures["config"]["device_dir"]).exists()  # removed with the run
    assert sum(figures["machine_split_pct"].values()) == pytest.approx(100, abs=1)
    for group in figures["groups"].values():
        assert {"cpu_us_per_msg", "growth_mb_per_min", "late_growth_mb_per_min"} <= set(group)
    assert "| growth, 2nd half |" in out.stdout


def test_mqtt_client_bench_measures_both_clients() -> None:
    """bench/mqtt-client, 3 connections for 3 s: both clients publish about once a second
    per connection and each gets a CPU figure."""
    bench = Path(__file__).parents[2] / "bench" / "mqtt-client"
    done = subprocess.run(
        [sys.executable, str(bench), "--connections", "3", "--seconds", "3", "--warmup", "1", "--json"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    figures = json.loads(done.stdout[done.stdout.index("{") :])
    assert figures["connections"] == 3
    assert set(figures["results"]) == {"agent", "floor"}
    for result in figures["results"].values():
        assert 6 <= result["publishes"] <= 12, result
        assert result["cpu_us_per_publish"] > 0
