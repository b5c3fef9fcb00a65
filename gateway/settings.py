"""The gateway's settings: one frozen, self-validating object, loaded from the `[gateway]`
section of a TOML file, `BLUELIGHT_GATEWAY_<KEY>` environment variables and command-line
values (later wins). Nothing is read at import time."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from certs.pki import DEFAULT_GATEWAY_ID, Pki
from edge_agent.config import build, load_section, parse_hostport
from edge_agent.errors import ConfigError
from edge_agent.wire.ids import check_id

if TYPE_CHECKING:
    from gateway.store import Retention

SECTION = "gateway"
MQTT_PROTOCOLS = ("5", "3.1.1")
REQUIRED = {"pki_dir": "--pki", "broker": "--broker", "db_path": "--db"}


@dataclass(frozen=True)
class GatewaySettings:
    """Validated gateway settings. TLS is always on (MQTT and HTTPS are both mutual TLS);
    there is no option to turn it off."""

    #: The PKI directory holding the CA bundle, the CRL and the gateway's identity.
    pki_dir: Path
    #: `host:port` of the broker's mutual-TLS listener.
    broker: str
    #: The SQLite database file (created if missing).
    db_path: Path
    #: The gateway's identity (certificate CN); it signs receipts and serves HTTPS.
    gateway_id: str = DEFAULT_GATEWAY_ID
    #: Where the HTTPS API listens. Port 0 picks a free port (tests).
    http_host: str = "127.0.0.1"
    http_port: int = 8443
    #: A batch is committed when it holds this many messages or this much time passed.
    batch_size: int = 500
    batch_latency_ms: int = 50
    #: Replay window per sender (sequence numbers), like IPsec's anti-replay bitmap.
    replay_window: int = 4096
    #: Clock skew past this bound (ms) is flagged on the stored message.
    skew_bound_ms: int = 2000
    #: The skew estimate is the smallest (receive - device time) seen in this window.
    skew_window_s: int = 600
    #: Bound of the inbox (messages received, not yet taken into a batch). Near it the
    #: gateway stops reading the broker connection, so the broker keeps the rest queued.
    #: Sent as MQTT 5 Receive Maximum too. At least 1024.
    queue_bound: int = 2000
    #: A device gets at most one receipt per this interval (the first at once).
    receipt_interval_ms: int = 2000
    #: How long the broker keeps the gateway's session (and queues for it) while it is
    #: down (MQTT 5; an MQTT 3.1.1 persistent session lasts until the broker's
    #: `persistent_client_expiration`).
    session_expiry_s: int = 86_400
    #: How often a summary line is logged.
    report_interval_s: float = 10.0
    #: Processes that verify signatures, each owning a share of the senders, so the
    #: checks use the other cores (0: verify on a thread of the gateway process).
    verify_workers: int = 2
    #: MQTT version of the ingest connection: "3.1.1" or "5" (see gateway.ingest for why
    #: 3.1.1 is the default: paho parses MQTT 5 properties of every PUBLISH slowly).
    mqtt_protocol: str = "3.1.1"
    #: The shared-subscription group gateways split the uplink stream in.
    share_group: str = "bl-gateway"
    #: Data minimisation: raw telemetry (officers' and vehicles' tracks) is deleted this
    #: many days after the gateway received it (`Store.prune`) ...
    retention_days: int = 31
    #: ... and every other stored kind (events, status, acks) after this many. The audit
    #: log is never pruned.
    event_retention_days: int = 365
    #: Next-best-action policy (YAML, docs/next-best-action.md); the built-in default
    #: policy when unset.
    policy_path: Path | None = None
    #: Units (kind, call sign, capabilities, supervisor), fixed sensor sites and
    #: geofence zones (YAML). Devices not listed are shown but never dispatched.
    registry_path: Path | None = None
    #: Street graph (GeoJSON LineStrings) for arrival-time estimates; without it,
    #: straight-line distance times the policy's detour factor.
    map_path: Path | None = None
    #: ANPR hotlist (YAML: `hotlist: [{plate, reason, expires_ts, priority, markers}]`); the
    #: gateway rewrites it when operators change the hotlist through the API.
    hotlist_path: Path | None = None
    #: How often alert timeouts, escalations and arrivals are checked, and picture
    #: changes are sent to WebSocket clients (ms).
    tick_ms: int = 200

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            object.__setattr__(self, f.name, _coerce(f.name, f.type, value))
        check_id(self.gateway_id)
        check_id(self.share_group)
        parse_hostport(self.broker)
        if self.mqtt_protocol not in MQTT_PROTOCOLS:
            raise ValueError(f"mqtt_protocol must be one of {', '.join(MQTT_PROTOCOLS)}, got {self.mqtt_protocol!r}")
        if not self.http_host or any(c in self.http_host for c in "/ "):
            raise ValueError(f"http_host must be a host name or address, got {self.http_host!r}")
        _in_range("http_port", self.http_port, 0, 65535)
        _in_range("batch_size", self.batch_size, 1, 100_000)
        _in_range("batch_latency_ms", self.batch_latency_ms, 1, 60_000)
        _in_range("replay_window", self.replay_window, 64, 1 << 20)
        _in_range("skew_bound_ms", self.skew_bound_ms, 0, 86_400_000)
        _in_range("skew_window_s", self.skew_window_s, 1, 86_400)
        _in_range("queue_bound", self.queue_bound, 1024, 65_535)
        _in_range("verify_workers", self.verify_workers, 0, 64)
        _in_range("receipt_interval_ms", self.receipt_interval_ms, 0, 60_000)
        _in_range("session_expiry_s", self.session_expiry_s, 0, 2**32 - 1)
        _in_range("report_interval_s", self.report_interval_s, 0.1, 86_400)
        _in_range("retention_days", self.retention_days, 1, 36_500)
        _in_range("event_retention_days", self.event_retention_days, 1, 36_500)
        _in_range("tick_ms", self.tick_ms, 10, 10_000)

    @property
    def broker_host(self) -> str:
        return parse_hostport(self.broker)[0]

    @property
    def broker_port(self) -> int:
        return parse_hostport(self.broker)[1]

    @property
    def state_path(self) -> Path:
        """Where the situational picture's durable state is kept: beside the store
        (`gw.db` -> `gw.situation.db`)."""
        return self.db_path.with_suffix(".situation.db")

    @property
    def retention(self) -> Retention:
        """The retention rule for `Store.prune`."""
        from gateway.store import Retention  # noqa: PLC0415 - settings load without the store's extras

        return Retention(self.retention_days, self.event_retention_days)

    @property
    def pki(self) -> Pki:
        return Pki(self.pki_dir)

    def require_pki(self) -> GatewaySettings:
        """Refuse to start without the CA, the CRL and the gateway's own identity."""
        self.pki.require().require_identity(self.gateway_id)
        return self


def _in_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")


def _coerce(name: str, kind: Any, value: Any) -> Any:
    """Values from the environment arrive as strings; turn them into the field's type."""
    kind = str(kind)
    if kind == "Path | None":
        if value is None or value == "":
            return None
        kind = "Path"
    if kind == "Path":
        if not isinstance(value, str | Path) or not str(value):
            raise ValueError(f"{name} must be a path, got {value!r}")
        return Path(value).expanduser()
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"{name} must be a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if kind == "str" and not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    return value


def load_settings(
    config: Path | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    check_pki: bool = True,
) -> GatewaySettings:
    """Settings from file, environment and explicit values, validated; by default also
    checks that the PKI and the gateway identity exist."""
    values = load_section(config, SECTION, environ=environ, overrides=overrides)
    missing = [f"{option} (or {key} in [{SECTION}])" for key, option in REQUIRED.items() if key not in values]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}")
    settings: GatewaySettings = build(GatewaySettings, values, SECTION)
    return settings.require_pki() if check_pki else settings
