"""OAuth 2.0 client credentials (RFC 6749 §4.4) for integrators (ADR-0012).

``POST /api/v1/oauth/token`` exchanges a client's id and secret (HTTP Basic, or form fields) for an access token:
an EdDSA JWT signed with the API's key (``kid`` = the key's thumbprint), ``aud`` = ``kestrel-api``, 15 minutes.
Requests carrying it are checked for signature, audience, issuer and expiry, and the client must still be active:
revoking a client ends its tokens at once. Rotation: deploy a new signing key and keep the previous one's public
half in ``KESTREL_API_PREVIOUS_SIGNING_KEYS`` until its tokens have expired.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final
from urllib.parse import parse_qs

import jwt
import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from litestar import Request, Response, delete, get, post
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema
from litestar.params import Body, PathParameter, RawBody

from api.auth import CallerPrincipal, Principal, audit, pool, tenant_transaction
from api.control import Label, revoke_credential
from kestrel_core.errors import Forbidden, InvalidInput, Unauthenticated
from kestrel_core.tokens import SCOPES, Scope, secret_digest

AUDIENCE: Final = "kestrel-api"
ISSUER: Final = "kestrel"
ACCESS_TOKEN_S: Final = 900
CLIENT_ID_PATTERN: Final = "^kcl_[0-9a-f]{16}$"
ClientId = Annotated[str, PathParameter(pattern=CLIENT_ID_PATTERN)]


@dataclass(frozen=True)
class SigningKeys:
    """The key that signs, and every key that verifies (the current one and those being rotated out)."""

    kid: str
    private_key: ed25519.Ed25519PrivateKey | None
    verify: dict[str, ed25519.Ed25519PublicKey]

    @staticmethod
    def load(key_file: str, previous: str = "") -> SigningKeys:
        """``key_file``: PEM Ed25519 private key (none: access tokens are not issued); ``previous``: comma-separated
        PEM public key files still accepted."""
        verify: dict[str, ed25519.Ed25519PublicKey] = {}
        private = None
        kid = ""
        if key_file:
            loaded = serialization.load_pem_private_key(Path(key_file).read_bytes(), None)
            if not isinstance(loaded, ed25519.Ed25519PrivateKey):
                raise InvalidInput("bad_signing_key", "the API signing key must be Ed25519 (PEM, unencrypted)")
            private = loaded
            kid = thumbprint(loaded.public_key())
            verify[kid] = loaded.public_key()
        for name in filter(None, (p.strip() for p in previous.split(","))):
            public = serialization.load_pem_public_key(Path(name).read_bytes())
            if not isinstance(public, ed25519.Ed25519PublicKey):
                raise InvalidInput("bad_signing_key", f"{name} is not an Ed25519 public key")
            verify[thumbprint(public)] = public
        return SigningKeys(kid, private, verify)


def thumbprint(key: ed25519.Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def new_signing_key_pem() -> bytes:
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


async def _client(request: Request[Any, Any, Any], client_id: str) -> tuple[Any, ...] | None:
    async with pool(request).connection() as conn:
        row = await (await conn.execute("SELECT * FROM kestrel_oauth_client_lookup(%s)", (client_id,))).fetchone()
    return None if row is None else tuple(row)


async def access_token_principal(request: Request[Any, Any, Any], token: str) -> Principal:
    """The principal of a valid access token; ``Unauthenticated`` for anything else."""
    keys: SigningKeys = request.app.state.signing_keys
    try:
        kid = jwt.get_unverified_header(token).get("kid")
        key = keys.verify.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise Unauthenticated("access token signed by an unknown key")
        claims = jwt.decode(
            token,
            key,
            algorithms=["EdDSA"],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"require": ["exp", "iat", "sub", "aud", "iss", "tenant", "scope"]},
        )
    except jwt.PyJWTError as exc:
        raise Unauthenticated("the access token is invalid or expired") from exc
    row = await _client(request, str(claims["sub"]))
    if row is None or row[3] is not None or row[0] != claims["tenant"] or row[4] != "active":
        raise Unauthenticated("the access token's client is revoked or its tenant inactive")
    granted = frozenset(str(claims["scope"]).split()) & frozenset(row[1])
    if row[5] is not None:
        request.app.state.rate_limiter.check(row[0], row[5])
    return Principal(actor=f"oauth:{claims['sub']}", tenant=row[0], scopes=granted)


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
    row = await _client(request, client_id) if client_id.startswith("kcl_") and len(client_id) == 20 else None
    if (
        row is None
        or not hmac.compare_digest(secret_digest(secret), row[2])
        or row[3] is not None
        or row[4] != "active"
    ):
        return _oauth_error(401, "invalid_client", "unknown client, wrong secret, revoked client or inactive tenant")
    allowed = set(row[1])
    wanted = set(data.scope.split()) if data.scope else allowed
    if not wanted <= allowed:
        return _oauth_error(400, "invalid_scope", "the client may not have: " + " ".join(sorted(wanted - allowed)))
    if keys.private_key is None:
        return _oauth_error(400, "unsupported_grant_type", "this API has no signing key configured")
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": client_id,
        "tenant": row[0],
        "scope": " ".join(sorted(wanted)),
        "iat": now,
        "exp": now + ACCESS_TOKEN_S,
        "jti": secrets.token_hex(8),
    }
    signed = jwt.encode(claims, keys.private_key, algorithm="EdDSA", headers={"kid": keys.kid})
    answer = TokenResponse(
        access_token=signed,
        token_type="Bearer",  # noqa: S106 - the OAuth token type, not a secret
        expires_in=ACCESS_TOKEN_S,
        scope=claims["scope"],
    )
    return Response(answer, headers={"Cache-Control": "no-store"})


# ---------------------------------------------------------------------------------------------- management


class OAuthClient(msgspec.Struct, frozen=True, kw_only=True):
    client_id: str
    name: str
    scopes: list[str]
    created_at: Any
    revoked_at: Any


class OAuthClientCreate(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    scopes: Annotated[list[Scope], msgspec.Meta(min_length=1, max_length=len(SCOPES))]
    name: Label = ""


class OAuthClientCreated(msgspec.Struct, frozen=True, kw_only=True):
    client_id: str
    client_secret: str  # shown once
    scopes: list[str]


@get("/oauth-clients", summary="List OAuth clients (never their secrets)", tags=["oauth"])
async def list_clients(request: Request[Any, Any, Any], principal: CallerPrincipal) -> list[OAuthClient]:
    tenant = principal.need("tokens:read")
    async with tenant_transaction(request, tenant) as conn:
        rows = await (
            await conn.execute(
                "SELECT client_id, name, scopes, created_at, revoked_at FROM oauth_clients ORDER BY created_at"
            )
        ).fetchall()
    return [OAuthClient(client_id=r[0], name=r[1], scopes=r[2], created_at=r[3], revoked_at=r[4]) for r in rows]


@post("/oauth-clients", summary="Create an OAuth client (its secret is shown once)", tags=["oauth"])
async def create_client(
    request: Request[Any, Any, Any], principal: CallerPrincipal, data: Annotated[OAuthClientCreate, Body()]
) -> OAuthClientCreated:
    tenant = principal.need("tokens:write")
    scopes: list[str] = sorted(set(data.scopes))  # each is a Scope: the schema has the enum
    if not set(scopes) <= principal.scopes:
        raise Forbidden("a client cannot get scopes its creator does not have")
    client_id, secret = "kcl_" + secrets.token_hex(8), "kcs_" + secrets.token_urlsafe(32)
    async with tenant_transaction(request, tenant) as conn:
        await conn.execute(
            "INSERT INTO oauth_clients (client_id, tenant_id, name, scopes, secret_sha256) VALUES (%s, %s, %s, %s, %s)",
            (client_id, tenant, data.name, scopes, secret_digest(secret)),
        )
        await audit(
            conn, request, principal, "oauth_client.create", f"oauth_client:{client_id}", after={"scopes": scopes}
        )
    return OAuthClientCreated(client_id=client_id, client_secret=secret, scopes=scopes)


@delete(
    "/oauth-clients/{client_id:str}",
    summary="Revoke an OAuth client and its access tokens",
    tags=["oauth"],
    status_code=204,
)
async def revoke_client(request: Request[Any, Any, Any], principal: CallerPrincipal, client_id: ClientId) -> None:
    await revoke_credential(request, principal, "oauth_client", client_id)


MANAGEMENT_ROUTES = [list_clients, create_client, revoke_client]
