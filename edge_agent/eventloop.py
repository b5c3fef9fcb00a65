"""The event loop the command line runs on: uvloop where it is installed (the simulator
runs thousands of agents on one loop, and uvloop's C loop costs a fraction of the stdlib
one per timer, callback and socket event), else asyncio's own.

    result = run(main())                 # like asyncio.run
    BLUELIGHT_LOOP=asyncio bluelight ... # force the stdlib loop

Nothing in the agent depends on which loop runs it: its MQTT connection is an
`asyncio.Protocol` on the loop's own TLS transport, which both loops provide.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: Environment variable: `asyncio` forces the stdlib loop, `uvloop` requires uvloop.
LOOP_ENV = "BLUELIGHT_LOOP"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's `new_event_loop` if it is installed and not switched off, else None
    (asyncio's default)."""
    choice = os.environ.get(LOOP_ENV, "").strip().lower()
    if choice == "asyncio":
        return None
    try:
        import uvloop  # noqa: PLC0415 - optional
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """`uvloop` or `asyncio`: which loop runs (for logs and benchmark reports)."""
    loop = loop or asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(main: Coroutine[Any, Any, T], *, debug: bool | None = None) -> T:
    """`asyncio.run(main)` on the loop `loop_factory()` picks."""
    with asyncio.Runner(debug=debug, loop_factory=loop_factory()) as runner:
        return runner.run(main)


__all__ = ["LOOP_ENV", "loop_factory", "loop_name", "run"]
