"""OAuth 2.0 client credentials (RFC 6749 §4.4) for integrators (ADR-0012): the token endpoint, and the tenant's
OAuth clients. ``POST /api/v1/oauth/token`` exchanges a client's id and secret (HTTP Basic, or form fields) for an
access token (``api.auth.access_tokens``); its errors are RFC 6749's, never problem details.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final
from urllib.parse import parse_qs

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema
from litestar.params import Body, PathParameter, RawBody

from api.auth import CallerPrincipal
from api.auth.access_tokens import ACCESS_TOKEN_S, SigningKeys, client
from api.context import tenant_transaction
from api.params import Label
from kestrel.store import credentials
from kestrel_core.errors import Forbidden
from kestrel_core.tokens import SCOPES, Scope, secret_digest

CLIENT_ID_PATTERN: Final = "^kcl_[0-9a-f]{16}$"
ClientId = Annotated[str, PathParameter(pattern=CLIENT_ID_PATTERN)]


class TokenRequest(msgspec.Struct, kw_only=True):
    grant_type: str = ""
    client_id: str = ""
    client_secret: str = ""
    scope: str = ""


class TokenResponse(msgspec.Struct, frozen=True, kw_only=True):
    access_token: str
    token_type: str
    expires_in: int
    scope: str


class OAuthError(msgspec.Struct, frozen=True, kw_only=True):
    """RFC 6749 §5.2: what OAuth client libraries expect from a token endpoint."""

    error: str
    error_description: str = ""


def _oauth_error(status: int, error: str, description: str) -> Response[Any]:
    headers = {"WWW-Authenticate": 'Basic realm="kestrel"'} if status == 401 else {}
    return Response(
        OAuthError(error=error, error_description=description),
        status_code=status,
        headers=headers | {"Cache-Control": "no-store"},
    )


def _basic(request: Request[Any, Any, Any]) -> tuple[str, str] | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        client_id, _, secret = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return client_id, secret


@dataclass
class _FormBody(Operation):
    """Documents the form body (read raw, so that every error is an RFC 6749 error, never a problem document)."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            content={
                "application/x-www-form-urlencoded": OpenAPIMediaType(
                    schema=Schema(
                        type=OpenAPIType.OBJECT,
                        required=["grant_type"],
                        properties={
                            "grant_type": Schema(type=OpenAPIType.STRING, enum=["client_credentials"]),
                            "client_id": Schema(type=OpenAPIType.STRING, pattern=CLIENT_ID_PATTERN),
                            "client_secret": Schema(type=OpenAPIType.STRING, max_length=200),
                            "scope": Schema(
                                type=OpenAPIType.STRING,
                                description="Space-separated scopes (default: all of the client's)",
                                pattern=rf"^({'|'.join(SCOPES)})( ({'|'.join(SCOPES)}))*$",
                            ),
                        },
                    )
                )
            },
            required=True,
        )


def _form(raw: bytes, content_type: str) -> TokenRequest:
    if content_type.split(";", maxsplit=1)[0].strip().lower() != "application/x-www-form-urlencoded":
        raise ValueError("not a form")
    fields = {k: v[0] for k, v in parse_qs(raw.decode(errors="replace"), max_num_fields=10).items()}
    return TokenRequest(**{k: v for k, v in fields.items() if k in TokenRequest.__struct_fields__})


_OAUTH_ERRORS = {
    status: ResponseSpec(data_container=OAuthError, description=text, generate_examples=False)
    for status, text in ((400, "RFC 6749 error: bad grant or scope"), (401, "RFC 6749 invalid_client"))
}


