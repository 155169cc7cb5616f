"""How storage functions are called: on one connection, inside the caller's transaction, on behalf of an actor.

The API opens a transaction per request with its tenant set for row-level security (``tenant_scope``) and calls
the functions of this package in it; the operator CLI does the same on its own connection, as ``cli:<user>``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import getpass
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection

T = TypeVar("T")


@dataclass(frozen=True)
class Actor:
    """Who changes something, as the audit log records it, and the request it was part of."""

    name: str  # "user:<id>/token:<id>", "token:<id>", "oauth:<client>", "platform-admin", "cli:<os user>"
    request_id: str


def operator() -> Actor:
    """The operator at this terminal (the CLI): ``cli:<os user>``, one request id per command."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        user = "unknown"
    return Actor(f"cli:{user}", f"cli-{uuid.uuid4().hex}")


@asynccontextmanager
async def tenant_scope(conn: AsyncConnection[Any], tenant: str) -> AsyncIterator[AsyncConnection[Any]]:
    """One transaction whose row-level security context is ``tenant`` (``kestrel.tenant``, migration 0008)."""
    async with conn.transaction():
        await conn.execute("SELECT set_config('kestrel.tenant', %s, true)", (tenant,))
        yield conn


@asynccontextmanager
async def connect(url: str) -> AsyncIterator[AsyncConnection[Any]]:
    """One connection (the CLI's), closed afterwards."""
    async with await psycopg.AsyncConnection.connect(url) as conn:
        yield conn


def run_blocking(url: str, work: Callable[[AsyncConnection[Any]], Awaitable[T]], *, tenant: str | None = None) -> T:
    """The one bridge for synchronous callers (the CLI, seeding): ``work`` on a new connection in one transaction
    (the tenant's, when given), committed when it returns. From inside a running event loop (an async test), it
    runs on a thread of its own."""

    async def go() -> T:
        async with connect(url) as conn:
            if tenant is None:
                async with conn.transaction():
                    return await work(conn)
            async with tenant_scope(conn, tenant):
                return await work(conn)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(go())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, go()).result()
