"""Connection pools that survive a database restart (issue 10): every connection is checked when it is taken, so
one that died with the server is replaced instead of failing the request that drew it."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from psycopg_pool.base import AttemptWithBackoff

log = logging.getLogger("kestrel.store")
P = ParamSpec("P")
T = TypeVar("T")

#: What a request may see while the database restarts: answer "unavailable", never "not found" or 500.
TRANSIENT = (psycopg.OperationalError, PoolTimeout)

# psycopg_pool retries a failed connection after 1 s, then 2, 4, 8 ... and keeps that schedule after the server is
# back: a 5 s restart left requests failing for 10 s more (issue 10). Every pool of ours is local to a service that
# needs its database now, so it retries after 0.25 s, growing by half each time (at most ~1.3 s
# apart within one 3 s attempt). (Class constants of psycopg_pool 3.3, pinned;
# tests/e2e/test_database_restart.py fails if they stop being honoured.)
AttemptWithBackoff.INITIAL_DELAY = 0.25
AttemptWithBackoff.DELAY_BACKOFF = 1.5


def checked_pool(url: str, *, min_size: int = 1, max_size: int = 10, timeout: float = 5.0) -> AsyncConnectionPool[Any]:
    """A pool (not yet open) whose connections are verified on checkout, recycled after an hour, and re-created
    promptly once the server is back."""
    return AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        open=False,
        timeout=timeout,
        check=AsyncConnectionPool.check_connection,
        max_lifetime=3600.0,
        # Past this, an attempt gives up (logged) and the next request that needs a connection starts a fresh one.
        reconnect_timeout=3.0,
    )


def retry_read_once(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Retry an idempotent read once when its connection broke under it (the server restarted between the pool's
    check and the query); a second failure propagates."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except PoolTimeout:
            raise  # no connection came in time: waiting twice as long helps nobody
        except psycopg.OperationalError as exc:
            log.info("database connection lost during a read; retrying once", extra={"error": str(exc)[:200]})
            return await fn(*args, **kwargs)

    return wrapper