@post(
    "/oauth/token",
    operation_id="issueAccessToken",
    summary="OAuth 2.0 client credentials: an access token for an integrator",
    tags=["oauth"],
    security=[{"basicAuth": []}, {}],
    responses=_OAUTH_ERRORS,
    status_code=200,
    operation_class=_FormBody,
)
async def token(request: Request[Any, Any, Any], body: RawBody) -> Response[TokenResponse]:
    keys: SigningKeys = request.app.state.signing_keys
    try:
        data = _form(body, request.headers.get("content-type", ""))
    except ValueError:  # not a form, or more fields than a token request has
        return _oauth_error(400, "invalid_request", "not a token request (a form, application/x-www-form-urlencoded)")
    if data.grant_type != "client_credentials":
        return _oauth_error(400, "unsupported_grant_type", "only client_credentials is supported")
    client_id, secret = _basic(request) or (data.client_id, data.client_secret)
    row = await client(request, client_id) if re.fullmatch(CLIENT_ID_PATTERN, client_id) else None
    if (
        row is None
        or not hmac.compare_digest(secret_digest(secret), row["secret_sha256"])
        or row["revoked_at"] is not None
        or row["tenant_status"] != "active"
    ):
        return _oauth_error(401, "invalid_client", "unknown client, wrong secret, revoked client or inactive tenant")
    allowed = set(row["scopes"])
    wanted = set(data.scope.split()) if data.scope else allowed
    if not wanted <= allowed:
        return _oauth_error(400, "invalid_scope", "the client may not have: " + " ".join(sorted(wanted - allowed)))
    if keys.private_key is None:
        return _oauth_error(400, "unsupported_grant_type", "this API has no signing key configured")
    scope = " ".join(sorted(wanted))
    answer = TokenResponse(
        access_token=keys.issue(client_id, row["tenant_id"], scope),
        token_type="Bearer",  # noqa: S106 - the OAuth token type, not a secret
        expires_in=ACCESS_TOKEN_S,
        scope=scope,
    )
    return Response(answer, headers={"Cache-Control": "no-store"})


# ---------------------------------------------------------------------------------------------- clients


class OAuthClient(msgspec.Struct, frozen=True, kw_only=True):
    client_id: str
    name: str
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None


class OAuthClientCreate(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    scopes: Annotated[list[Scope], msgspec.Meta(min_length=1, max_length=len(SCOPES))]
    name: Label = ""


class OAuthClientCreated(msgspec.Struct, frozen=True, kw_only=True):
    client_id: str
    client_secret: str  # shown once
    scopes: list[str]


@get(
    "/oauth-clients",
    operation_id="listOauthClients",
    summary="List OAuth clients (never their secrets)",
    tags=["oauth"],
)
async def list_clients(request: Request[Any, Any, Any], principal: CallerPrincipal) -> list[OAuthClient]:
    tenant = principal.need("tokens:read")
    async with tenant_transaction(request, tenant) as conn:
        return [OAuthClient(**r) for r in await credentials.list_clients(conn, tenant)]


@post(
    "/oauth-clients",
    operation_id="createOauthClient",
    summary="Create an OAuth client (its secret is shown once)",
    tags=["oauth"],
)
async def create_client(
    request: Request[Any, Any, Any], principal: CallerPrincipal, data: Annotated[OAuthClientCreate, Body()]
) -> OAuthClientCreated:
    tenant = principal.need("tokens:write")
    if not set(data.scopes) <= principal.scopes:
        raise Forbidden("a client cannot get scopes its creator does not have")
    async with tenant_transaction(request, tenant) as conn:
        client_id, secret, scopes = await credentials.create_client(
            conn, principal.acting(request), tenant, data.scopes, data.name
        )
    return OAuthClientCreated(client_id=client_id, client_secret=secret, scopes=scopes)


@delete(
    "/oauth-clients/{client_id:str}",
    operation_id="revokeOauthClient",
    summary="Revoke an OAuth client and its access tokens",
    tags=["oauth"],
    status_code=204,
)
async def revoke_client(request: Request[Any, Any, Any], principal: CallerPrincipal, client_id: ClientId) -> None:
    tenant = principal.need("tokens:write")
    async with tenant_transaction(request, tenant) as conn:
        await credentials.revoke(conn, principal.acting(request), tenant, "oauth_client", client_id)


#: The token endpoint answers RFC 6749 errors, not problem details: it is composed apart from these.
ROUTES = [list_clients, create_client, revoke_client]
