"""`bluelight broker`: run or print the Mosquitto configuration."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from bluelight.broker import Broker, BrokerError, BrokerSettings, render_acl, render_config
from certs.pki import DEFAULT_GATEWAY_ID, Pki


def _settings(
    pki_dir: Path, port: int, host: str, data_dir: Path | None, gateway_ids: tuple[str, ...]
) -> BrokerSettings:
    return BrokerSettings(pki_dir=pki_dir, port=port, host=host, data_dir=data_dir, gateway_ids=gateway_ids)


_options = [
    click.option("--pki", "pki_dir", required=True, type=click.Path(path_type=Path), help="PKI directory."),
    click.option("--port", default=8883, show_default=True, type=int, help="TLS port."),
    click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on."),
    click.option("--data", "data_dir", type=click.Path(path_type=Path), help="Config, ACL and persistence dir."),
    click.option("--gateway-id", "gateway_ids", multiple=True, default=(DEFAULT_GATEWAY_ID,), show_default=True,
                 help="Identity allowed to read all uplinks and write all downlinks (repeat)."),
]


F = TypeVar("F", bound=Callable[..., Any])


def _with_options(fn: F) -> F:
    for option in reversed(_options):
        fn = option(fn)
    return fn


@click.group()
def broker() -> None:
    """The Mosquitto broker: mutual TLS, per-identity ACLs, live revocation."""


@broker.command()
@_with_options
def run(pki_dir: Path, port: int, host: str, data_dir: Path | None, gateway_ids: tuple[str, ...]) -> None:
    """Run Mosquitto in the foreground, apply revocations as the CRL changes, and restart it if it dies."""
    settings = _settings(pki_dir, port, host, data_dir, gateway_ids)

    async def _run() -> int:
        task = asyncio.current_task()
        assert task is not None
        # SIGTERM stops Mosquitto too, like Ctrl-C: never leave an orphaned broker.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        async with Broker(settings) as b:
            click.echo(f"broker: mqtts://{host}:{port} (config {b.config_path})", err=True)
            return await b.supervise()

    try:
        code = asyncio.run(_run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        code = 0
    if code:
        raise BrokerError(f"mosquitto exited with status {code}; see its log above")


@broker.command()
@_with_options
def config(pki_dir: Path, port: int, host: str, data_dir: Path | None, gateway_ids: tuple[str, ...]) -> None:
    """Print the mosquitto.conf and ACL for operators who run their own Mosquitto."""
    settings = _settings(pki_dir, port, host, data_dir, gateway_ids)
    pki = Pki(pki_dir).require()
    acl_path = settings.work_dir / "acl"
    click.echo(render_config(settings, pki, acl_path))
    click.echo(f"# --- {acl_path} ---")
    click.echo(render_acl(settings.gateway_ids, pki.revoked_ids()))
