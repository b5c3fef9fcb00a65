"""`bluelight agent`: run an edge agent. Only parses arguments; the library does the work."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click

from edge_agent.agent import Agent
from edge_agent.settings import load_settings


@click.group()
def agent() -> None:
    """The edge agent: signs readings, keeps them in a durable outbox, sends them over
    mutual-TLS MQTT and deletes them only on the gateway's signed receipt."""


@agent.command()
@click.option("--pki", "pki_dir", type=click.Path(path_type=Path), help="PKI directory holding this identity.")
@click.option("--id", "id", help="This device's identity (its certificate CN).")
@click.option("--broker", help="Broker HOST:PORT (mutual TLS).")
@click.option("--config", type=click.Path(path_type=Path), help="TOML file with an [agent] section.")
@click.option("--outbox", type=click.Path(path_type=Path), help="SQLite outbox file [<pki>/../agent-<id>.db].")
@click.option("--rate", "rate_hz", type=float, help="Telemetry readings per second [1].")
@click.option("--seed", type=int, help="Seed for the simulated drivers (repeatable runs).")
@click.option("--panic-at", "panic_at_s", type=float, multiple=True, help="Press panic N seconds after start.")
def run(config: Path | None, **options: Any) -> None:
    """Run a simulated device (GPS on a London loop, panic button) until SIGINT/SIGTERM.

    SIGUSR1 presses the panic button. Settings come from --config, then
    BLUELIGHT_AGENT_<KEY> environment variables, then these options.
    """
    options["panic_at_s"] = options["panic_at_s"] or None
    settings = load_settings(config, options)

    async def main() -> None:
        with Agent(settings) as device:
            await device.run(install_signals=True)

    asyncio.run(main())
