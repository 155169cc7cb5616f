"""What a route needs from its request: the database pools, the request id, the tenant's transaction."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from kestrel.store.session import tenant_scope
from kestrel_core.errors import Unavailable


def pool(request: ASGIConnection[Any, Any, Any, Any]) -> AsyncConnectionPool[Any]:
    """The API role's pool (kestrel_api: row-level security applies to everything it reads or writes)."""
    result: AsyncConnectionPool[Any] = request.app.state.pool
    return result


def platform_pool(request: Request[Any, Any, Any]) -> AsyncConnectionPool[Any]:
    """The platform operations' own connection (role kestrel_platform, migration 0012); tenant requests never use
    it, and kestrel_api cannot run these operations at all."""
    result: AsyncConnectionPool[Any] | None = request.app.state.platform_pool
    if result is None:
        raise Unavailable("platform operations are not configured (KESTREL_API_PLATFORM_DATABASE_URL)")
    return result


def request_id(request: Request[Any, Any, Any]) -> str:
    """The caller's ``X-Request-Id`` when it is a sane one, else a new id."""
    given = request.headers.get("x-request-id", "")
    return given if re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", given) else uuid.uuid4().hex


@asynccontextmanager
async def tenant_transaction(request: Request[Any, Any, Any], tenant: str) -> AsyncIterator[AsyncConnection[Any]]:
    """A connection inside one transaction whose row-level security context is ``tenant``."""
    async with pool(request).connection() as conn, tenant_scope(conn, tenant):
        yield conn
