"""`bluelight pki`: create the CAs, issue and revoke identities. Each issue and
revocation is recorded in the PKI's audit log (`DIR/audit.db`)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from certs.pki import DEFAULT_GATEWAY_ID, DEFAULT_HOSTS, Pki, PkiError
from edge_agent.wire.ids import InvalidId, Role

ISSUABLE_ROLES = [r.value for r in Role if r is not Role.ADMIN] + [Role.ADMIN.value]

dir_option = click.option(
    "--dir", "pki_dir", required=True, type=click.Path(path_type=Path), help="The PKI directory (keep it out of git)."
)
actor_option = click.option(
    "--actor", help="Who is doing this, for the audit log (e.g. the installer's id; default: the OS user)."
)


@click.group()
def pki() -> None:
    """Certificates: CAs, identities, revocation."""


@pki.command()
@dir_option
@click.option("--host", "hosts", multiple=True, default=DEFAULT_HOSTS, show_default=True,
              help="Name or IP the broker and gateway are reached at (repeat).")
@click.option("--gateway-id", default=DEFAULT_GATEWAY_ID, show_default=True, help="The gateway's identity.")
@actor_option
def init(pki_dir: Path, hosts: tuple[str, ...], gateway_id: str, actor: str | None) -> None:
    """Create a root CA, an issuing CA, a CRL, the broker's and the gateway's
    certificates, and the audit log (DIR/audit.db) that records them."""
    try:
        Pki(pki_dir).init(hosts=hosts, gateway_id=gateway_id, actor=actor)
    except InvalidId as exc:
        raise PkiError(str(exc)) from None
    click.echo(f"PKI created in {pki_dir} (root key: {pki_dir / 'private/root-ca.key'}; move it offline)")


@pki.command()
@dir_option
@click.option("--role", required=True, type=click.Choice(ISSUABLE_ROLES), help="What the identity may do.")
@click.option("--id", "identity", required=True, help="The identity (certificate CN, topic id).")
@click.option("--days", default=365, show_default=True, type=click.IntRange(1, 3650), help="Validity in days.")
@actor_option
def issue(pki_dir: Path, role: str, identity: str, days: int, actor: str | None) -> None:
    """Generate a key here and issue a certificate (development and tests; devices enrol
    by CSR). Recorded in the audit log as `enrolment`."""
    try:
        ident = Pki(pki_dir).issue(Role(role), identity, validity=dt.timedelta(days=days), actor=actor)
    except InvalidId as exc:
        raise PkiError(str(exc)) from None
    click.echo(f"issued {role} {identity}: {ident.cert} {ident.key} {ident.chain}")


@pki.command()
@dir_option
@click.option("--id", "identity", required=True, help="The identity to revoke.")
@actor_option
def revoke(pki_dir: Path, identity: str, actor: str | None) -> None:
    """Revoke an identity: the CRL is rewritten; a running broker and gateway pick it
    up. Recorded in the audit log as `device.revoked`."""
    try:
        Pki(pki_dir).revoke(identity, actor=actor)
    except InvalidId as exc:
        raise PkiError(str(exc)) from None
    click.echo(f"revoked {identity}; CRL updated at {pki_dir / 'crl.pem'}")


@pki.command()
@dir_option
def crl(pki_dir: Path) -> None:
    """Re-sign the CRL (run well before its 30-day next-update passes)."""
    Pki(pki_dir).require().write_crl()
    click.echo(f"CRL re-signed at {pki_dir / 'crl.pem'}")
