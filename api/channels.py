"""Notification channels (issue 13): email recipients, signed webhooks (the secret is in the creation's answer only)
and chat webhooks, each with a per-minute rate past which notifications are folded into a digest."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, delete, get, post
from litestar.params import JSONBody

from api.auth import CallerPrincipal
from api.context import tenant_transaction
from api.params import STRICT, Id, IdField, Label
from kestrel.store import channels
from kestrel_core.rules.channels import ChannelConfig, ChannelKind


class Channel(msgspec.Struct, frozen=True, kw_only=True):
    channel_id: str
    kind: ChannelKind
    name: str
    config: ChannelConfig
    per_minute: int
    enabled: bool
    created_at: datetime


class ChannelCreated(Channel, frozen=True, kw_only=True):
    #: A webhook's signing secret (HMAC-SHA256), shown this once; null for other kinds.
    secret: str | None


class ChannelCreate(msgspec.Struct, **STRICT):
    channel_id: IdField
    config: ChannelConfig
    name: Label = ""
    #: Notifications past this many per minute are folded into one digest per minute.
    per_minute: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 30


@get("/channels", operation_id="listChannels", summary="List notification channels", tags=["alarms"])
async def list_channels(request: Request[Any, Any, Any], principal: CallerPrincipal) -> list[Channel]:
    tenant = principal.need("rules:read")
    async with tenant_transaction(request, tenant) as conn:
        return [msgspec.convert(r, Channel) for r in await channels.list_all(conn, tenant)]


@post("/channels", operation_id="createChannel", summary="Create a notification channel", tags=["alarms"],
      status_code=201)  # fmt: skip
async def create_channel(
    request: Request[Any, Any, Any], principal: CallerPrincipal, data: JSONBody[ChannelCreate]
) -> ChannelCreated:
    tenant = principal.need("rules:write")
    async with tenant_transaction(request, tenant) as conn:
        row, secret = await channels.create(
            conn, principal.acting(request), tenant, data.channel_id, data.config, name=data.name,
            per_minute=data.per_minute,
        )  # fmt: skip
    return msgspec.convert({**row, "secret": secret}, ChannelCreated)


@get("/channels/{channel_id:str}", operation_id="getChannel", summary="Get a notification channel", tags=["alarms"])
async def get_channel(request: Request[Any, Any, Any], principal: CallerPrincipal, channel_id: Id) -> Channel:
    tenant = principal.need("rules:read")
    async with tenant_transaction(request, tenant) as conn:
        return msgspec.convert(await channels.get(conn, tenant, channel_id), Channel)


@delete("/channels/{channel_id:str}", operation_id="deleteChannel", summary="Delete a notification channel",
        tags=["alarms"], status_code=204)  # fmt: skip
async def delete_channel(request: Request[Any, Any, Any], principal: CallerPrincipal, channel_id: Id) -> None:
    tenant = principal.need("rules:write")
    async with tenant_transaction(request, tenant) as conn:
        await channels.delete(conn, principal.acting(request), tenant, channel_id)


ROUTES = [list_channels, create_channel, get_channel, delete_channel]
