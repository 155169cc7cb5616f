"""A service's process: a stop event for SIGTERM/SIGINT, and the runner every ``__main__`` uses."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any


def stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def run_service(name: str, amain: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """A service's process: JSON logs, uvloop, and one clear line (exit 2) for a bad setting."""
    import sys  # noqa: PLC0415

    import uvloop  # noqa: PLC0415

    from kestrel.runtime.logs import configure_logging  # noqa: PLC0415
    from kestrel_core.errors import InvalidInput  # noqa: PLC0415

    configure_logging(name)
    try:
        uvloop.run(amain())
    except InvalidInput as exc:
        print(f"kestrel {name}: {exc.detail}", file=sys.stderr)
        return 2
    return 0
