"""Device groups and their members."""

from __future__ import annotations

from typing import Any, Final

import psycopg
from psycopg import AsyncConnection

from kestrel.store import audit, devices
from kestrel.store.rows import fetch_all, fetch_one
from kestrel.store.session import Actor
from kestrel_core.errors import Conflict, NotFound

QUERY: Final = """
SELECT g.group_id, g.name, g.version, g.created_at,
       (SELECT count(*) FROM device_group_members m WHERE m.tenant_id = g.tenant_id AND m.group_id = g.group_id)
         AS devices
FROM device_groups g WHERE g.tenant_id = %(tenant)s AND (%(group)s::text IS NULL OR g.group_id = %(group)s)
ORDER BY g.group_id
"""


async def list_all(conn: AsyncConnection[Any], tenant: str) -> list[dict[str, Any]]:
    return await fetch_all(conn, QUERY, {"tenant": tenant, "group": None})


async def get(conn: AsyncConnection[Any], tenant: str, group: str) -> dict[str, Any]:
    return await fetch_one(conn, QUERY, {"tenant": tenant, "group": group}, f"group {group} not found")


async def create(conn: AsyncConnection[Any], actor: Actor, tenant: str, group: str, name: str = "") -> dict[str, Any]:
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO device_groups (tenant_id, group_id, name) VALUES (%s, %s, %s)", (tenant, group, name)
            )
    except psycopg.errors.UniqueViolation as exc:
        raise Conflict(f"group {group} already exists") from exc
    created = await get(conn, tenant, group)
    await audit.record(conn, actor, tenant, "group.create", f"group:{group}", after=created)
    return created


async def delete(conn: AsyncConnection[Any], actor: Actor, tenant: str, group: str) -> None:
    """Delete a group (not its devices)."""
    before = await get(conn, tenant, group)
    await conn.execute("DELETE FROM device_groups WHERE tenant_id = %s AND group_id = %s", (tenant, group))
    await audit.record(conn, actor, tenant, "group.delete", f"group:{group}", before=before)


async def add_member(conn: AsyncConnection[Any], actor: Actor, tenant: str, group: str, device: str) -> None:
    await get(conn, tenant, group)
    await devices.get(conn, tenant, device)
    await conn.execute(
        "INSERT INTO device_group_members (tenant_id, group_id, device_id) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
        (tenant, group, device),
    )
    await audit.record(conn, actor, tenant, "group.add_device", f"group:{group}", after={"device_id": device})


async def remove_member(conn: AsyncConnection[Any], actor: Actor, tenant: str, group: str, device: str) -> None:
    cur = await conn.execute(
        "DELETE FROM device_group_members WHERE tenant_id = %s AND group_id = %s AND device_id = %s",
        (tenant, group, device),
    )
    if cur.rowcount == 0:
        raise NotFound(f"device {device} is not in group {group}")
    await audit.record(conn, actor, tenant, "group.remove_device", f"group:{group}", before={"device_id": device})
