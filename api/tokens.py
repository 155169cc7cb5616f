"""API tokens of a tenant: secrets shown once, stored as digests; a token never grants more than its creator has."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import msgspec
from litestar import Request, delete, get, post
from litestar.params import JSONBody, PathParameter

from api.auth import CallerPrincipal
from api.context import tenant_transaction
from api.params import STRICT, Label
from kestrel.store import credentials
from kestrel_core.errors import Forbidden
from kestrel_core.tokens import SCOPES, Scope

TokenId = Annotated[str, PathParameter(pattern="^[0-9a-f]{16}$")]


class Token(msgspec.Struct, frozen=True, kw_only=True):
    token_id: str
    name: str
    user_id: str | None
    scopes: list[str]
    expires_at: datetime
    revoked_at: datetime | None
    created_at: datetime


class TokenCreate(msgspec.Struct, **STRICT):
    scopes: Annotated[list[Scope], msgspec.Meta(min_length=1, max_length=len(SCOPES))]
    name: Label = ""
    user_id: Annotated[str, msgspec.Meta(pattern="^u[0-9a-f]{16}$")] | None = None
    expires_in_days: Annotated[int, msgspec.Meta(ge=1, le=365)] = 90


class TokenCreated(msgspec.Struct, frozen=True, kw_only=True):
    token: str  # shown once
    token_id: str
    scopes: list[str]
    expires_at: datetime


@get("/tokens", operation_id="listTokens", summary="List API tokens (never their secrets)", tags=["tokens"])
async def list_tokens(request: Request[Any, Any, Any], principal: CallerPrincipal) -> list[Token]:
    tenant = principal.need("tokens:read")
    async with tenant_transaction(request, tenant) as conn:
        return [Token(**r) for r in await credentials.list_tokens(conn, tenant)]


@post("/tokens", operation_id="createToken", summary="Create an API token (its secret is shown once)", tags=["tokens"])
async def create_token(
    request: Request[Any, Any, Any], principal: CallerPrincipal, data: JSONBody[TokenCreate]
) -> TokenCreated:
    tenant = principal.need("tokens:write")
    if not set(data.scopes) <= principal.scopes:
        raise Forbidden("a token cannot grant scopes its creator does not have")
    expires_at = datetime.now(UTC) + timedelta(days=data.expires_in_days)
    async with tenant_transaction(request, tenant) as conn:
        token_id, token = await credentials.create_token(
            conn, principal.acting(request), tenant, data.scopes, expires_at=expires_at, name=data.name,
            user=data.user_id,
        )  # fmt: skip
    return TokenCreated(token=token, token_id=token_id, scopes=sorted(set(data.scopes)), expires_at=expires_at)


@delete(
    "/tokens/{token_id:str}",
    operation_id="revokeToken",
    summary="Revoke an API token",
    tags=["tokens"],
    status_code=204,
)
async def revoke_token(request: Request[Any, Any, Any], principal: CallerPrincipal, token_id: TokenId) -> None:
    tenant = principal.need("tokens:write")
    async with tenant_transaction(request, tenant) as conn:
        await credentials.revoke(conn, principal.acting(request), tenant, "token", token_id)


ROUTES = [list_tokens, create_token, revoke_token]
