"""The `bluelight` console script. `bluelight agent run ...` on a device goes straight
to the agent's click-free parser (`edge_agent.entry`); every other command line, and
any agent command line that parser is not sure about, goes to the click CLI
(`bluelight.cli`), which has the whole tree, `--help` and the one-line errors."""

from __future__ import annotations

import sys


def main() -> None:
    from edge_agent.entry import fast_main  # noqa: PLC0415 - imports nothing heavy

    if fast_main(sys.argv[1:]):
        return
    from bluelight.cli import main as cli_main  # noqa: PLC0415 - click only when needed

    cli_main()
