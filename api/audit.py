"""The tenant's audit log (append-only; every change the API or the CLI made)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, get
from litestar.params import QueryParameter

from api.auth import CallerPrincipal
from api.context import tenant_transaction
from api.params import Limit
from kestrel.store import audit


class AuditEntry(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    before: Any
    after: Any
    request_id: str


class AuditPage(msgspec.Struct, frozen=True, kw_only=True):
    items: list[AuditEntry]
    next_cursor: int | None = None


@get("/audit", operation_id="listAuditEntries", summary="The tenant's audit log, newest first", tags=["audit"])
async def list_audit(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    limit: Limit = 100,
    cursor: Annotated[int | None, QueryParameter(ge=1, le=2**63 - 1, description="next_cursor")] = None,
) -> AuditPage:
    tenant = principal.need("audit:read")
    async with tenant_transaction(request, tenant) as conn:
        rows = await audit.page(conn, tenant, before_id=cursor, limit=limit + 1)
    items = [AuditEntry(**r) for r in rows[:limit]]
    return AuditPage(items=items, next_cursor=items[-1].id if len(rows) > limit else None)


ROUTES = [list_audit]
