"""A tenant's credentials for the API: API tokens and OAuth clients (ADR-0012). Secrets are returned once and
stored as SHA-256 digests; revoking is idempotent and audited once."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

from psycopg import AsyncConnection

from kestrel.store import audit, tenants, users
from kestrel.store.rows import fetch_all, fetch_maybe
from kestrel.store.session import Actor
from kestrel_core.errors import InvalidInput, NotFound
from kestrel_core.tokens import SCOPES, new_token, secret_digest

TOKEN_COLUMNS: Final = "token_id, name, user_id, scopes, expires_at, revoked_at, created_at"  # noqa: S105 - columns
CLIENT_COLUMNS: Final = "client_id, name, scopes, created_at, revoked_at"
#: What can be revoked: (table, key column); constants, never input.
REVOCABLE: Final = {"token": ("api_tokens", "token_id"), "oauth_client": ("oauth_clients", "client_id")}


def _scopes(scopes: Sequence[str]) -> list[str]:
    if not scopes or set(scopes) - set(SCOPES):
        raise InvalidInput("bad_scope", f"scopes must be among: {', '.join(SCOPES)}")
    return sorted(set(scopes))


async def list_tokens(conn: AsyncConnection[Any], tenant: str) -> list[dict[str, Any]]:
    return await fetch_all(
        conn,
        f"SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE tenant_id = %s ORDER BY created_at",
        (tenant,),
    )


async def create_token(
    conn: AsyncConnection[Any],
    actor: Actor,
    tenant: str,
    scopes: Sequence[str],
    *,
    expires_at: datetime,
    name: str = "",
    user: str | None = None,
) -> tuple[str, str]:
    """An API token of ``tenant`` (bound to ``user`` when given); returns (token id, the token, shown once)."""
    granted = _scopes(scopes)
    await tenants.require(conn, tenant)
    if user is not None:
        await users.require(conn, tenant, user)
    token_id, token, digest = new_token()
    await conn.execute(
        "INSERT INTO api_tokens (token_id, tenant_id, user_id, name, scopes, secret_sha256, expires_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (token_id, tenant, user, name, granted, digest, expires_at),
    )
    summary = {"scopes": granted, "user_id": user, "expires_at": expires_at}
    await audit.record(conn, actor, tenant, "token.create", f"token:{token_id}", after=summary)
    return token_id, token


async def list_clients(conn: AsyncConnection[Any], tenant: str) -> list[dict[str, Any]]:
    return await fetch_all(
        conn,
        f"SELECT {CLIENT_COLUMNS} FROM oauth_clients WHERE tenant_id = %s ORDER BY created_at",
        (tenant,),
    )


async def create_client(
    conn: AsyncConnection[Any], actor: Actor, tenant: str, scopes: Sequence[str], name: str = ""
) -> tuple[str, str, list[str]]:
    """An OAuth client of ``tenant``; returns (client id, its secret, shown once, the scopes)."""
    granted = _scopes(scopes)
    client_id, secret = "kcl_" + secrets.token_hex(8), "kcs_" + secrets.token_urlsafe(32)
    await conn.execute(
        "INSERT INTO oauth_clients (client_id, tenant_id, name, scopes, secret_sha256) VALUES (%s, %s, %s, %s, %s)",
        (client_id, tenant, name, granted, secret_digest(secret)),
    )
    await audit.record(
        conn, actor, tenant, "oauth_client.create", f"oauth_client:{client_id}", after={"scopes": granted}
    )
    return client_id, secret, granted


async def revoke(conn: AsyncConnection[Any], actor: Actor, tenant: str, kind: str, key: str) -> bool:
    """Revoke an API token or OAuth client of ``tenant`` (``NotFound`` if it has none by that id); True when this
    call revoked it, False when it was revoked already (nothing changes, nothing is audited)."""
    table, column = REVOCABLE[kind]
    row = await fetch_maybe(
        conn,
        f"UPDATE {table} SET revoked_at = coalesce(revoked_at, now()) WHERE {column} = %s AND tenant_id = %s"
        " RETURNING revoked_at = now() AS revoked_now",
        (key, tenant),
    )
    if row is None:
        raise NotFound(f"no {kind.replace('_', ' ')} {key}")
    if row["revoked_now"]:
        await audit.record(conn, actor, tenant, f"{kind}.revoke", f"{kind}:{key}")
    return bool(row["revoked_now"])


async def token_lookup(conn: AsyncConnection[Any], token_id: str) -> dict[str, Any] | None:
    """The token a bearer token's id names, with its user's role and status and its tenant's status and rate, before
    any tenant is known (``kestrel_token_lookup``, migration 0008); the caller compares the secret's digest."""
    return await fetch_maybe(conn, "SELECT * FROM kestrel_token_lookup(%s)", (token_id,))


async def client_lookup(conn: AsyncConnection[Any], client_id: str) -> dict[str, Any] | None:
    """An OAuth client with its tenant's status and rate (``kestrel_oauth_client_lookup``, migration 0009)."""
    return await fetch_maybe(conn, "SELECT * FROM kestrel_oauth_client_lookup(%s)", (client_id,))
