"""The audit log's one writer: a row in the caller's transaction, so it exists if and only if the change committed.

(The platform functions of migration 0008 write their own rows: the platform role may not insert here.)
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from psycopg import AsyncConnection

from kestrel.store.rows import fetch_all
from kestrel.store.session import Actor

_json: Final = msgspec.json.Encoder()
COLUMNS: Final = "id, at, actor, action, target, before, after, request_id"


async def record(
    conn: AsyncConnection[Any],
    actor: Actor,
    tenant: str | None,
    action: str,
    target: str,
    *,
    before: object = None,
    after: object = None,
) -> None:
    """Append one entry (``tenant`` None: a platform-wide change, such as a backend principal)."""
    await conn.execute(
        "INSERT INTO audit_log (tenant_id, actor, action, target, before, after, request_id)"
        " VALUES (%s, %s, %s, %s, %s::jsonb, %s::jsonb, %s)",
        (
            tenant,
            actor.name,
            action,
            target,
            None if before is None else _json.encode(before).decode(),
            None if after is None else _json.encode(after).decode(),
            actor.request_id,
        ),
    )


async def page(conn: AsyncConnection[Any], tenant: str, *, before_id: int | None, limit: int) -> list[dict[str, Any]]:
    """The tenant's entries, newest first, older than ``before_id`` when given."""
    return await fetch_all(
        conn,
        f"SELECT {COLUMNS} FROM audit_log WHERE tenant_id = %s AND (%s::bigint IS NULL OR id < %s)"
        " ORDER BY id DESC LIMIT %s",
        (tenant, before_id, before_id, limit),
    )
