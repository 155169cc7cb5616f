"""OAuth 2.0 access tokens (ADR-0012): EdDSA JWTs signed with the API's key (``kid`` = the key's thumbprint),
``aud`` = ``kestrel-api``, 15 minutes. A request carrying one is checked for signature, audience, issuer and expiry,
and its client must still be active: revoking a client ends its tokens at once. Rotation: deploy a new signing key
and keep the previous one's public half in ``KESTREL_API_PREVIOUS_SIGNING_KEYS`` until its tokens have expired.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from litestar.connection import ASGIConnection

from api.auth.principal import Principal
from api.context import pool
from kestrel.store import credentials
from kestrel_core.errors import InvalidInput, Unauthenticated

AUDIENCE: Final = "kestrel-api"
ISSUER: Final = "kestrel"
ACCESS_TOKEN_S: Final = 900


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

    def issue(self, client_id: str, tenant: str, scope: str) -> str:
        """A signed access token for ``client_id`` of ``tenant`` with ``scope`` (space-separated)."""
        assert self.private_key is not None  # the token endpoint refuses before this without a key
        now = int(time.time())
        claims = {
            "iss": ISSUER, "aud": AUDIENCE, "sub": client_id, "tenant": tenant, "scope": scope, "iat": now,
            "exp": now + ACCESS_TOKEN_S, "jti": secrets.token_hex(8),
        }  # fmt: skip
        return jwt.encode(claims, self.private_key, algorithm="EdDSA", headers={"kid": self.kid})


def thumbprint(key: ed25519.Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def new_signing_key_pem() -> bytes:
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


async def client(request: ASGIConnection[Any, Any, Any, Any], client_id: str) -> dict[str, Any] | None:
    """The OAuth client ``client_id`` names, with its tenant's status (before any tenant is known)."""
    async with pool(request).connection() as conn:
        return await credentials.client_lookup(conn, client_id)


async def access_token_principal(request: ASGIConnection[Any, Any, Any, Any], token: str) -> Principal:
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
    row = await client(request, str(claims["sub"]))
    granted = client_grants(row, str(claims["tenant"]), frozenset(str(claims["scope"]).split()))
    assert row is not None
    if row["api_requests_per_s"] is not None:
        request.app.state.rate_limiter.check(row["tenant_id"], row["api_requests_per_s"])
    expires_at = datetime.fromtimestamp(int(claims["exp"]), UTC)
    return Principal(actor=f"oauth:{claims['sub']}", tenant=row["tenant_id"], scopes=granted,
                     credential=f"oauth:{claims['sub']}", expires_at=expires_at)  # fmt: skip


def client_grants(row: dict[str, Any] | None, tenant: str, asked: frozenset[str]) -> frozenset[str]:
    """What an OAuth client (``kestrel_oauth_client_lookup``'s row) grants now of the scopes ``asked``;
    ``Unauthenticated`` when it is revoked, of another tenant, or its tenant is not active."""
    if row is None or row["revoked_at"] is not None or row["tenant_id"] != tenant or row["tenant_status"] != "active":
        raise Unauthenticated("the access token's client is revoked or its tenant inactive")
    return asked & frozenset(row["scopes"])
