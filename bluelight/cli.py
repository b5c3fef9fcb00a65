"""`bluelight`: one command line, a subcommand group per role. Each group lives with
its runtime and only parses arguments; library errors become one-line messages."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from pathlib import Path
from typing import Any

import click

from edge_agent.entry import configure_logging
from edge_agent.errors import BluelightError

#: Every role's subcommand (group), as "module:attribute", imported only when it is run
#: or listed: `bluelight agent run` on a device then loads the agent's modules and no
#: others (not the broker supervisor, the gateway's or the simulator's command lines).
LAZY_COMMANDS: dict[str, str] = {
    "pki": "certs.cli:pki",
    "broker": "bluelight.broker_cli:broker",
    "agent": "edge_agent.cli:agent",
    "gateway": "gateway.cli:gateway",
    "audit": "gateway.cli:audit",
    "tail": "gateway.cli:tail",
    "sim": "firmware_sim.cli:sim",
}


class OneLineUsageError(click.ClickException):
    """A usage error printed as one line (click's default adds the usage block)."""

    exit_code = 2


def _one_line(exc: click.UsageError) -> OneLineUsageError:
    where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
    return OneLineUsageError(f"{exc.format_message()}{where}")


class BluelightGroup(click.Group):
    """Turns library and usage errors into one-line CLI errors with a non-zero exit, and
    imports each subcommand's module only when that subcommand is wanted."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None or cmd_name not in LAZY_COMMANDS:
            return command
        module, _, attribute = LAZY_COMMANDS[cmd_name].partition(":")
        loaded = getattr(importlib.import_module(module), attribute)
        if not isinstance(loaded, click.Command):
            raise TypeError(f"{LAZY_COMMANDS[cmd_name]} is not a click command")
        self.add_command(loaded, cmd_name)
        return loaded

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            raise _one_line(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _one_line(exc) from None
        except BluelightError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=BluelightGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="Debug log output.")
def cli(verbose: int) -> None:
    """Bluelight: signed telemetry over mutual-TLS MQTT, a fusing gateway, officer alerts."""
    configure_logging(verbose)


@cli.command()
@click.option("--dir", "work_dir", default=Path("var/demo"), show_default=True, type=click.Path(path_type=Path),
              help="Work directory (its PKI, databases and outboxes are recreated each run).")
@click.option("--broker-port", default=8883, show_default=True, type=int, help="Broker TLS port.")
@click.option("--http-port", default=8443, show_default=True, type=int, help="Gateway HTTPS port.")
@click.option("--devices", type=int,
              help="Scale the fleet to this many devices in all, like 'bluelight sim run --devices' "
                   "(default: the scenario's 50; too few to hold a unit an incident needs is refused).")
@click.option("--speed", default=1.0, show_default=True, type=float,
              help="Time acceleration: 10 plays the 15-minute incident timeline in 90 s.")
@click.option("--seed", default=1, show_default=True, type=int, help="Seed for routes and sensor noise.")
def demo(**options: Any) -> None:
    """Run the whole platform on this box: PKI, broker, gateway and the simulator's
    'demo' scenario (44 units, 6 fixed sensors, an incident every couple of minutes,
    repeating) until Ctrl-C."""
    from bluelight.demo import DemoSettings, run_demo  # noqa: PLC0415 - only the demo needs it

    settings = DemoSettings(**options)
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        asyncio.run(run_demo(settings, echo=lambda line: click.echo(line, err=True)))
    click.echo("demo: stopped", err=True)


def main() -> None:
    """The click CLI; the console script is `bluelight.entry:main`, which runs an agent
    without loading click."""
    cli(prog_name="bluelight")
