"""`bluelight gateway` and `bluelight tail` (being built)."""

import click


@click.group()
def gateway() -> None:
    """The gateway."""


@click.command()
def tail() -> None:
    """Print the live stream."""
