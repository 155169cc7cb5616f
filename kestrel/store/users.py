"""Users of a tenant (their tokens never exceed their role, ADR-0012)."""

from __future__ import annotations

import secrets
from typing import Any, Final

import psycopg
from psycopg import AsyncConnection

from kestrel.store import audit, tenants
from kestrel.store.rows import fetch_all, fetch_one
from kestrel.store.session import Actor
from kestrel_core.errors import Conflict, InvalidInput, PreconditionFailed
from kestrel_core.tokens import ROLE_SCOPES

COLUMNS: Final = "user_id, email, role, status, version, created_at"
STATUSES: Final = ("active", "disabled")


async def list_all(conn: AsyncConnection[Any], tenant: str) -> list[dict[str, Any]]:
    return await fetch_all(conn, f"SELECT {COLUMNS} FROM users WHERE tenant_id = %s ORDER BY email", (tenant,))


async def require(conn: AsyncConnection[Any], tenant: str, user: str) -> None:
    await fetch_one(
        conn,
        "SELECT 1 AS found FROM users WHERE user_id = %s AND tenant_id = %s",
        (user, tenant),
        f"user {user} not found",
    )


async def create(conn: AsyncConnection[Any], actor: Actor, tenant: str, email: str, role: str) -> dict[str, Any]:
    if role not in ROLE_SCOPES:
        raise InvalidInput("bad_role", f"role must be one of {', '.join(ROLE_SCOPES)}")
    await tenants.require(conn, tenant)
    try:
        async with conn.transaction():
            user = await fetch_one(
                conn,
                f"INSERT INTO users (user_id, tenant_id, email, role) VALUES (%s, %s, %s, %s) RETURNING {COLUMNS}",
                ("u" + secrets.token_hex(8), tenant, email.lower(), role),
                "",
            )
    except psycopg.errors.CheckViolation as exc:
        raise InvalidInput("bad_email", f"{email[:80]!r} is not an e-mail address") from exc
    except psycopg.errors.UniqueViolation as exc:
        raise Conflict(f"a user with email {email} exists") from exc
    await audit.record(conn, actor, tenant, "user.create", f"user:{user['user_id']}", after=user)
    return user


async def update(
    conn: AsyncConnection[Any],
    actor: Actor,
    tenant: str,
    user: str,
    *,
    role: str | None = None,
    status: str | None = None,
    expected_version: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Change a user's role or status; (before, after)."""
    if role is not None and role not in ROLE_SCOPES:
        raise InvalidInput("bad_role", f"role must be one of {', '.join(ROLE_SCOPES)}")
    if status is not None and status not in STATUSES:
        raise InvalidInput("bad_status", "status must be active or disabled")
    before = await fetch_one(
        conn,
        f"SELECT {COLUMNS} FROM users WHERE user_id = %s AND tenant_id = %s FOR UPDATE",
        (user, tenant),
        f"user {user} not found",
    )
    if expected_version is not None and expected_version != before["version"]:
        raise PreconditionFailed(f"user {user} changed since it was read")
    after = await fetch_one(
        conn,
        "UPDATE users SET role = coalesce(%s, role), status = coalesce(%s, status), version = version + 1"
        f" WHERE user_id = %s AND tenant_id = %s RETURNING {COLUMNS}",
        (role, status, user, tenant),
        "",
    )
    await audit.record(conn, actor, tenant, "user.update", f"user:{user}", before=before, after=after)
    return before, after
