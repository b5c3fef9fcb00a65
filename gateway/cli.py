"""`bluelight gateway run`, `bluelight tail` and `bluelight audit`: argument parsing
only; the library does the work and its errors become one-line messages."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
from pathlib import Path

import click

from certs.pki import DEFAULT_GATEWAY_ID, Pki
from edge_agent import eventloop

#: `sys.setswitchinterval` for the gateway process (Python's default is 0.005).
GIL_SWITCH_S = 0.001


@click.group()
def gateway() -> None:
    """The gateway: verify and store the uplink stream, serve the HTTPS API."""


@gateway.command("run")
@click.option("--config", type=click.Path(path_type=Path, dir_okay=False), help="TOML file with a [gateway] table.")
@click.option("--pki", "pki_dir", type=click.Path(path_type=Path, file_okay=False), help="PKI directory.")
@click.option("--broker", help="Broker HOST:PORT (mutual TLS).")
@click.option("--db", "db_path", type=click.Path(path_type=Path, dir_okay=False), help="SQLite database file.")
@click.option("--http-host", help="Address the HTTPS API listens on (default 127.0.0.1).")
@click.option("--http-port", type=int, help="Port of the HTTPS API (default 8443; 0 picks a free one).")
@click.option("--gateway-id", help=f"The gateway's identity in the PKI (default {DEFAULT_GATEWAY_ID}).")
@click.option("--policy", "policy_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Next-best-action policy (YAML; default: the built-in policy).")
@click.option("--registry", "registry_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Units, capabilities, sensor sites and geofences (YAML).")
@click.option("--map", "map_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Street graph (GeoJSON) for arrival times (default: straight lines).")
@click.option("--hotlist", "hotlist_path", type=click.Path(path_type=Path, dir_okay=False),
              help="ANPR hotlist (YAML).")
def run(
    *,
    config: Path | None,
    pki_dir: Path | None,
    broker: str | None,
    db_path: Path | None,
    http_host: str | None,
    http_port: int | None,
    gateway_id: str | None,
    policy_path: Path | None,
    registry_path: Path | None,
    map_path: Path | None,
    hotlist_path: Path | None,
) -> None:
    """Run the gateway until Ctrl-C: ingest, store, receipts and the HTTPS API.

    Settings come from --config, then BLUELIGHT_GATEWAY_<KEY> environment variables,
    then these options."""
    # Imported here so that `bluelight` on an edge device never needs the gateway extras.
    from gateway.service import Gateway, serve  # noqa: PLC0415
    from gateway.settings import load_settings  # noqa: PLC0415

    settings = load_settings(
        config,
        overrides={
            "pki_dir": pki_dir, "broker": broker, "db_path": db_path,
            "http_host": http_host, "http_port": http_port, "gateway_id": gateway_id,
            "policy_path": policy_path, "registry_path": registry_path, "map_path": map_path,
            "hotlist_path": hotlist_path,
        },
    )

    def ready(gw: Gateway) -> None:
        # What start-up loaded (modules, policy, street graph, registry) lives as long as
        # the process: leave it out of collections. Full collections over it took 40-96
        # ms every few seconds at 2,000 devices, stalling alarms behind them.
        gc.freeze()
        click.echo(
            f"gateway {settings.gateway_id}: API at {gw.api_url} (mutual TLS; OpenAPI {gw.api_url}/openapi.json, "
            f"docs {gw.api_url}/docs); ingest from {settings.broker}; store {settings.db_path}; "
            f"{eventloop.loop_name()} event loop",
        )

    # The event loop, the database thread and the verify pipes' threads share the GIL:
    # hand it over every 1 ms instead of 5, so an alarm's commit does not wait out the
    # loop's time slices at every SQLite step.
    sys.setswitchinterval(GIL_SWITCH_S)
    eventloop.run(serve(settings, on_ready=ready))


@click.command()
@click.option(
    "--pki", "pki_dir", required=True, type=click.Path(path_type=Path, file_okay=False), help="PKI directory."
)
@click.option("--broker", required=True, help="Broker HOST:PORT (mutual TLS).")
@click.option("--id", "identity", default=DEFAULT_GATEWAY_ID, show_default=True, help="Identity to connect as.")
def tail(pki_dir: Path, broker: str, identity: str) -> None:
    """Print the live uplink stream, verified and decoded, one line a message.

    Lines read `HH:MM:SS.mmm <id> #<seq> <kind> <json body>` (device time, UTC) or
    `REJECTED <reason> <topic>: <detail>`. Ctrl-C stops."""
    from gateway.tail import run_tail  # noqa: PLC0415 - see `run`

    def out(line: str) -> None:
        click.echo(line)
        sys.stdout.flush()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_tail(Pki(pki_dir), broker, identity, out=out))


#: `bluelight audit verify` exit status when the log itself is broken (1 is bad input).
EXIT_BROKEN = 3


class AuditBroken(click.ClickException):
    """The audit log failed verification: printed as one line, exit status 3."""

    exit_code = EXIT_BROKEN


@click.group()
def audit() -> None:
    """The tamper-evident audit logs (the gateway's database, the PKI's audit.db): verify, show."""


@audit.command("verify")
@click.argument("db_path", metavar="DB", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--pki", "pki_dir", type=click.Path(path_type=Path, file_okay=False),
    help="PKI directory whose issuing CA and gateway certificates check the signatures "
    "(without it: the hash chain only).",
)
def audit_verify(db_path: Path, pki_dir: Path | None) -> None:
    """Verify an audit log: a gateway database, or a PKI's DIR/audit.db (issuing and
    revocation): the hash chain, the head record and, with --pki, every entry's
    signature (by the PKI's issuing CA or one of its gateways).

    Prints `ok: N entries, head SEQ:HASH` and exits 0, or names the first broken entry
    and exits 3 (1 for bad input)."""
    from certs.auditlog import verify_db  # noqa: PLC0415 - see `run`
    from certs.registry import audit_keys  # noqa: PLC0415

    keys = audit_keys(Pki(pki_dir)) if pki_dir is not None else None
    report = verify_db(db_path, keys)
    if report.broken is not None:
        raise AuditBroken(report.broken.describe())
    scope = "" if keys is not None else " (hash chain only: signatures not checked without --pki)"
    click.echo(f"ok: {report.count} entries, head {report.head.seq}:{report.head.hash.hex()}{scope}")


@audit.command("show")
@click.argument("db_path", metavar="DB", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--last", type=click.IntRange(min=1), help="Only the last N entries.")
def audit_show(db_path: Path, last: int | None) -> None:
    """Print audit entries in order, one a line:
    `#SEQ TIME ACTION ACTOR -> SUBJECT DATA [KID HASH]` (time in UTC). Shows what is
    stored; `bluelight audit verify` says whether it can be trusted."""
    from certs.auditchain import entry_line  # noqa: PLC0415
    from certs.auditlog import open_for_reading, read_entries  # noqa: PLC0415 - see `run`

    conn = open_for_reading(db_path)
    try:
        for entry in read_entries(conn, last=last):
            click.echo(entry_line(entry))
    finally:
        conn.close()
