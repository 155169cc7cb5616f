"""API token format and scopes, shared by the API (which checks them) and the operator CLI (which issues them).

``kst_<id>_<secret>``: the 16-hex id is public and recognisable; the 43-character secret is shown once and
stored only as SHA-256 (ADR-0012).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Final, Literal, get_args

#: What a token may be allowed to do; the API's schemas take their enum from here.
Scope = Literal[
    "devices:read",
    "devices:write",
    "telemetry:read",
    "groups:read",
    "groups:write",
    "users:read",
    "users:write",
    "tokens:read",
    "tokens:write",
    "audit:read",
    "commands:write",
    "rules:read",
    "rules:write",
    "alarms:read",
    "alarms:write",
]
SCOPES: Final[tuple[str, ...]] = get_args(Scope)
_READ_ONLY = frozenset({"devices:read", "telemetry:read", "groups:read", "rules:read", "alarms:read"})
#: What a user's role allows; a user's token never exceeds it.
ROLE_SCOPES: Final[dict[str, frozenset[str]]] = {
    "viewer": _READ_ONLY,
    #: Operators acknowledge and clear alarms; rules and notification channels are the admins'.
    "operator": _READ_ONLY | {"devices:write", "groups:write", "commands:write", "alarms:write"},
    "admin": frozenset(SCOPES),
}
TOKEN_PREFIX: Final = "kst_"  # noqa: S105 - a recognisable prefix, not a secret
TOKEN_PATTERN: Final = re.compile(r"\Akst_([0-9a-f]{16})_([A-Za-z0-9_-]{43})\Z")


#: Backend principals' secrets (ADR-0008): how authsvc tells a service's password from a device's.
SERVICE_SECRET_PREFIX: Final = "ksvc_"  # noqa: S105 - a recognisable prefix, not a secret
CLAIM_PREFIX: Final = "kpc_"
CLAIM_PATTERN: Final = re.compile(r"\Akpc_([0-9a-f]{16})_([A-Za-z0-9_-]{43})\Z")


def new_claim_token() -> tuple[str, str, str]:
    """A just-in-time provisioning claim (ADR-0013): (claim id, token shown once, SHA-256 of its secret)."""
    claim_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return claim_id, f"{CLAIM_PREFIX}{claim_id}_{secret}", secret_digest(secret)


def new_token() -> tuple[str, str, str]:
    """(token id, full token shown once, SHA-256 of its secret)."""
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return token_id, f"{TOKEN_PREFIX}{token_id}_{secret}", secret_digest(secret)


def secret_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
