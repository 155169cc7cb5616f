"""Presence and connection history (written by devicesvc from the broker's client events, ADR-0013)."""

from __future__ import annotations

from typing import Any, Final

from psycopg import AsyncConnection

from kestrel.store.rows import fetch_all, fetch_maybe

COLUMNS: Final = (
    "device_id, online, connections, last_seen, connected_at, disconnected_at, disconnect_reason, reported_status,"
    " protocol, changed_at"
)
CONNECTION_COLUMNS: Final = "node, connected_at, disconnected_at, reason, peer, protocol"


def offline(device: str) -> dict[str, Any]:
    """The presence of a device never seen."""
    row: dict[str, Any] = dict.fromkeys(c.strip() for c in COLUMNS.split(","))
    return row | {"device_id": device, "online": False, "connections": 0}


async def page(
    conn: AsyncConnection[Any], tenant: str, *, online: bool | None, after: str | None, limit: int
) -> list[dict[str, Any]]:
    """Presence rows of devices that have connected at least once, by device id."""
    return await fetch_all(
        conn,
        f"SELECT {COLUMNS} FROM device_presence WHERE tenant_id = %s AND (%s::boolean IS NULL OR online = %s)"
        " AND (%s::text IS NULL OR device_id > %s) ORDER BY device_id LIMIT %s",
        (tenant, online, online, after, after, limit),
    )


async def get(conn: AsyncConnection[Any], tenant: str, device: str) -> dict[str, Any]:
    row = await fetch_maybe(
        conn,
        f"SELECT {COLUMNS} FROM device_presence WHERE device_id = %s AND tenant_id = %s",
        (device, tenant),
    )
    return row or offline(device)


async def roster(conn: AsyncConnection[Any], tenant: str, *, online: bool | None) -> list[dict[str, Any]]:
    """Every device of the tenant but the decommissioned, online or not (the operator's view)."""
    return await fetch_all(
        conn,
        "SELECT d.device_id, coalesce(p.online, false) AS online, p.last_seen, p.connected_at, p.disconnected_at,"
        " p.reported_status FROM devices d LEFT JOIN device_presence p USING (device_id)"
        " WHERE d.tenant_id = %s AND d.status <> 'decommissioned'"
        " AND (%s::boolean IS NULL OR coalesce(p.online, false) = %s) ORDER BY d.device_id",
        (tenant, online, online),
    )


async def connections(conn: AsyncConnection[Any], tenant: str, device: str, *, limit: int) -> list[dict[str, Any]]:
    """A device's connections, newest first."""
    return await fetch_all(
        conn,
        f"SELECT {CONNECTION_COLUMNS} FROM device_connections WHERE device_id = %s AND tenant_id = %s"
        " ORDER BY connected_at DESC LIMIT %s",
        (device, tenant, limit),
    )
