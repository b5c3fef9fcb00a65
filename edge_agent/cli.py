"""`bluelight agent` (being built)."""

import click


@click.group()
def agent() -> None:
    """The edge agent."""
