"""`bluelight agent run` without click: the device's own, lighter entry point.

A device runs one command for its whole life, so `bluelight` (`bluelight.entry.main`)
parses an ordinary `bluelight [-v] agent run --opt VALUE ...` here and never imports
click (~0.8 MB RSS, 14 modules, about 2 % of an agent). The options are one table,
`RUN_OPTIONS`, from which `edge_agent.cli` also builds the click command, so both accept
exactly the same flags. Anything this parser is not sure about (`--help`, an unknown
or misspelt option, a missing value, a value that does not convert, a value starting
with `-`, extra arguments) is left to click, which answers it as it always has: the
fast path only ever runs command lines click would have run the same way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.errors import BluelightError

#: How every `bluelight` command logs (the root group in `bluelight.cli` uses it too).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _path(value: str) -> Path:
    """What `click.Path(path_type=Path)` accepts: any path, but one that exists must be
    readable (else click refuses it, so this parser leaves it to click)."""
    if os.path.exists(value) and not os.access(value, os.R_OK):
        raise ValueError(f"{value} is not readable")
    return Path(value)


@dataclass(frozen=True)
class RunOption:
    """One option of `bluelight agent run`: flag, settings key, value type, help."""

    flag: str
    dest: str
    kind: Callable[[str], Any]
    help: str
    multiple: bool = False


RUN_OPTIONS: tuple[RunOption, ...] = (
    RunOption("--pki", "pki_dir", _path, "PKI directory holding this identity."),
    RunOption("--id", "id", str, "This device's identity (its certificate CN)."),
    RunOption("--broker", "broker", str, "Broker HOST:PORT (mutual TLS)."),
    RunOption("--config", "config", _path, "TOML file with an [agent] section."),
    RunOption("--outbox", "outbox", _path, "SQLite outbox file [<pki>/../agent-<id>.db]."),
    RunOption("--rate", "rate_hz", float, "Telemetry readings per second [1]."),
    RunOption("--seed", "seed", int, "Seed for the simulated drivers (repeatable runs)."),
    RunOption("--panic-at", "panic_at_s", float, "Press panic N seconds after start.", multiple=True),
)


def parse_run(args: Sequence[str]) -> dict[str, Any] | None:
    """The options of `agent run ARGS` as click would pass them (None when unset, a
    tuple for `--panic-at`), or None when click should handle the command line."""
    by_flag = {option.flag: option for option in RUN_OPTIONS}
    values: dict[str, Any] = {o.dest: () if o.multiple else None for o in RUN_OPTIONS}
    i = 0
    while i < len(args):
        flag, equals, value = args[i].partition("=")
        option = by_flag.get(flag)
        if option is None:  # --help, -h, unknown options, positional arguments, `--`
            return None
        if not equals:
            if i + 1 == len(args):
                return None
            i += 1
            value = args[i]
        if value.startswith("-"):
            return None
        try:
            converted = option.kind(value)
        except ValueError:
            return None
        values[option.dest] = (*values[option.dest], converted) if option.multiple else converted
        i += 1
    return values


def run_agent(config: Path | None, options: Mapping[str, Any]) -> None:
    """What `bluelight agent run` does with its parsed options, whichever parser read them."""
    from edge_agent.settings import load_settings  # noqa: PLC0415 - the entry point stays light

    options = {**options, "panic_at_s": options.get("panic_at_s") or None}
    settings = load_settings(config, options)
    from edge_agent.agent import Agent  # noqa: PLC0415 - the entry point stays light

    async def main() -> None:
        with Agent(settings) as device:
            await device.run(install_signals=True)

    asyncio.run(main())


def configure_logging(verbose: int) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT, stream=sys.stderr)


def _split_verbose(argv: Sequence[str]) -> tuple[int, list[str]] | None:
    """`[-v | -vv | --verbose ...] REST` -> (count, REST); None for other root options."""
    verbose = 0
    for i, arg in enumerate(argv):
        if arg == "--verbose":
            verbose += 1
        elif len(arg) > 1 and arg[0] == "-" and set(arg[1:]) == {"v"}:
            verbose += len(arg) - 1
        elif arg.startswith("-"):
            return None
        else:
            return verbose, list(argv[i:])
    return None


def fast_main(argv: Sequence[str]) -> bool:
    """Run `bluelight [-v] agent run ...` without click if the command line is one this
    module parses as click would; False (nothing done) otherwise. Errors an operator can
    act on end the process as click's would: `Error: <message>` on stderr, exit 1."""
    split = _split_verbose(argv)
    if split is None or split[1][:2] != ["agent", "run"]:
        return False
    verbose, rest = split
    options = parse_run(rest[2:])
    if options is None:
        return False
    config = options.pop("config")
    configure_logging(verbose)
    try:
        run_agent(config, options)
    except BluelightError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # before the agent's own SIGINT handler is installed
        print("\nAborted!", file=sys.stderr)
        sys.exit(1)
    return True
