"""Device twin routes (ADR-0013): presence and connection history, shadows, commands, lifecycle and
just-in-time provisioning claims. Rows only: devicesvc delivers to devices, woken by the database's
notifications. Same rules as the rest of the API: the tenant's RLS transaction, 404 for other tenants' objects.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, Response, delete, get, patch, post
from litestar.params import JSONBody, PathParameter, QueryParameter
from psycopg import AsyncConnection

from api.auth import CallerPrincipal, audit, tenant_transaction
from api.control import (
    _STRICT,
    DEVICE,
    ControlDevice,
    Id,
    Label,
    Limit,
    Tag,
    _fetch,
    _one,
)
from api.preconditions import IdempotencyKey, IfMatch, etag, expected_version, remember, replay
from kestrel.store import twin
from kestrel_core.errors import Conflict, PreconditionFailed
from kestrel_core.tokens import new_claim_token
from kestrel_core.topics import ID_PATTERN

CommandId = Annotated[str, PathParameter(pattern="^c[0-9a-f]{24}$")]
ClaimId = Annotated[str, PathParameter(pattern="^[0-9a-f]{16}$")]
ShadowName = Annotated[str, PathParameter(pattern=f"^{ID_PATTERN}$")]

# ------------------------------------------------------------------------------------------------ schemas


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


class DesiredUpdate(msgspec.Struct, **_STRICT):
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


class CommandCreate(msgspec.Struct, **_STRICT):
    name: Annotated[str, msgspec.Meta(pattern=f"^{ID_PATTERN}$")]
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    #: How long the device may take once the command was sent to it.
    timeout_s: Annotated[int, msgspec.Meta(ge=1, le=86400)] = 30
    #: How long the command may wait to be delivered (offline device) before it expires.
    expires_in_s: Annotated[int, msgspec.Meta(ge=1, le=7 * 86400)] = 3600
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 5


class CommandEvent(msgspec.Struct, frozen=True, kw_only=True):
    event: str
    detail: Any
    at: datetime


class CommandDetail(msgspec.Struct, frozen=True, kw_only=True):
    command: twin.Command
    events: list[CommandEvent]


class ClaimCreate(msgspec.Struct, **_STRICT):
    name: Label = ""
    max_uses: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1
    expires_in_s: Annotated[int, msgspec.Meta(ge=60, le=365 * 86400)] = 86400
    group_id: Annotated[str, msgspec.Meta(pattern=f"^{ID_PATTERN}$")] | None = None
    tags: Annotated[list[Tag], msgspec.Meta(max_length=64)] = msgspec.field(default_factory=list)


class Claim(msgspec.Struct, frozen=True, kw_only=True):
    claim_id: str
    name: str
    max_uses: int
    used: int
    expires_at: datetime
    group_id: str | None
    tags: list[str]
    status: str
    created_at: datetime


class ClaimCreated(msgspec.Struct, frozen=True, kw_only=True):
    token: str  # shown once
    claim: Claim


# ------------------------------------------------------------------------------------------------ helpers


async def _device(conn: AsyncConnection[Any], device_id: str, *, lock: bool = False) -> ControlDevice:
    row = await _one(conn, DEVICE + (" FOR UPDATE" if lock else ""), (device_id,), f"device {device_id} not found")
    return ControlDevice(**row)


# ----------------------------------------------------------------------------------------------- presence

PRESENCE_COLUMNS = ", ".join(Presence.__struct_fields__)


@get("/presence", summary="Presence of the tenant's devices (who is online)", tags=["presence"])
async def list_presence(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    online: Annotated[bool | None, QueryParameter(description="Only online (true) or offline (false)")] = None,
    limit: Limit = 100,
    cursor: Annotated[str | None, QueryParameter(pattern=f"^{ID_PATTERN}$")] = None,
) -> list[Presence]:
    tenant = principal.need("devices:read")
    async with tenant_transaction(request, tenant) as conn:
        rows = await _fetch(
            conn,
            f"SELECT {PRESENCE_COLUMNS} FROM device_presence WHERE (%s::boolean IS NULL OR online = %s)"  # noqa: S608
            " AND (%s::text IS NULL OR device_id > %s) ORDER BY device_id LIMIT %s",
            (online, online, cursor, cursor, limit),
        )
    return [Presence(**r) for r in rows]


@get("/devices/{device_id:str}/presence", summary="A device's presence", tags=["presence"])
async def get_presence(request: Request[Any, Any, Any], principal: CallerPrincipal, device_id: Id) -> Presence:
    tenant = principal.need("devices:read")
    async with tenant_transaction(request, tenant) as conn:
        await _device(conn, device_id)
        rows = await _fetch(
            conn,
            f"SELECT {PRESENCE_COLUMNS} FROM device_presence WHERE device_id = %s",  # noqa: S608 - fixed columns
            (device_id,),
        )
    if rows:
        return Presence(**rows[0])
    return Presence(
        device_id=device_id, online=False, connections=0, last_seen=None, connected_at=None, disconnected_at=None,
        disconnect_reason=None, reported_status=None, protocol=None, changed_at=None,
    )  # fmt: skip


@get("/devices/{device_id:str}/connections", summary="A device's connection history, newest first", tags=["presence"])
async def list_connections(
    request: Request[Any, Any, Any], principal: CallerPrincipal, device_id: Id, limit: Limit = 100
) -> list[Connection]:
    tenant = principal.need("devices:read")
    async with tenant_transaction(request, tenant) as conn:
        await _device(conn, device_id)
        rows = await _fetch(
            conn,
            "SELECT node, connected_at, disconnected_at, reason, peer, protocol FROM device_connections"
            " WHERE device_id = %s ORDER BY connected_at DESC LIMIT %s",
            (device_id, limit),
        )
    return [Connection(**r) for r in rows]


# ------------------------------------------------------------------------------------------------ shadows


async def _read_shadow(
    request: Request[Any, Any, Any], principal: CallerPrincipal, device_id: str, name: str
) -> Response[twin.Shadow]:
    tenant = principal.need("devices:read")
    async with tenant_transaction(request, tenant) as conn:
        await _device(conn, device_id)
        found = await twin.read_shadow(conn, device_id, name)
    shadow = found or twin.empty_shadow(device_id, name)
    return Response(shadow, headers={"ETag": etag(shadow.version, "s")})


async def _write_desired(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    device_id: str,
    name: str,
    data: DesiredUpdate,
    if_match: str | None,
) -> Response[twin.Shadow]:
    tenant = principal.need("devices:write")
    if_match_version = expected_version(if_match, "s")
    async with tenant_transaction(request, tenant) as conn:
        device = await _device(conn, device_id)
        if device.status == "decommissioned":
            raise Conflict(f"device {device_id} is decommissioned")
        updated, changed = await twin.update_shadow(
            conn, tenant, device_id, name, "desired", data.desired, ts_ms=twin.now_ms(), actor=principal.actor,
            expected_version=data.version, if_match=if_match_version,
        )  # fmt: skip
        if changed:
            await audit(conn, request, principal, "shadow.desired", f"device:{device_id}/shadow:{name}", after=data)
    return Response(updated, headers={"ETag": etag(updated.version, "s")})


@get("/devices/{device_id:str}/shadow", summary="A device's shadow (desired, reported, delta)", tags=["shadows"])
async def get_shadow(
    request: Request[Any, Any, Any], principal: CallerPrincipal, device_id: Id
) -> Response[twin.Shadow]:
    return await _read_shadow(request, principal, device_id, "")


@get("/devices/{device_id:str}/shadows/{name:str}", summary="A device's named shadow", tags=["shadows"])
async def get_named_shadow(
    request: Request[Any, Any, Any], principal: CallerPrincipal, device_id: Id, name: ShadowName
) -> Response[twin.Shadow]:
    return await _read_shadow(request, principal, device_id, name)


@patch(
    "/devices/{device_id:str}/shadow",
    summary="Change desired state (JSON merge patch; If-Match or version for optimistic concurrency)",
    tags=["shadows"],
)
async def patch_shadow(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    device_id: Id,
    data: JSONBody[DesiredUpdate],
    if_match: IfMatch = None,
) -> Response[twin.Shadow]:
    return await _write_desired(request, principal, device_id, "", data, if_match)


@patch("/devices/{device_id:str}/shadows/{name:str}", summary="Change a named shadow's desired state", tags=["shadows"])
async def patch_named_shadow(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    device_id: Id,
    name: ShadowName,
    data: JSONBody[DesiredUpdate],
    if_match: IfMatch = None,
) -> Response[twin.Shadow]:
    return await _write_desired(request, principal, device_id, name, data, if_match)


@get("/devices/{device_id:str}/shadow/history", summary="Changes of a device's shadows, newest first", tags=["shadows"])
async def shadow_history(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    device_id: Id,
    name: Annotated[str, QueryParameter(pattern=f"^({ID_PATTERN})?$", description="Shadow name; empty: classic")] = "",
    limit: Limit = 100,
) -> list[ShadowChange]:
    tenant = principal.need("devices:read")
    async with tenant_transaction(request, tenant) as conn:
        await _device(conn, device_id)
        rows = await _fetch(
            conn,
            "SELECT version, side, patch, actor, at FROM shadow_history WHERE device_id = %s AND name = %s"
            " ORDER BY id DESC LIMIT %s",
            (device_id, name, limit),
        )
    return [ShadowChange(**r) for r in rows]


# ----------------------------------------------------------------------------------------------- commands

COMMAND = f"SELECT {twin.COMMAND_COLUMNS} FROM commands WHERE command_id = %s"  # noqa: S608 - fixed columns


@post("/devices/{device_id:str}/commands", summary="Send a command to a device", tags=["commands"], status_code=201)
async def create_command(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    device_id: Id,
    data: JSONBody[CommandCreate],
    idempotency_key: IdempotencyKey = None,
) -> twin.Command:
    tenant = principal.need("commands:write")
    async with tenant_transaction(request, tenant) as conn:
        if (replayed := await replay(conn, tenant, idempotency_key, f"command:{device_id}", data)) is not None:
            return msgspec.convert(replayed, twin.Command, strict=False)
        device = await _device(conn, device_id)
        if device.status in ("suspended", "decommissioned"):
            raise Conflict(f"device {device_id} is {device.status}")
        command = await twin.insert_command(
            conn, tenant, device_id, data.name, data.params, timeout_s=data.timeout_s,
            expires_at=datetime.now(UTC) + timedelta(seconds=data.expires_in_s), max_attempts=data.max_attempts,
            actor=principal.actor,
        )  # fmt: skip
        command_id = command.command_id
        await audit(conn, request, principal, "command.create", f"device:{device_id}/command:{command_id}", after=data)
        await remember(conn, tenant, idempotency_key, f"command:{device_id}", data, command)
    return command


@get("/devices/{device_id:str}/commands", summary="A device's commands, newest first", tags=["commands"])
async def list_commands(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    device_id: Id,
    status: Annotated[
        Literal["queued", "sent", "delivered", "succeeded", "failed", "timed_out", "expired", "cancelled"] | None,
        QueryParameter(),
    ] = None,
    limit: Limit = 100,
) -> list[twin.Command]:
    tenant = principal.need("devices:read")
    async with tenant_transaction(request, tenant) as conn:
        await _device(conn, device_id)
        rows = await _fetch(
            conn,
            f"SELECT {twin.COMMAND_COLUMNS} FROM commands WHERE device_id = %s AND (%s::text IS NULL OR status = %s)"  # noqa: S608
            " ORDER BY created_at DESC LIMIT %s",
            (device_id, status, status, limit),
        )
    return [twin.Command(**r) for r in rows]


async def _command_detail(conn: AsyncConnection[Any], command_id: str) -> CommandDetail:
    command = twin.Command(**await _one(conn, COMMAND, (command_id,), f"command {command_id} not found"))
    events = await _fetch(
        conn, "SELECT event, detail, at FROM command_events WHERE command_id = %s ORDER BY id", (command_id,)
    )
    return CommandDetail(command=command, events=[CommandEvent(**e) for e in events])


@get("/commands/{command_id:str}", summary="A command, with every state it went through", tags=["commands"])
async def get_command(
    request: Request[Any, Any, Any], principal: CallerPrincipal, command_id: CommandId
) -> CommandDetail:
    tenant = principal.need("devices:read")
    async with tenant_transaction(request, tenant) as conn:
        return await _command_detail(conn, command_id)


@post(
    "/commands/{command_id:str}/cancel",
    summary="Cancel a command that has not finished",
    tags=["commands"],
    status_code=200,
)
async def cancel_command(
    request: Request[Any, Any, Any], principal: CallerPrincipal, command_id: CommandId
) -> CommandDetail:
    tenant = principal.need("commands:write")
    async with tenant_transaction(request, tenant) as conn:
        before = await _command_detail(conn, command_id)
        if await twin.transition(conn, command_id, "cancelled", detail={"by": principal.actor}) is None:
            raise Conflict(f"command {command_id} already ended ({before.command.status})")
        await audit(conn, request, principal, "command.cancel", f"command:{command_id}")
        return await _command_detail(conn, command_id)


# ---------------------------------------------------------------------------------------------- lifecycle


@post(
    "/devices/{device_id:str}/decommission",
    summary="Decommission a device (idempotent): credentials revoked, session ended, history kept, id never reused",
    tags=["devices"],
    status_code=200,
)
async def decommission_device(
    request: Request[Any, Any, Any], principal: CallerPrincipal, device_id: Id, if_match: IfMatch = None
) -> ControlDevice:
    tenant = principal.need("devices:write")
    async with tenant_transaction(request, tenant) as conn:
        before = await _device(conn, device_id, lock=True)
        expected = expected_version(if_match)
        if expected is not None and expected != before.version:
            raise PreconditionFailed(f"device {device_id} changed since it was read")
        if before.status == "decommissioned":
            return before  # decommissioning is idempotent: a retry after a lost answer gets the same result
        await conn.execute("SELECT kestrel_decommission_device(%s)", (device_id,))
        after = await _device(conn, device_id)
        await audit(conn, request, principal, "device.decommission", f"device:{device_id}", before=before, after=after)
    return after


# ------------------------------------------------------------------------------------------------- claims

CLAIM_COLUMNS = ", ".join(Claim.__struct_fields__)


@post(
    "/provisioning-claims",
    summary="Create a just-in-time provisioning claim (token shown once)",
    tags=["provisioning"],
    status_code=201,
)
async def create_claim(
    request: Request[Any, Any, Any], principal: CallerPrincipal, data: JSONBody[ClaimCreate]
) -> ClaimCreated:
    tenant = principal.need("devices:write")
    claim_id, token, digest = new_claim_token()
    async with tenant_transaction(request, tenant) as conn:
        if data.group_id is not None:
            await _one(
                conn,
                "SELECT 1 FROM device_groups WHERE group_id = %s",
                (data.group_id,),
                f"group {data.group_id} not found",
            )
        row = await _one(
            conn,
            "INSERT INTO provisioning_claims (claim_id, tenant_id, name, secret_sha256, max_uses, expires_at, group_id,"  # noqa: S608 - fixed columns
            f" tags) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING {CLAIM_COLUMNS}",
            (claim_id, tenant, data.name, digest, data.max_uses,
             datetime.now(UTC) + timedelta(seconds=data.expires_in_s), data.group_id, data.tags),
            "tenant not found",
        )  # fmt: skip
        claim = Claim(**row)
        await audit(conn, request, principal, "claim.create", f"claim:{claim_id}", after=claim)
    return ClaimCreated(token=token, claim=claim)


@get("/provisioning-claims", summary="List provisioning claims (never their secrets)", tags=["provisioning"])
async def list_claims(request: Request[Any, Any, Any], principal: CallerPrincipal) -> list[Claim]:
    tenant = principal.need("devices:read")
    async with tenant_transaction(request, tenant) as conn:
        rows = await _fetch(conn, f"SELECT {CLAIM_COLUMNS} FROM provisioning_claims ORDER BY created_at DESC", ())  # noqa: S608
    return [Claim(**r) for r in rows]


@delete(
    "/provisioning-claims/{claim_id:str}", summary="Revoke a provisioning claim", tags=["provisioning"], status_code=204
)
async def revoke_claim(request: Request[Any, Any, Any], principal: CallerPrincipal, claim_id: ClaimId) -> None:
    tenant = principal.need("devices:write")
    async with tenant_transaction(request, tenant) as conn:
        await _one(
            conn,
            "UPDATE provisioning_claims SET status = 'revoked' WHERE claim_id = %s RETURNING claim_id",
            (claim_id,),
            f"claim {claim_id} not found",
        )
        await audit(conn, request, principal, "claim.revoke", f"claim:{claim_id}")


ROUTES = [
    list_presence,
    get_presence,
    list_connections,
    get_shadow,
    get_named_shadow,
    patch_shadow,
    patch_named_shadow,
    shadow_history,
    create_command,
    list_commands,
    get_command,
    cancel_command,
    decommission_device,
    create_claim,
    list_claims,
    revoke_claim,
]
