"""Who may open a stream, and for how long (ADR-0021): a bearer token in the ``Authorization`` header (curl, servers,
GraphQL's ``connection_init``), or for browsers a ticket (``kstt_<id>_<secret>``, 30 s, once) that a token bought
with ``POST /api/v1/stream/tickets``, so no long-lived token is ever put in a URL. A stream checks its credential again
every few seconds and ends when it expires, is revoked, or its user or tenant is disabled; browsers (any request with
an ``Origin``) must come from an allowed origin."""

from __future__ import annotations

import hmac
import re
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from urllib.parse import urlsplit

from litestar.connection import ASGIConnection
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from api.auth.access_tokens import client_grants
from api.auth.api_tokens import token_grants
from api.auth.principal import Principal
from kestrel.store import credentials
from kestrel.store.rows import fetch_maybe
from kestrel_core.errors import Forbidden, Unauthenticated
from kestrel_core.tokens import secret_digest

TICKET_PREFIX: Final = "kstt_"
TICKET_PATTERN: Final = re.compile(r"\Akstt_([0-9a-f]{16})_([A-Za-z0-9_-]{43})\Z")
TICKET_S: Final = 30


async def issue_ticket(conn: AsyncConnection[Any], principal: Principal) -> tuple[str, datetime]:
    """A single-use ticket for ``principal`` (``conn`` in its tenant's context); (ticket, when it expires)."""
    if principal.tenant is None or not principal.credential or principal.expires_at is None:
        raise Forbidden("streams are a tenant's: use a tenant's API token or OAuth access token")
    ticket_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    expires_at = min(datetime.now(UTC) + timedelta(seconds=TICKET_S), principal.expires_at)
    await conn.execute(
        "INSERT INTO stream_tickets (ticket_id, tenant_id, secret_sha256, actor, credential, scopes,"
        " credential_expires_at, expires_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (ticket_id, principal.tenant, secret_digest(secret), principal.actor, principal.credential,
         sorted(principal.scopes), principal.expires_at, expires_at),
    )  # fmt: skip
    return f"{TICKET_PREFIX}{ticket_id}_{secret}", expires_at


async def redeem_ticket(pool: AsyncConnectionPool[Any], ticket: str) -> Principal:
    """The principal a ticket was issued for, spending it; ``Unauthenticated`` if it is not a valid, unused,
    unexpired ticket."""
    match = TICKET_PATTERN.match(ticket)
    if match is None:
        raise Unauthenticated("a valid stream ticket is required")
    async with pool.connection() as conn:
        row = await fetch_maybe(
            conn, "SELECT * FROM kestrel_redeem_stream_ticket(%s, %s)", (match[1], secret_digest(match[2]))
        )
    if row is None:
        raise Unauthenticated("the stream ticket is unknown, used or expired")
    principal = Principal(actor=row["actor"], tenant=row["tenant_id"], scopes=frozenset(row["scopes"]),
                          credential=row["credential"], expires_at=row["credential_expires_at"])  # fmt: skip
    await recheck(pool, principal)  # revoked since the ticket was issued: refused now, not at the first re-check
    return principal


async def recheck(pool: AsyncConnectionPool[Any], principal: Principal) -> frozenset[str]:
    """The scopes the principal's credential grants now; ``Unauthenticated`` once it grants nothing."""
    if principal.expires_at is not None and principal.expires_at <= datetime.now(UTC):
        raise Unauthenticated("the token expired")
    kind, _, ident = principal.credential.partition(":")
    async with pool.connection() as conn:
        if kind == "token":
            row = await credentials.token_lookup(conn, ident)
            if row is None:
                raise Unauthenticated("the token is unknown")
            return token_grants(row) & principal.scopes
        if kind == "oauth":
            client = await credentials.client_lookup(conn, ident)
            return client_grants(client, principal.tenant or "", principal.scopes)
    raise Unauthenticated("a tenant's credential is required")


def check_origin(connection: ASGIConnection[Any, Any, Any, Any], allowed: frozenset[str]) -> None:
    """A browser's request (it sends ``Origin``) must come from this API's own origin or one configured; other
    clients send none."""
    origin = connection.headers.get("origin")
    if origin is None:
        return
    host = connection.headers.get("host", "")
    parts = urlsplit(origin)
    if origin in allowed or (parts.netloc and hmac.compare_digest(parts.netloc, host)):
        return
    raise Forbidden("this origin may not open streams (KESTREL_API_STREAM_ORIGINS)")
