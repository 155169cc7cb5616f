"""Commands to devices (ADR-0013): queued here, delivered and retried by devicesvc, each state recorded."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, get, post
from litestar.params import JSONBody, PathParameter, QueryParameter

from api.auth import CallerPrincipal
from api.context import tenant_transaction
from api.params import STRICT, Id, IdField, Limit
from api.preconditions import IdempotencyKey, remember, replay
from kestrel.store import commands
from kestrel.store.commands import Command

CommandId = Annotated[str, PathParameter(pattern="^c[0-9a-f]{24}$")]
CommandStatus = Literal["queued", "sent", "delivered", "succeeded", "failed", "timed_out", "expired", "cancelled"]


class CommandCreate(msgspec.Struct, **STRICT):
    name: IdField
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
    command: Command
    events: list[CommandEvent]


@post(
    "/devices/{device_id:str}/commands",
    operation_id="createCommand",
    summary="Send a command to a device",
    tags=["commands"],
    status_code=201,
)
async def create_command(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    device_id: Id,
    data: JSONBody[CommandCreate],
    idempotency_key: IdempotencyKey = None,
) -> Command:
    tenant = principal.need("commands:write")
    async with tenant_transaction(request, tenant) as conn:
        if (replayed := await replay(conn, tenant, idempotency_key, f"command:{device_id}", data)) is not None:
            return msgspec.convert(replayed, Command, strict=False)
        command = await commands.send(
            conn, principal.acting(request), tenant, device_id, data.name, data.params, timeout_s=data.timeout_s,
            expires_in_s=data.expires_in_s, max_attempts=data.max_attempts,
        )  # fmt: skip
        await remember(conn, tenant, idempotency_key, f"command:{device_id}", data, command)
    return command


@get(
    "/devices/{device_id:str}/commands",
    operation_id="listCommands",
    summary="A device's commands, newest first",
    tags=["commands"],
)
async def list_commands(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    device_id: Id,
    status: Annotated[CommandStatus | None, QueryParameter()] = None,
    limit: Limit = 100,
) -> list[Command]:
    tenant = principal.need("devices:read")
    async with tenant_transaction(request, tenant) as conn:
        return await commands.page(conn, tenant, device_id, status=status, limit=limit)


def _detail(command: Command, events: list[dict[str, Any]]) -> CommandDetail:
    return CommandDetail(command=command, events=[CommandEvent(**e) for e in events])


@get(
    "/commands/{command_id:str}",
    operation_id="getCommand",
    summary="A command, with every state it went through",
    tags=["commands"],
)
async def get_command(
    request: Request[Any, Any, Any], principal: CallerPrincipal, command_id: CommandId
) -> CommandDetail:
    tenant = principal.need("devices:read")
    async with tenant_transaction(request, tenant) as conn:
        return _detail(*await commands.detail(conn, tenant, command_id))


@post(
    "/commands/{command_id:str}/cancel",
    operation_id="cancelCommand",
    summary="Cancel a command that has not finished",
    tags=["commands"],
    status_code=200,
)
async def cancel_command(
    request: Request[Any, Any, Any], principal: CallerPrincipal, command_id: CommandId
) -> CommandDetail:
    tenant = principal.need("commands:write")
    async with tenant_transaction(request, tenant) as conn:
        await commands.cancel(conn, principal.acting(request), tenant, command_id)
        return _detail(*await commands.detail(conn, tenant, command_id))


ROUTES = [create_command, list_commands, get_command, cancel_command]
