"""HTTP preconditions in one place: ETags and ``If-Match`` (optimistic concurrency), ``Idempotency-Key`` (safe retries
of creates). Each header is validated at the edge by the pattern declared here, which the OpenAPI document states,
so a malformed one is a 400 with problem details before any handler runs (ADR-0012).
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Final

import msgspec
from litestar.params import HeaderParameter
from psycopg import AsyncConnection
from psycopg.rows import dict_row

from kestrel_core.errors import Conflict, PreconditionFailed

#: The key as stored; migration 0011 checks the same pattern in the database.
IDEMPOTENCY_KEY_CHARS: Final = r"[A-Za-z0-9_.:+/=-]{1,200}"
#: Unquoted (as most clients send it) or as a Structured Field string (as the IETF draft writes it).
IDEMPOTENCY_KEY_PATTERN: Final = rf'^({IDEMPOTENCY_KEY_CHARS}|"{IDEMPOTENCY_KEY_CHARS}")$'
#: One ETag this API issued (``"v3"`` for objects, ``"s3"`` for shadows), weak or not, or ``*``.
IF_MATCH_PATTERN: Final = r'^(\*|(W/)?"[vs][0-9]{1,18}")$'

#: Object and shadow versions are PostgreSQL ``integer`` columns.
MAX_VERSION: Final = 2**31 - 1

IfMatch = Annotated[
    str | None,
    HeaderParameter(
        name="If-Match",
        pattern=IF_MATCH_PATTERN,
        description='The ETag of a read (e.g. "v3"); 412 when the object changed since',
    ),
]
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        pattern=IDEMPOTENCY_KEY_PATTERN,
        description="Replays the first answer for the same request; 1-200 of A-Z a-z 0-9 _ . : + / = -",
    ),
]


def etag(version: int, kind: str = "v") -> str:
    """``"v{version}"`` for objects, ``"s{version}"`` for shadows (ADR-0013): one cannot stand for the other."""
    return f'"{kind}{version}"'


def expected_version(if_match: str | None, kind: str = "v") -> int | None:
    """The version an ``If-Match`` names; None for ``*`` or no header; 412 for another kind's ETag."""
    if if_match is None or if_match.strip() == "*":
        return None
    value = if_match.strip().removeprefix("W/")
    if not (value.startswith(f'"{kind}') and value.endswith('"') and value[2:-1].isdigit()):
        raise PreconditionFailed("If-Match must be an ETag this API returned for this object")
    version = int(value[2:-1])
    if version > MAX_VERSION:  # versions are PostgreSQL integers: a larger one was never issued
        raise PreconditionFailed("If-Match names a version this object never had")
    return version


def idempotency_key(header: str | None) -> str | None:
    """The stored form of a validated ``Idempotency-Key`` header (its quotes removed)."""
    return None if header is None else header.strip('"')


def _digest(kind: str, body: object) -> str:
    """The request's identity for Idempotency-Key: what is created, and from which body."""
    return hashlib.sha256(msgspec.json.encode([kind, body])).hexdigest()


async def replay(conn: AsyncConnection[Any], tenant: str, key: str | None, kind: str, body: object) -> Any | None:
    """The stored answer of an earlier create with this Idempotency-Key (409 if the request differs)."""
    key = idempotency_key(key)
    if key is None:
        return None
    cur = conn.cursor(row_factory=dict_row)
    rows = await (
        await cur.execute(
            "SELECT request_sha256, body FROM idempotency_keys WHERE tenant_id = %s AND key = %s", (tenant, key)
        )
    ).fetchall()
    if not rows:
        return None
    if rows[0]["request_sha256"] != _digest(kind, body):
        raise Conflict("this Idempotency-Key was used with a different request")
    return rows[0]["body"]


async def remember(
    conn: AsyncConnection[Any], tenant: str, key: str | None, kind: str, body: object, answer: object
) -> None:
    """Store the answer of a create under its Idempotency-Key, in the create's transaction."""
    key = idempotency_key(key)
    if key is not None:
        await conn.execute(
            "INSERT INTO idempotency_keys (tenant_id, key, request_sha256, status, body) VALUES (%s, %s, %s, 201, %s)",
            (tenant, key, _digest(kind, body), msgspec.json.encode(answer).decode()),
        )
