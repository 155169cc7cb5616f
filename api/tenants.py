"""Tenants: the platform administrator creates and changes them (through the platform role); a tenant's own token
reads its own (ADR-0012)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, Response, get, patch, post
from litestar.params import JSONBody

from api.auth import CallerPrincipal
from api.context import platform_pool, tenant_transaction
from api.params import STRICT, Id, IdField, Label, Limit32
from api.preconditions import IfMatch, etag, expected_version
from kestrel.store import tenants
from kestrel_core.errors import NotFound


class Tenant(msgspec.Struct, frozen=True, kw_only=True):
    tenant_id: str
    name: str
    status: str
    max_devices: int | None
    api_requests_per_s: int | None
    ingest_messages_per_s: int | None
    #: Rules the tenant may have, and rule actions (desired state, commands, republish, derived metrics) per second
    #: across every rule worker.
    max_rules: int
    rule_actions_per_s: int
    version: int
    created_at: datetime


class TenantCreate(msgspec.Struct, **STRICT):
    tenant_id: IdField
    name: Label = ""
    max_devices: Limit32 | None = None
    api_requests_per_s: Limit32 | None = None
    ingest_messages_per_s: Limit32 | None = None


class TenantPatch(msgspec.Struct, **STRICT):
    name: Label | None = None
    status: Literal["active", "suspended"] | None = None
    max_devices: Limit32 | None = None
    api_requests_per_s: Limit32 | None = None
    ingest_messages_per_s: Limit32 | None = None
    max_rules: Annotated[int, msgspec.Meta(ge=0, le=100_000)] | None = None
    rule_actions_per_s: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None


@get("/tenants", operation_id="listTenants", summary="List tenants (platform administrator)", tags=["tenants"])
async def list_tenants(request: Request[Any, Any, Any], principal: CallerPrincipal) -> list[Tenant]:
    principal.need_platform()
    async with platform_pool(request).connection() as conn:
        return [Tenant(**r) for r in await tenants.list_all(conn)]


@post("/tenants", operation_id="createTenant", summary="Create a tenant (platform administrator)", tags=["tenants"])
async def create_tenant(
    request: Request[Any, Any, Any], principal: CallerPrincipal, data: JSONBody[TenantCreate]
) -> Tenant:
    principal.need_platform()
    async with platform_pool(request).connection() as conn:
        row = await tenants.create(
            conn, principal.acting(request), data.tenant_id, name=data.name, max_devices=data.max_devices,
            api_requests_per_s=data.api_requests_per_s, ingest_messages_per_s=data.ingest_messages_per_s,
        )  # fmt: skip
    assert row is not None  # without exist_ok, an existing tenant is a Conflict
    return Tenant(**row)


@get("/tenants/{tenant_id:str}", operation_id="getTenant", summary="Get a tenant", tags=["tenants"])
async def get_tenant(request: Request[Any, Any, Any], principal: CallerPrincipal, tenant_id: Id) -> Response[Tenant]:
    if principal.platform:
        async with platform_pool(request).connection() as conn:
            row = await tenants.get_any(conn, tenant_id)
    else:
        async with tenant_transaction(request, principal.tenant or "") as conn:
            row = await tenants.get_own(conn, tenant_id)
    if row is None:
        raise NotFound(f"tenant {tenant_id} not found")
    return Response(Tenant(**row), headers={"ETag": etag(row["version"])})


@patch(
    "/tenants/{tenant_id:str}",
    operation_id="updateTenant",
    summary="Change a tenant (platform administrator)",
    tags=["tenants"],
)
async def patch_tenant(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    tenant_id: Id,
    data: JSONBody[TenantPatch],
    if_match: IfMatch = None,
) -> Response[Tenant]:
    principal.need_platform()
    changes = {k: v for k, v in msgspec.structs.asdict(data).items() if v is not None}
    async with platform_pool(request).connection() as conn:
        row = await tenants.update(
            conn, principal.acting(request), tenant_id, changes, expected_version=expected_version(if_match)
        )
    return Response(Tenant(**row), headers={"ETag": etag(row["version"])})


ROUTES = [list_tenants, create_tenant, get_tenant, patch_tenant]
