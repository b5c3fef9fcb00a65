"""`bluelight agent`: run an edge agent. Only parses arguments; the library does the work.

The options of `agent run` are `edge_agent.entry.RUN_OPTIONS`, shared with the
click-free parser that `bluelight agent run` on a device goes through."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from edge_agent.entry import RUN_OPTIONS, _path, run_agent

__all__ = ["agent", "run"]


def _click_type(kind: Callable[[str], Any]) -> Any:
    return click.Path(path_type=Path) if kind is _path else kind


@click.group()
def agent() -> None:
    """The edge agent: signs readings, keeps them in a durable outbox, sends them over
    mutual-TLS MQTT and deletes them only on the gateway's signed receipt."""


def _run(config: Path | None, **options: Any) -> None:
    """Run a simulated device (GPS on a London loop, panic button) until SIGINT/SIGTERM.

    SIGUSR1 presses the panic button. Settings come from --config, then
    BLUELIGHT_AGENT_<KEY> environment variables, then these options.
    """
    run_agent(config, options)


for _option in reversed(RUN_OPTIONS):  # click lists options in decorator order
    _run = click.option(
        _option.flag, _option.dest, type=_click_type(_option.kind), multiple=_option.multiple, help=_option.help
    )(_run)
run = agent.command(name="run")(_run)
