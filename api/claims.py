"""Just-in-time provisioning claims (ADR-0013): tokens a device presents once to register itself."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, delete, get, post
from litestar.params import JSONBody, PathParameter

from api.auth import CallerPrincipal
from api.context import tenant_transaction
from api.params import STRICT, IdField, Label, Tags
from kestrel.store import claims

ClaimId = Annotated[str, PathParameter(pattern="^[0-9a-f]{16}$")]


class ClaimCreate(msgspec.Struct, **STRICT):
    name: Label = ""
    max_uses: Annotated[int, msgspec.Meta(ge=1, le=claims.MAX_USES)] = 1
    expires_in_s: Annotated[int, msgspec.Meta(ge=claims.EXPIRY_S[0], le=claims.EXPIRY_S[1])] = 86400
    group_id: IdField | None = None
    tags: Tags = msgspec.field(default_factory=list)


class Claim(msgspec.Struct, frozen=True, kw_only=True):
    claim_id: str
    name: str
    max_uses: int
    used: int
    expires_at: datetime
    group_id: str | None
    tags: list[str]
    status: str
    created_at: datetime


class ClaimCreated(msgspec.Struct, frozen=True, kw_only=True):
    token: str  # shown once
    claim: Claim


@post(
    "/provisioning-claims",
    operation_id="createClaim",
    summary="Create a just-in-time provisioning claim (token shown once)",
    tags=["provisioning"],
    status_code=201,
)
async def create_claim(
    request: Request[Any, Any, Any], principal: CallerPrincipal, data: JSONBody[ClaimCreate]
) -> ClaimCreated:
    tenant = principal.need("devices:write")
    async with tenant_transaction(request, tenant) as conn:
        token, claim = await claims.create(
            conn, principal.acting(request), tenant, name=data.name, max_uses=data.max_uses,
            expires_in_s=data.expires_in_s, group=data.group_id, tags=data.tags,
        )  # fmt: skip
    return ClaimCreated(token=token, claim=Claim(**claim))


@get(
    "/provisioning-claims",
    operation_id="listClaims",
    summary="List provisioning claims (never their secrets)",
    tags=["provisioning"],
)
async def list_claims(request: Request[Any, Any, Any], principal: CallerPrincipal) -> list[Claim]:
    tenant = principal.need("devices:read")
    async with tenant_transaction(request, tenant) as conn:
        return [Claim(**r) for r in await claims.list_all(conn, tenant)]


@delete(
    "/provisioning-claims/{claim_id:str}",
    operation_id="revokeClaim",
    summary="Revoke a provisioning claim",
    tags=["provisioning"],
    status_code=204,
)
async def revoke_claim(request: Request[Any, Any, Any], principal: CallerPrincipal, claim_id: ClaimId) -> None:
    tenant = principal.need("devices:write")
    async with tenant_transaction(request, tenant) as conn:
        await claims.revoke(conn, principal.acting(request), tenant, claim_id)


ROUTES = [create_claim, list_claims, revoke_claim]
