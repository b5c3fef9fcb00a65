"""Loading settings: a TOML file section, then `BLUELIGHT_<SECTION>_<KEY>` environment
overrides, then command-line values. Each service validates the result in its own
frozen settings dataclass; nothing is read at import time."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edge_agent.errors import ConfigError


def load_section(
    path: Path | None,
    section: str,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge file, environment and explicit values for one `[section]`; later wins.
    `None` overrides are ignored so unset CLI options do not mask the file."""
    values: dict[str, Any] = {}
    if path is not None:
        import tomllib  # noqa: PLC0415 - only with a config file (an agent usually has none)

        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        found = data.get(section, {})
        if not isinstance(found, dict):
            raise ConfigError(f"[{section}] in {path} must be a table")
        values.update(found)
    prefix = f"BLUELIGHT_{section.upper()}_"
    env = os.environ if environ is None else environ
    values.update({k[len(prefix):].lower(): v for k, v in env.items() if k.startswith(prefix)})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return values


def parse_hostport(value: str, *, what: str = "broker") -> tuple[str, int]:
    """`host:port` -> (host, port), with a message that says what is wrong."""
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--{what} must be HOST:PORT (e.g. localhost:8883), got {value!r}")
    return host, int(port)


def build(cls: type[Any], values: Mapping[str, Any], section: str) -> Any:
    """Construct a settings dataclass, turning unknown keys and bad values into `ConfigError`."""
    fields = set(getattr(cls, "__dataclass_fields__", {}))
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"unknown [{section}] setting(s): {', '.join(unknown)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[{section}] {exc}") from None


_YAML_BOOL_TAG = "tag:yaml.org,2002:bool"


def yaml_12_booleans(loader: type[Any]) -> None:
    """Make a PyYAML loader class read booleans as YAML 1.2 does: only true/false, so
    `on`, `no` and `yes` in a scenario or policy file stay text (YAML 1.1 reads a plate
    or a place named `NO` as false). Used by the simulator's and the gateway's files."""
    loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _YAML_BOOL_TAG]
        for first, resolvers in loader.yaml_implicit_resolvers.items()
    }
    loader.add_implicit_resolver(_YAML_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def line_numbered_map(loader: Any, node: Any, out: Any, fail: Callable[[int, str], Exception]) -> Any:
    """Build a PyYAML mapping into `out` (a dict subclass with `line` and `lines`),
    recording the line of the mapping and of each key; a key that is not text, or comes
    twice, is `fail(line, message)`. Shared by the scenario and policy loaders."""
    loader.flatten_mapping(node)
    out.line = node.start_mark.line + 1
    out.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            raise fail(line, f"key {key!r} must be a name")
        if key in out:
            raise fail(line, f"duplicate key {key!r}")
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = line
    return out
