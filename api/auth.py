"""Who is calling, and in which tenant (ADR-0012).

Two kinds of bearer token:
- the platform administrator's bootstrap token (``KESTREL_API_ADMIN_TOKEN``): manages tenants, nothing inside
  them;
- API tokens ``kst_<id>_<secret>``: bound to one tenant, scoped (``devices:read`` ...), expiring, revocable,
  stored as SHA-256. A token that belongs to a user never exceeds that user's current role.

Every tenant request runs in one transaction that sets ``kestrel.tenant``; PostgreSQL's row-level security
then shows that tenant's rows only, whatever the query says. Fails closed: no token, a bad one, an expired,
revoked or foreign one, a disabled user or a suspended tenant are all 401.
"""

from __future__ import annotations

import hmac
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar import Request
from litestar.di import NamedDependency
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from kestrel_core.errors import Forbidden, RateLimited, Unauthenticated, Unavailable
from kestrel_core.ratelimit import TokenBuckets
from kestrel_core.tokens import ROLE_SCOPES, TOKEN_PATTERN, TOKEN_PREFIX, secret_digest


class RateLimiter(TokenBuckets):
    """``tenants.api_requests_per_s``, per API process (ADR-0012)."""

    def check(self, tenant: str, rate: int) -> None:
        if (wait := self.take(tenant, float(rate))) is not None:
            raise RateLimited(f"tenant over its quota of {rate} requests/s", retry_after=wait)


@dataclass(frozen=True)
class Principal:
    actor: str  # "platform-admin", "token:<id>" or "user:<id>/token:<id>"
    tenant: str | None  # None: the platform administrator
    scopes: frozenset[str]

    @property
    def platform(self) -> bool:
        return self.tenant is None

    def need(self, scope: str) -> str:
        """The tenant, when this principal may use ``scope`` in it; ``Forbidden`` otherwise."""
        if self.tenant is None:
            raise Forbidden("the platform token manages tenants; use a tenant's API token for this")
        if scope not in self.scopes:
            raise Forbidden(f"this token lacks the {scope} scope")
        return self.tenant

    def need_platform(self) -> None:
        if self.tenant is not None:
            raise Forbidden("only the platform administrator manages tenants")


#: How route handlers receive the caller (the router provides it as the ``principal`` dependency).
CallerPrincipal = NamedDependency[Principal]


def pool(request: Request[Any, Any, Any]) -> AsyncConnectionPool[Any]:
    result: AsyncConnectionPool[Any] = request.app.state.pool
    return result


def platform_pool(request: Request[Any, Any, Any]) -> AsyncConnectionPool[Any]:
    """The platform operations' own connection (role kestrel_platform, migration 0012); tenant requests never use
    it, and kestrel_api cannot run these operations at all."""
    result: AsyncConnectionPool[Any] | None = request.app.state.platform_pool
    if result is None:
        raise Unavailable("platform operations are not configured (KESTREL_API_PLATFORM_DATABASE_URL)")
    return result


async def _token_principal(request: Request[Any, Any, Any], token: str) -> Principal:
    match = TOKEN_PATTERN.match(token)
    if match is None:
        raise Unauthenticated("a valid bearer token is required")
    token_id, secret = match[1], match[2]
    async with pool(request).connection() as conn:
        row = await (await conn.execute("SELECT * FROM kestrel_token_lookup(%s)", (token_id,))).fetchone()
    digest = secret_digest(secret)
    if row is None or not hmac.compare_digest(digest, row[3]):
        raise Unauthenticated("a valid bearer token is required")
    tenant, user_id, scopes, _, expires_at, revoked_at, role, user_status, tenant_status, rate = row
    if revoked_at is not None or expires_at <= datetime.now(UTC):
        raise Unauthenticated("the token is expired or revoked")
    if tenant is None or tenant_status != "active":
        raise Unauthenticated("the token's tenant is not active")
    granted = frozenset(scopes)
    actor = f"token:{token_id}"
    if user_id is not None:
        if user_status != "active":
            raise Unauthenticated("the token's user is disabled")
        granted &= ROLE_SCOPES.get(role, frozenset())
        actor = f"user:{user_id}/token:{token_id}"
    if rate is not None:
        limiter: RateLimiter = request.app.state.rate_limiter
        limiter.check(tenant, rate)
    return Principal(actor=actor, tenant=tenant, scopes=granted)


async def provide_principal(request: Request[Any, Any, Any]) -> Principal:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("a valid bearer token is required")
    expected: str = request.app.state.admin_token
    if expected and hmac.compare_digest(token.encode(), expected.encode()):  # first: whatever its format
        return Principal(actor="platform-admin", tenant=None, scopes=frozenset())
    if token.startswith(TOKEN_PREFIX):
        return await _token_principal(request, token)
    if token.count(".") == 2:  # an OAuth access token (a JWT)
        from api.oauth import access_token_principal  # noqa: PLC0415 - oauth builds on this module

        return await access_token_principal(request, token)
    raise Unauthenticated("a valid bearer token is required")


def request_id(request: Request[Any, Any, Any]) -> str:
    given = request.headers.get("x-request-id", "")
    return given if re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", given) else uuid.uuid4().hex


@asynccontextmanager
async def tenant_transaction(request: Request[Any, Any, Any], tenant: str) -> AsyncIterator[AsyncConnection[Any]]:
    """A connection inside one transaction whose row-level security context is ``tenant``."""
    async with pool(request).connection() as conn, conn.transaction():
        await conn.execute("SELECT set_config('kestrel.tenant', %s, true)", (tenant,))
        yield conn


_json = msgspec.json.Encoder()


async def audit(
    conn: AsyncConnection[Any],
    request: Request[Any, Any, Any],
    principal: Principal,
    action: str,
    target: str,
    before: object = None,
    after: object = None,
) -> None:
    """One audit row in the caller's transaction: it exists if and only if the change committed."""
    await conn.execute(
        "INSERT INTO audit_log (tenant_id, actor, action, target, before, after, request_id)"
        " VALUES (%s, %s, %s, %s, %s::jsonb, %s::jsonb, %s)",
        (
            principal.tenant,
            principal.actor,
            action,
            target,
            None if before is None else _json.encode(before).decode(),
            None if after is None else _json.encode(after).decode(),
            request_id(request),
        ),
    )
