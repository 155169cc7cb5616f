"""Device shadows (ADR-0013): desired, reported and their delta, versioned (ETag ``"s<version>"``), with history."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get, patch
from litestar.params import JSONBody, PathParameter, QueryParameter

from api.auth import CallerPrincipal, Principal
from api.context import tenant_transaction
from api.params import STRICT, Id, Limit
from api.preconditions import IfMatch, etag, expected_version
from kestrel.store import shadows
from kestrel.store.shadows import Shadow
from kestrel_core.topics import ID_PATTERN

ShadowName = Annotated[str, PathParameter(pattern=f"^{ID_PATTERN}$")]


class DesiredUpdate(msgspec.Struct, **STRICT):
    """A JSON merge patch of the desired state (``null`` deletes a field)."""

    desired: dict[str, Any]
    #: The version this update was computed from; 409 if the shadow moved on.
    version: Annotated[int, msgspec.Meta(ge=0)] | None = None


class ShadowChange(msgspec.Struct, frozen=True, kw_only=True):
    version: int
    side: str
    patch: dict[str, Any]
    actor: str
    at: datetime


async def _read(request: Request[Any, Any, Any], principal: Principal, device_id: str, name: str) -> Response[Shadow]:
    tenant = principal.need("devices:read")
    async with tenant_transaction(request, tenant) as conn:
        shadow = await shadows.get(conn, tenant, device_id, name)
    return Response(shadow, headers={"ETag": etag(shadow.version, "s")})


async def _write(
    request: Request[Any, Any, Any],
    principal: Principal,
    device_id: str,
    name: str,
    data: DesiredUpdate,
    if_match: str | None,
) -> Response[Shadow]:
    tenant = principal.need("devices:write")
    if_match_version = expected_version(if_match, "s")
    async with tenant_transaction(request, tenant) as conn:
        updated = await shadows.set_desired(
            conn, principal.acting(request), tenant, device_id, name, data.desired, expected_version=data.version,
            if_match=if_match_version,
        )  # fmt: skip
    return Response(updated, headers={"ETag": etag(updated.version, "s")})


@get(
    "/devices/{device_id:str}/shadow",
    operation_id="getShadow",
    summary="A device's shadow (desired, reported, delta)",
    tags=["shadows"],
)
async def get_shadow(request: Request[Any, Any, Any], principal: CallerPrincipal, device_id: Id) -> Response[Shadow]:
    return await _read(request, principal, device_id, "")


@get(
    "/devices/{device_id:str}/shadows/{name:str}",
    operation_id="getNamedShadow",
    summary="A device's named shadow",
    tags=["shadows"],
)
async def get_named_shadow(
    request: Request[Any, Any, Any], principal: CallerPrincipal, device_id: Id, name: ShadowName
) -> Response[Shadow]:
    return await _read(request, principal, device_id, name)


@patch(
    "/devices/{device_id:str}/shadow",
    operation_id="updateShadow",
    summary="Change desired state (JSON merge patch; If-Match or version for optimistic concurrency)",
    tags=["shadows"],
)
async def patch_shadow(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    device_id: Id,
    data: JSONBody[DesiredUpdate],
    if_match: IfMatch = None,
) -> Response[Shadow]:
    return await _write(request, principal, device_id, "", data, if_match)


@patch(
    "/devices/{device_id:str}/shadows/{name:str}",
    operation_id="updateNamedShadow",
    summary="Change a named shadow's desired state",
    tags=["shadows"],
)
async def patch_named_shadow(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    device_id: Id,
    name: ShadowName,
    data: JSONBody[DesiredUpdate],
    if_match: IfMatch = None,
) -> Response[Shadow]:
    return await _write(request, principal, device_id, name, data, if_match)


@get(
    "/devices/{device_id:str}/shadow/history",
    operation_id="listShadowHistory",
    summary="Changes of a device's shadows, newest first",
    tags=["shadows"],
)
async def shadow_history(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    device_id: Id,
    name: Annotated[str, QueryParameter(pattern=f"^({ID_PATTERN})?$", description="Shadow name; empty: classic")] = "",
    limit: Limit = 100,
) -> list[ShadowChange]:
    tenant = principal.need("devices:read")
    async with tenant_transaction(request, tenant) as conn:
        rows = await shadows.history(conn, tenant, device_id, name, limit=limit)
    return [ShadowChange(**r) for r in rows]


ROUTES = [get_shadow, get_named_shadow, patch_shadow, patch_named_shadow, shadow_history]
