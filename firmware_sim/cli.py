"""`bluelight sim`: run a scenario against a broker (and judge it with the gateway's API),
list the built-in scenarios, check a scenario file. Argument parsing only."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click

from edge_agent.errors import ConfigError


def _need_yaml() -> None:
    """Scenario files need PyYAML, which an edge device's install leaves out."""
    try:
        import yaml  # noqa: F401, PLC0415
    except ImportError:
        raise ConfigError("the simulator needs PyYAML: pip install 'bluelight[sim]'") from None


@click.group()
def sim() -> None:
    """The hardware simulator: a city of devices, incidents and faults from a scenario."""


@sim.command("list")
def list_() -> None:
    """List the built-in scenarios: one name and description a line."""
    _need_yaml()
    from firmware_sim.scenario import builtin_scenarios  # noqa: PLC0415 - keep `bluelight --help` fast

    for name, description in builtin_scenarios():
        click.echo(f"{name:<14} {description}")


@sim.command("check")
@click.argument("scenario")
@click.option("--devices", type=int, help="Scale the unit groups to this many devices in all.")
def check(scenario: str, devices: int | None) -> None:
    """Validate SCENARIO (a built-in name or a .yaml file) and say what it holds."""
    _need_yaml()
    from firmware_sim.scenario import load_scenario  # noqa: PLC0415

    loaded = load_scenario(scenario, devices=devices)
    click.echo(
        f"{loaded.source}: ok - {loaded.name}: {len(loaded.units)} units, {len(loaded.sensors)} fixed sensors, "
        f"{len(loaded.incidents)} incidents, {len(loaded.faults)} faults, {loaded.duration_s:g} s"
    )


@sim.command("run")
@click.argument("scenario")
@click.option("--pki", "pki_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="PKI directory; device certificates missing from it are issued.")
@click.option("--broker", required=True, help="Broker HOST:PORT (mutual TLS).")
@click.option("--speed", type=float, help="Time acceleration, e.g. 10 (default: the scenario's, usually 1).")
@click.option("--devices", type=int, help="Scale the unit groups to this many devices in all.")
@click.option("--seed", type=int, help="Seed (default: the scenario's); the same seed gives the same run.")
@click.option("--duration", "duration_s", type=float, help="Simulated seconds to run (default: the scenario's).")
@click.option("--rate", "rate_hz", type=float,
              help="Telemetry messages a second per mobile unit (default: the scenario's).")
@click.option("--truth", "truth_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Write the ground truth (JSON lines) to this file.")
@click.option("--gateway-api", help="Gateway API URL, e.g. https://localhost:8443/api/v1, to judge the platform.")
@click.option("--run-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Device outboxes and agents.log (default: <pki>/../sim); keep it between runs.")
@click.option("--drain", "drain_s", type=float, default=60.0, show_default=True,
              help="Seconds to wait at the end for every message to be receipted.")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Also write the summary as JSON to this file.")
@click.option("--shard", help="I/K: run only every K-th device from the I-th (0-based), to split a fleet over "
              "K simulator processes (each with its own --run-dir).")
def run(
    *,
    scenario: str,
    pki_dir: Path,
    broker: str,
    speed: float | None,
    devices: int | None,
    seed: int | None,
    duration_s: float | None,
    rate_hz: float | None,
    truth_path: Path | None,
    gateway_api: str | None,
    run_dir: Path | None,
    drain_s: float,
    json_path: Path | None,
    shard: str | None,
) -> None:
    """Run SCENARIO (a built-in name from 'bluelight sim list' or a .yaml file).

    Every device is a real edge agent with its own certificate and mutual-TLS
    connection. Shows a progress line, then a summary of what each fault did and what
    the platform did about it; exits 1 if the platform misbehaved (e.g. lost a message).
    """
    _need_yaml()
    from edge_agent.eventloop import run as run_loop  # noqa: PLC0415
    from firmware_sim.clock import SimClock  # noqa: PLC0415
    from firmware_sim.fleet import FleetOptions, run_fleet  # noqa: PLC0415
    from firmware_sim.scenario import load_scenario  # noqa: PLC0415
    from firmware_sim.summary import Progress  # noqa: PLC0415

    if speed is not None:
        SimClock(speed)  # validates the range with a one-line error
    loaded = load_scenario(scenario, seed=seed, devices=devices, duration_s=duration_s, speed=speed, rate_hz=rate_hz)
    if shard is not None:
        index, sep, count = shard.partition("/")
        if not (sep and index.isdigit() and count.isdigit() and int(count) > 0):
            raise ConfigError(f"--shard must be I/K, e.g. 0/2, got {shard!r}")
        loaded = loaded.shard(int(index), int(count))
    options = FleetOptions(
        pki_dir=pki_dir, broker=broker, run_dir=run_dir, gateway_api=gateway_api, truth_path=truth_path,
        drain_s=drain_s,
    )
    if not Path(pki_dir).is_dir():
        raise ConfigError(f"no PKI directory {pki_dir}: run 'bluelight pki init --dir {pki_dir}' first")
    progress = Progress(sys.stderr)
    try:
        summary = run_loop(run_fleet(loaded, options, progress=progress))
    except KeyboardInterrupt:
        progress.finish()
        click.echo("sim: interrupted", err=True)
        sys.exit(130)
    for line in summary.lines():
        click.echo(line)
    if truth_path is not None:
        click.echo(f"Ground truth: {truth_path}")
    if json_path is not None:
        with contextlib.suppress(OSError):
            json_path.write_text(json.dumps(summary.as_dict(), indent=2) + "\n")
    if not summary.ok:
        sys.exit(1)
