"""Presence and connection history (devicesvc writes them from the broker's client events, ADR-0013)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, get
from litestar.params import QueryParameter

from api.auth import CallerPrincipal
from api.context import tenant_transaction
from api.params import Id, IdCursor, Limit
from kestrel.store import devices, presence


class Presence(msgspec.Struct, frozen=True, kw_only=True):
    device_id: str
    online: bool
    connections: int
    last_seen: datetime | None
    connected_at: datetime | None
    disconnected_at: datetime | None
    disconnect_reason: str | None
    reported_status: str | None
    protocol: int | None
    changed_at: datetime | None


class Connection(msgspec.Struct, frozen=True, kw_only=True):
    node: str
    connected_at: datetime
    disconnected_at: datetime | None
    reason: str | None
    peer: str | None
    protocol: int | None


@get(
    "/presence",
    operation_id="listPresence",
    summary="Presence of the tenant's devices (who is online)",
    tags=["presence"],
)
async def list_presence(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    online: Annotated[bool | None, QueryParameter(description="Only online (true) or offline (false)")] = None,
    limit: Limit = 100,
    cursor: IdCursor = None,
) -> list[Presence]:
    tenant = principal.need("devices:read")
    async with tenant_transaction(request, tenant) as conn:
        rows = await presence.page(conn, tenant, online=online, after=cursor, limit=limit)
    return [Presence(**r) for r in rows]


@get(
    "/devices/{device_id:str}/presence",
    operation_id="getDevicePresence",
    summary="A device's presence",
    tags=["presence"],
)
async def get_presence(request: Request[Any, Any, Any], principal: CallerPrincipal, device_id: Id) -> Presence:
    tenant = principal.need("devices:read")
    async with tenant_transaction(request, tenant) as conn:
        await devices.get(conn, tenant, device_id)
        return Presence(**await presence.get(conn, tenant, device_id))


@get(
    "/devices/{device_id:str}/connections",
    operation_id="listDeviceConnections",
    summary="A device's connection history, newest first",
    tags=["presence"],
)
async def list_connections(
    request: Request[Any, Any, Any], principal: CallerPrincipal, device_id: Id, limit: Limit = 100
) -> list[Connection]:
    tenant = principal.need("devices:read")
    async with tenant_transaction(request, tenant) as conn:
        await devices.get(conn, tenant, device_id)
        return [Connection(**r) for r in await presence.connections(conn, tenant, device_id, limit=limit)]


ROUTES = [list_presence, get_presence, list_connections]
