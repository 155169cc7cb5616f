"""Just-in-time provisioning claims (ADR-0013): a token a device presents once to register itself."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from psycopg import AsyncConnection

from kestrel.store import audit, groups, tenants
from kestrel.store.rows import fetch_all, fetch_one
from kestrel.store.session import Actor
from kestrel_core.errors import InvalidInput
from kestrel_core.tokens import new_claim_token
from kestrel_core.topics import require_id

COLUMNS: Final = "claim_id, name, max_uses, used, expires_at, group_id, tags, status, created_at"
MAX_USES: Final = 1_000_000
EXPIRY_S: Final = (60, 365 * 86400)


async def create(
    conn: AsyncConnection[Any],
    actor: Actor,
    tenant: str,
    *,
    name: str = "",
    max_uses: int = 1,
    expires_in_s: int = 86400,
    group: str | None = None,
    tags: Sequence[str] = (),
) -> tuple[str, dict[str, Any]]:
    """A claim for ``max_uses`` devices, put in ``group`` with ``tags``; returns (its token, shown once, the claim)."""
    if not 1 <= max_uses <= MAX_USES or not EXPIRY_S[0] <= expires_in_s <= EXPIRY_S[1]:
        raise InvalidInput("bad_claim", "max uses is 1 to 1,000,000 and the expiry 60 s to 365 days")
    await tenants.require(conn, tenant)
    if group is not None:
        require_id("group", group)
        await groups.get(conn, tenant, group)
    claim_id, token, digest = new_claim_token()
    claim = await fetch_one(
        conn,
        "INSERT INTO provisioning_claims (claim_id, tenant_id, name, secret_sha256, max_uses, expires_at, group_id,"
        f" tags) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING {COLUMNS}",
        (claim_id, tenant, name, digest, max_uses, datetime.now(UTC) + timedelta(seconds=expires_in_s), group,
         list(tags)),
        "",
    )  # fmt: skip
    await audit.record(conn, actor, tenant, "claim.create", f"claim:{claim_id}", after=claim)
    return token, claim


async def list_all(conn: AsyncConnection[Any], tenant: str) -> list[dict[str, Any]]:
    return await fetch_all(
        conn,
        f"SELECT {COLUMNS} FROM provisioning_claims WHERE tenant_id = %s ORDER BY created_at DESC",
        (tenant,),
    )


async def revoke(conn: AsyncConnection[Any], actor: Actor, tenant: str, claim: str) -> None:
    await fetch_one(
        conn,
        "UPDATE provisioning_claims SET status = 'revoked' WHERE claim_id = %s AND tenant_id = %s RETURNING claim_id",
        (claim, tenant),
        f"claim {claim} not found",
    )
    await audit.record(conn, actor, tenant, "claim.revoke", f"claim:{claim}")
