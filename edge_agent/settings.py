"""The agent's one settings object: built once in `main()` from TOML + environment +
command line (`load_settings`), validated here, frozen afterwards.

TOML form (all keys optional except `pki_dir`, `id`, `broker`)::

    [agent]
    pki_dir = "var/pki"
    id = "dev-a"
    broker = "localhost:8883"
    rate_hz = 1.0
    route = [[51.508, -0.128], [51.5105, -0.1206], [51.5129, -0.1173]]
    panic_at_s = [30.0]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from certs.pki import Pki
from edge_agent.config import build, load_section, parse_hostport
from edge_agent.drivers.gps import LONDON_LOOP, Route
from edge_agent.errors import ConfigError
from edge_agent.outbox import SYNC_MODES
from edge_agent.wire.geo import LatLon
from edge_agent.wire.ids import InvalidId, check_id

SECTION = "agent"


@dataclass(frozen=True)
class AgentSettings:
    """Validated edge-agent settings. Values from the environment arrive as strings and
    are converted here, once; a bad value is a `ConfigError` naming the setting."""

    pki_dir: Path
    id: str
    broker: str
    #: SQLite outbox; default `<pki_dir>/../agent-<id>.db`.
    outbox: Path | None = None
    #: Telemetry readings per second.
    rate_hz: float = 1.0
    route: tuple[LatLon, ...] = LONDON_LOOP
    speed_mps: float = 8.0
    noise_m: float = 5.0
    noise_correlation_s: float = 5.0
    #: Seed for the simulated drivers; None draws a fresh one.
    seed: int | None = None
    #: Seconds after start at which the simulated panic button is pressed.
    panic_at_s: tuple[float, ...] = ()
    #: Outbox bounds: past these the oldest telemetry is dropped (never alarms or acks).
    max_rows: int = 100_000
    max_age_s: float = 86_400.0
    #: "full" fsyncs every appended message (alarms survive power loss and a seq that
    #: was sent is never reused); "normal" survives a process crash only; "off" too, and
    #: never fsyncs (simulated fleets, whose devices share one operating system).
    sync: Literal["full", "normal", "off"] = "full"
    #: Re-send a message not receipted by the gateway after this long.
    resend_after_s: float = 10.0
    #: Sent marks and receipts are committed with the next append or this long later at
    #: most (0: each at once). Losing them in a crash only causes re-sends.
    bookkeeping_delay_s: float = 5.0
    #: Publishes awaiting a PUBACK at once.
    inflight: int = 64
    keepalive_s: int = 30
    #: MQTT 5 session expiry: the broker keeps our subscription and queued receipts this long.
    session_expiry_s: int = 86_400
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    #: Seconds a publish may wait for its PUBACK before it counts as failed.
    publish_timeout_s: float = 20.0
    #: How often progress (sent/confirmed/pending) is logged; 0 disables it.
    progress_every_s: float = 30.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "pki_dir", Path(self.pki_dir))
        if self.outbox is not None:
            set_(self, "outbox", Path(self.outbox))
        try:
            check_id(self.id)
        except InvalidId as exc:
            raise ConfigError(f"[agent] id: {exc}") from None
        parse_hostport(self.broker)
        for name, kind in (
            ("rate_hz", float),
            ("speed_mps", float),
            ("noise_m", float),
            ("noise_correlation_s", float),
            ("max_rows", int),
            ("max_age_s", float),
            ("resend_after_s", float),
            ("bookkeeping_delay_s", float),
            ("inflight", int),
            ("keepalive_s", int),
            ("session_expiry_s", int),
            ("reconnect_min_s", float),
            ("reconnect_max_s", float),
            ("publish_timeout_s", float),
            ("progress_every_s", float),
        ):
            set_(self, name, _number(name, getattr(self, name), kind))
        if self.seed is not None:
            set_(self, "seed", _number("seed", self.seed, int))
        set_(self, "panic_at_s", tuple(_number("panic_at_s", t, float) for t in _list(self.panic_at_s)))
        if isinstance(self.route, str):
            raise ConfigError("[agent] route must be a list of [lat, lon] pairs (set it in the TOML file)")
        try:
            route = Route(tuple((p[0], p[1]) if len(p) == 2 else p for p in self.route))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"[agent] route: {exc}") from None
        set_(self, "route", route.waypoints)
        if self.sync not in SYNC_MODES:
            raise ConfigError(f"[agent] sync must be one of {', '.join(SYNC_MODES)}, got {self.sync!r}")
        _check(0 < self.rate_hz <= 100, "rate_hz must be in (0, 100]")
        _check(0 <= self.speed_mps <= 100, "speed_mps must be in [0, 100]")
        _check(self.noise_m >= 0 and self.noise_correlation_s >= 0, "noise_m and noise_correlation_s must be >= 0")
        _check(all(t >= 0 for t in self.panic_at_s), "panic_at_s must be >= 0")
        _check(self.max_rows >= 10, "max_rows must be >= 10")
        _check(self.max_age_s > 0 and self.resend_after_s > 0, "max_age_s and resend_after_s must be > 0")
        _check(0 <= self.bookkeeping_delay_s <= 60, "bookkeeping_delay_s must be in [0, 60]")
        _check(1 <= self.inflight <= 1000, "inflight must be 1-1000")
        _check(5 <= self.keepalive_s <= 300, "keepalive_s must be 5-300 (the broker caps it at 300)")
        _check(self.session_expiry_s >= 0, "session_expiry_s must be >= 0")
        _check(
            0 < self.reconnect_min_s <= self.reconnect_max_s,
            "reconnect_min_s must be > 0 and <= reconnect_max_s",
        )
        _check(self.publish_timeout_s > 0 and self.progress_every_s >= 0, "timeouts must be positive")
        self._check_identity()

    def _check_identity(self) -> None:
        pki = Pki(self.pki_dir)
        if not pki.ca_bundle.is_file():
            raise ConfigError(f"no CA bundle at {pki.ca_bundle}: is --pki right? ('bluelight pki init' makes one)")
        ident = pki.identity(self.id)
        for what, path in (("certificate", ident.chain), ("private key", ident.key)):
            if not path.is_file():
                raise ConfigError(
                    f"no {what} for {self.id!r} at {path}: run 'bluelight pki issue --dir {self.pki_dir} "
                    f"--role device --id {self.id}'"
                )

    @property
    def broker_host(self) -> str:
        return parse_hostport(self.broker)[0]

    @property
    def broker_port(self) -> int:
        return parse_hostport(self.broker)[1]

    @property
    def outbox_path(self) -> Path:
        return self.outbox or self.pki_dir.resolve().parent / f"agent-{self.id}.db"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"[agent] {message}")


def _list(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [v for v in value.replace(",", " ").split() if v]
    if isinstance(value, int | float):
        return [value]
    return list(value)


def _number(name: str, value: Any, kind: type[int] | type[float]) -> Any:
    """Convert once at the boundary: TOML gives numbers, the environment gives strings."""
    if isinstance(value, bool):
        raise ConfigError(f"[agent] {name} must be a number, got {value!r}")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"[agent] {name} must be {what}, got {value!r}") from None
    if kind is int and isinstance(value, float) and value != number:
        raise ConfigError(f"[agent] {name} must be an integer, got {value!r}")
    if not math.isfinite(number):
        raise ConfigError(f"[agent] {name} must be finite, got {value!r}")
    return number


def load_settings(config: Path | None, overrides: Mapping[str, Any] | None = None) -> AgentSettings:
    """`[agent]` from `config`, then `BLUELIGHT_AGENT_*`, then `overrides` (CLI values)."""
    values = load_section(config, SECTION, overrides=overrides)
    for required in ("pki_dir", "id", "broker"):
        if required not in values:
            flag = {"pki_dir": "--pki", "id": "--id", "broker": "--broker"}[required]
            raise ConfigError(f"missing {flag} (or {required} in [agent] of the config file)")
    settings: AgentSettings = build(AgentSettings, values, SECTION)
    return settings
