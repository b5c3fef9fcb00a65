"""`bluelight agent`: run an edge agent. Only parses arguments; the library does the work."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import click

from edge_agent.settings import load_settings


class _Deferred(types.ModuleType):
    """Stands in for a module until one of its attributes is used, then imports it."""

    def __getattr__(self, attribute: str) -> Any:
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)  # binds the real module on its package too
        return getattr(real, attribute)


def defer_urllib_request() -> None:
    """Import `urllib.request` only if something uses it. paho-mqtt imports it (and with
    it http.client, email.parser, tempfile and shutil: ~1.5 MB RSS, about 4 % of an agent)
    but uses it only to read proxy settings when PySocks is installed. (The stdlib's
    `LazyLoader` does not help: on Python 3.11 the import statement itself reads the
    module's `__spec__`, which runs it.) Done on the agent's own entry point only,
    before paho is imported; any later use of the module gets the real one."""
    name = "urllib.request"
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None:
        return
    stub = _Deferred(name)
    stub.__spec__ = spec
    sys.modules[name] = stub
    import urllib  # noqa: PLC0415

    urllib.request = stub  # what a real import binds


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
    defer_urllib_request()
    from edge_agent.agent import Agent  # noqa: PLC0415 - after defer_urllib_request()

    async def main() -> None:
        with Agent(settings) as device:
            await device.run(install_signals=True)

    asyncio.run(main())
