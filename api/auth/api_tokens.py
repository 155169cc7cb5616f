"""API tokens ``kst_<id>_<secret>``: bound to one tenant, scoped, expiring, revocable, stored as SHA-256. A token
that belongs to a user never exceeds that user's current role."""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import Any

from litestar.connection import ASGIConnection

from api.auth.principal import Principal, RateLimiter
from api.context import pool
from kestrel.store import credentials
from kestrel_core.errors import Unauthenticated
from kestrel_core.tokens import ROLE_SCOPES, TOKEN_PATTERN, secret_digest


async def token_principal(request: ASGIConnection[Any, Any, Any, Any], token: str) -> Principal:
    """The principal of a valid API token; ``Unauthenticated`` for anything else."""
    match = TOKEN_PATTERN.match(token)
    if match is None:
        raise Unauthenticated("a valid bearer token is required")
    token_id, secret = match[1], match[2]
    async with pool(request).connection() as conn:
        row = await credentials.token_lookup(conn, token_id)
    if row is None or not hmac.compare_digest(secret_digest(secret), row["secret_sha256"]):
        raise Unauthenticated("a valid bearer token is required")
    granted = token_grants(row)
    tenant = row["tenant_id"]
    actor = f"token:{token_id}" if row["user_id"] is None else f"user:{row['user_id']}/token:{token_id}"
    if row["api_requests_per_s"] is not None:
        limiter: RateLimiter = request.app.state.rate_limiter
        limiter.check(tenant, row["api_requests_per_s"])
    return Principal(actor=actor, tenant=tenant, scopes=granted, credential=f"token:{token_id}",
                     expires_at=row["expires_at"])  # fmt: skip


def token_grants(row: dict[str, Any]) -> frozenset[str]:
    """What a token (``kestrel_token_lookup``'s row) grants now; ``Unauthenticated`` when it grants nothing: expired,
    revoked, its tenant not active or its user disabled. A user's token never exceeds the user's role."""
    if row["revoked_at"] is not None or row["expires_at"] <= datetime.now(UTC):
        raise Unauthenticated("the token is expired or revoked")
    if row["tenant_id"] is None or row["tenant_status"] != "active":
        raise Unauthenticated("the token's tenant is not active")
    granted = frozenset(row["scopes"])
    if row["user_id"] is not None:
        if row["user_status"] != "active":
            raise Unauthenticated("the token's user is disabled")
        granted &= ROLE_SCOPES.get(row["user_role"], frozenset())
    return granted
