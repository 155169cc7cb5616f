"""The three kinds of bearer credential, told apart (ADR-0012). Fails closed: no token, a bad one, an expired,
revoked or foreign one, a disabled user or a suspended tenant are all 401.

- the platform administrator's bootstrap token (``KESTREL_API_ADMIN_TOKEN``): manages tenants, nothing inside them;
- API tokens ``kst_<id>_<secret>`` (``api_tokens``);
- OAuth access tokens, JWTs issued by ``POST /api/v1/oauth/token`` (``access_tokens``).
"""

from __future__ import annotations

import hmac
from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection

from api.auth.access_tokens import access_token_principal
from api.auth.api_tokens import token_principal
from api.auth.principal import Principal
from kestrel_core.errors import Unauthenticated
from kestrel_core.tokens import TOKEN_PREFIX


async def provide_principal(request: Request[Any, Any, Any]) -> Principal:
    return await bearer_principal(request, request.headers.get("authorization", ""))


async def bearer_principal(connection: ASGIConnection[Any, Any, Any, Any], authorization: str) -> Principal:
    """The principal of an ``Authorization`` value (``Bearer <token>``), from a header or, on a GraphQL WebSocket,
    the ``connection_init`` payload; ``Unauthenticated`` for anything else."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("a valid bearer token is required")
    expected: str = connection.app.state.admin_token
    if expected and hmac.compare_digest(token.encode(), expected.encode()):  # first: whatever its format
        return Principal(actor="platform-admin", tenant=None, scopes=frozenset())
    if token.startswith(TOKEN_PREFIX):
        return await token_principal(connection, token)
    if token.count(".") == 2:  # an OAuth access token (a JWT)
        return await access_token_principal(connection, token)
    raise Unauthenticated("a valid bearer token is required")
