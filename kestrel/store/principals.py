"""Backend principals: the services that connect to the broker (ADR-0008). Platform-wide, operator only."""

from __future__ import annotations

import secrets
from typing import Any, Final

from psycopg import AsyncConnection

from kestrel.store import audit
from kestrel.store.rows import fetch_maybe
from kestrel.store.session import Actor
from kestrel_core.errors import Conflict, InvalidInput, NotFound
from kestrel_core.tokens import SERVICE_SECRET_PREFIX, secret_digest
from kestrel_core.topics import require_id

ROLES: Final = ("ingest", "control", "devices", "provisioning", "rules")


async def create(conn: AsyncConnection[Any], actor: Actor, name: str, role: str, *, rotate: bool = False) -> str:
    """Create (or with ``rotate``, re-key) a principal; returns its secret, stored only as a SHA-256 digest."""
    require_id("service", name)
    if role not in ROLES:
        raise InvalidInput("bad_role", f"role must be one of {', '.join(ROLES)}")
    secret = SERVICE_SECRET_PREFIX + secrets.token_urlsafe(32)
    row = await fetch_maybe(
        conn,
        "INSERT INTO service_principals (name, role, secret_sha256) VALUES (%s, %s, %s)"
        " ON CONFLICT (name) DO UPDATE SET role = EXCLUDED.role, secret_sha256 = EXCLUDED.secret_sha256,"
        " status = 'active' WHERE %s RETURNING (xmax = 0) AS created",
        (name, role, secret_digest(secret), rotate),
    )
    if row is None:
        raise Conflict(f"service principal {name} already exists; use --rotate to issue a new secret")
    action = "service.create" if row["created"] else "service.rotate"
    await audit.record(conn, actor, None, action, f"service:{name}", after={"role": role})
    return secret


async def revoke(conn: AsyncConnection[Any], actor: Actor, name: str) -> None:
    """Refused at its next connect; its live sessions are disconnected (migration 0006)."""
    if (await conn.execute("UPDATE service_principals SET status = 'revoked' WHERE name = %s", (name,))).rowcount == 0:
        raise NotFound(f"service principal {name} does not exist")
    await audit.record(conn, actor, None, "service.revoke", f"service:{name}")
