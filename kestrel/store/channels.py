"""Notification channels per tenant (issue 13): email recipients, signed webhooks, chat webhooks. A webhook's signing
secret is generated here and returned once, at creation; the API's role cannot read the column afterwards
(migration 0017)."""

from __future__ import annotations

import secrets
from typing import Any, Final

import msgspec
import psycopg
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from kestrel.store import audit
from kestrel.store.rows import fetch_all, fetch_one
from kestrel.store.session import Actor
from kestrel_core.errors import Conflict
from kestrel_core.jsondoc import check_document
from kestrel_core.rules.channels import ChannelConfig, WebhookChannel

COLUMNS: Final = "channel_id, kind, name, config, per_minute, enabled, created_at"
SECRET_PREFIX: Final = "whsec_"  # noqa: S105 - a recognisable prefix, not a secret


async def list_all(conn: AsyncConnection[Any], tenant: str) -> list[dict[str, Any]]:
    return await fetch_all(conn, f"SELECT {COLUMNS} FROM channels WHERE tenant_id = %s ORDER BY channel_id", (tenant,))


async def get(conn: AsyncConnection[Any], tenant: str, channel_id: str) -> dict[str, Any]:
    return await fetch_one(
        conn,
        f"SELECT {COLUMNS} FROM channels WHERE tenant_id = %s AND channel_id = %s",
        (tenant, channel_id),
        f"channel {channel_id} not found",
    )


async def create(
    conn: AsyncConnection[Any],
    actor: Actor,
    tenant: str,
    channel_id: str,
    config: ChannelConfig,
    *,
    name: str = "",
    per_minute: int = 30,
) -> tuple[dict[str, Any], str | None]:
    """The channel and, for a webhook, its signing secret (shown once)."""
    secret = SECRET_PREFIX + secrets.token_urlsafe(32) if isinstance(config, WebhookChannel) else None
    document = msgspec.to_builtins(config)
    check_document(document, what="the channel", max_depth=4, max_bytes=16 * 1024)
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO channels (channel_id, tenant_id, kind, name, config, secret, per_minute)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (channel_id, tenant, document["kind"], name, Jsonb(document), secret or "", per_minute),
            )
    except psycopg.errors.UniqueViolation as exc:
        raise Conflict(f"channel {channel_id} already exists") from exc
    created = await get(conn, tenant, channel_id)
    await audit.record(conn, actor, tenant, "channel.create", f"channel:{channel_id}", after=created)
    return created, secret


async def delete(conn: AsyncConnection[Any], actor: Actor, tenant: str, channel_id: str) -> None:
    """Delete a channel and its delivery log (rules still naming it skip it)."""
    before = await get(conn, tenant, channel_id)
    await conn.execute("DELETE FROM channels WHERE tenant_id = %s AND channel_id = %s", (tenant, channel_id))
    await audit.record(conn, actor, tenant, "channel.delete", f"channel:{channel_id}", before=before)
