"""Device groups and their members."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
from litestar import Request, delete, get, post, put
from litestar.params import JSONBody

from api.auth import CallerPrincipal
from api.context import tenant_transaction
from api.params import STRICT, Id, IdField, Label
from api.preconditions import IdempotencyKey, remember, replay
from kestrel.store import groups


class Group(msgspec.Struct, frozen=True, kw_only=True):
    group_id: str
    name: str
    devices: int
    version: int
    created_at: datetime


class GroupCreate(msgspec.Struct, **STRICT):
    group_id: IdField
    name: Label = ""


@get("/groups", operation_id="listGroups", summary="List device groups", tags=["groups"])
async def list_groups(request: Request[Any, Any, Any], principal: CallerPrincipal) -> list[Group]:
    tenant = principal.need("groups:read")
    async with tenant_transaction(request, tenant) as conn:
        return [Group(**r) for r in await groups.list_all(conn, tenant)]


@post("/groups", operation_id="createGroup", summary="Create a device group", tags=["groups"])
async def create_group(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    data: JSONBody[GroupCreate],
    idempotency_key: IdempotencyKey = None,
) -> Group:
    tenant = principal.need("groups:write")
    async with tenant_transaction(request, tenant) as conn:
        if (stored := await replay(conn, tenant, idempotency_key, "group", data)) is not None:
            return msgspec.convert(stored, Group)
        group = Group(**await groups.create(conn, principal.acting(request), tenant, data.group_id, data.name))
        await remember(conn, tenant, idempotency_key, "group", data, group)
    return group


@get("/groups/{group_id:str}", operation_id="getGroup", summary="Get a device group", tags=["groups"])
async def get_group(request: Request[Any, Any, Any], principal: CallerPrincipal, group_id: Id) -> Group:
    tenant = principal.need("groups:read")
    async with tenant_transaction(request, tenant) as conn:
        return Group(**await groups.get(conn, tenant, group_id))


@delete(
    "/groups/{group_id:str}",
    operation_id="deleteGroup",
    summary="Delete a device group (not its devices)",
    tags=["groups"],
    status_code=204,
)
async def delete_group(request: Request[Any, Any, Any], principal: CallerPrincipal, group_id: Id) -> None:
    tenant = principal.need("groups:write")
    async with tenant_transaction(request, tenant) as conn:
        await groups.delete(conn, principal.acting(request), tenant, group_id)


@put(
    "/groups/{group_id:str}/devices/{device_id:str}",
    operation_id="addGroupMember",
    summary="Add a device to a group",
    tags=["groups"],
    status_code=204,
)
async def add_group_member(
    request: Request[Any, Any, Any], principal: CallerPrincipal, group_id: Id, device_id: Id
) -> None:
    tenant = principal.need("groups:write")
    async with tenant_transaction(request, tenant) as conn:
        await groups.add_member(conn, principal.acting(request), tenant, group_id, device_id)


@delete(
    "/groups/{group_id:str}/devices/{device_id:str}",
    operation_id="removeGroupMember",
    summary="Remove a device from a group",
    tags=["groups"],
    status_code=204,
)
async def remove_group_member(
    request: Request[Any, Any, Any], principal: CallerPrincipal, group_id: Id, device_id: Id
) -> None:
    tenant = principal.need("groups:write")
    async with tenant_transaction(request, tenant) as conn:
        await groups.remove_member(conn, principal.acting(request), tenant, group_id, device_id)


ROUTES = [list_groups, create_group, get_group, delete_group, add_group_member, remove_group_member]
