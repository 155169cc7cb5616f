"""Users of a tenant; a user's tokens never exceed the user's role (ADR-0012)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, Response, get, patch, post
from litestar.params import JSONBody, PathParameter

from api.auth import CallerPrincipal
from api.context import tenant_transaction
from api.params import STRICT
from api.preconditions import IdempotencyKey, IfMatch, etag, expected_version, remember, replay
from kestrel.store import users

UserId = Annotated[str, PathParameter(pattern="^u[0-9a-f]{16}$")]
Role = Literal["admin", "operator", "viewer"]


class User(msgspec.Struct, frozen=True, kw_only=True):
    user_id: str
    email: str
    role: str
    status: str
    version: int
    created_at: datetime


class UserCreate(msgspec.Struct, **STRICT):
    email: Annotated[str, msgspec.Meta(pattern=r"^[^@\s\x00-\x1f\x7f]{1,64}@[^@\s\x00-\x1f\x7f]{1,255}$")]
    role: Role


class UserPatch(msgspec.Struct, **STRICT):
    role: Role | None = None
    status: Literal["active", "disabled"] | None = None


@get("/users", operation_id="listUsers", summary="List users", tags=["users"])
async def list_users(request: Request[Any, Any, Any], principal: CallerPrincipal) -> list[User]:
    tenant = principal.need("users:read")
    async with tenant_transaction(request, tenant) as conn:
        return [User(**r) for r in await users.list_all(conn, tenant)]


@post("/users", operation_id="createUser", summary="Create a user", tags=["users"])
async def create_user(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    data: JSONBody[UserCreate],
    idempotency_key: IdempotencyKey = None,
) -> User:
    tenant = principal.need("users:write")
    async with tenant_transaction(request, tenant) as conn:
        if (stored := await replay(conn, tenant, idempotency_key, "user", data)) is not None:
            return msgspec.convert(stored, User)
        user = User(**await users.create(conn, principal.acting(request), tenant, data.email, data.role))
        await remember(conn, tenant, idempotency_key, "user", data, user)
    return user


@patch("/users/{user_id:str}", operation_id="updateUser", summary="Change a user's role or status", tags=["users"])
async def patch_user(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    user_id: UserId,
    data: JSONBody[UserPatch],
    if_match: IfMatch = None,
) -> Response[User]:
    tenant = principal.need("users:write")
    async with tenant_transaction(request, tenant) as conn:
        _, after = await users.update(
            conn, principal.acting(request), tenant, user_id, role=data.role, status=data.status,
            expected_version=expected_version(if_match),
        )  # fmt: skip
    return Response(User(**after), headers={"ETag": etag(after["version"])})


ROUTES = [list_users, create_user, patch_user]
