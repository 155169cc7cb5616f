"""Tenants. Platform operations go through the narrow functions of migration 0008 (``kestrel_platform_*``), which
run as the owner and audit themselves: the platform role can call them and nothing else. Inside a tenant's own
transaction a tenant sees only its own row.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
import psycopg
from psycopg import AsyncConnection

from kestrel.store.rows import fetch_all, fetch_maybe
from kestrel.store.session import Actor
from kestrel_core.errors import Conflict, NotFound, PreconditionFailed
from kestrel_core.topics import require_id

COLUMNS: Final = (
    "tenant_id, name, status, max_devices, api_requests_per_s, ingest_messages_per_s, max_rules, rule_actions_per_s,"
    " version, created_at"
)
#: Raised by kestrel_platform_update_tenant when If-Match names an older version.
STALE_VERSION: Final = "P0412"


async def list_all(conn: AsyncConnection[Any]) -> list[dict[str, Any]]:
    return await fetch_all(conn, f"SELECT {COLUMNS} FROM kestrel_platform_tenants()")


async def get_any(conn: AsyncConnection[Any], tenant: str) -> dict[str, Any] | None:
    """Any tenant (platform role)."""
    return await fetch_maybe(
        conn,
        f"SELECT {COLUMNS} FROM kestrel_platform_tenants() WHERE tenant_id = %s",
        (tenant,),
    )


async def get_own(conn: AsyncConnection[Any], tenant: str) -> dict[str, Any] | None:
    """The tenant's own row, inside its transaction."""
    return await fetch_maybe(conn, f"SELECT {COLUMNS} FROM tenants WHERE tenant_id = %s", (tenant,))


async def require(conn: AsyncConnection[Any], tenant: str) -> None:
    """``NotFound`` unless ``tenant`` exists (and is visible to the caller)."""
    if await fetch_maybe(conn, "SELECT 1 AS found FROM tenants WHERE tenant_id = %s", (tenant,)) is None:
        raise NotFound(f"tenant {tenant} does not exist")


async def create(
    conn: AsyncConnection[Any],
    actor: Actor,
    tenant: str,
    *,
    name: str = "",
    max_devices: int | None = None,
    api_requests_per_s: int | None = None,
    ingest_messages_per_s: int | None = None,
    exist_ok: bool = False,
) -> dict[str, Any] | None:
    """Create a tenant (audited); None when it existed and ``exist_ok``, else ``Conflict``."""
    require_id("tenant", tenant)
    try:
        async with conn.transaction():  # a savepoint when the caller has a transaction open
            rows = await fetch_all(
                conn,
                f"SELECT {COLUMNS} FROM kestrel_platform_create_tenant(%s, %s, %s, %s, %s, %s, %s)",
                (tenant, name, max_devices, api_requests_per_s, ingest_messages_per_s, actor.name, actor.request_id),
            )
    except psycopg.errors.UniqueViolation as exc:
        if exist_ok:
            return None
        raise Conflict(f"tenant {tenant} already exists") from exc
    return rows[0]


async def update(
    conn: AsyncConnection[Any], actor: Actor, tenant: str, changes: dict[str, Any], *, expected_version: int | None
) -> dict[str, Any]:
    """Change a tenant's name, status or quotas (audited); ``PreconditionFailed`` on a stale version."""
    try:
        rows = await fetch_all(
            conn,
            f"SELECT {COLUMNS} FROM kestrel_platform_update_tenant(%s, %s, %s, %s, %s)",
            (tenant, expected_version, msgspec.json.encode(changes).decode(), actor.name, actor.request_id),
        )
    except psycopg.Error as exc:
        if exc.sqlstate == STALE_VERSION:
            raise PreconditionFailed("the tenant changed since it was read") from exc
        raise
    if not rows:
        raise NotFound(f"tenant {tenant} not found")
    return rows[0]


async def device_counts(conn: AsyncConnection[Any]) -> dict[str, int]:
    """Devices per tenant (the operator's view: the system role sees every tenant)."""
    rows = await fetch_all(conn, "SELECT tenant_id, count(*) AS devices FROM devices GROUP BY tenant_id")
    return {r["tenant_id"]: r["devices"] for r in rows}
