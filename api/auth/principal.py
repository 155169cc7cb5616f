"""Who is calling, and in which tenant (ADR-0012)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from litestar import Request
from litestar.di import NamedDependency

from api.context import request_id
from kestrel.store.session import Actor
from kestrel_core.errors import Forbidden, RateLimited
from kestrel_core.ratelimit import TokenBuckets


class RateLimiter(TokenBuckets):
    """``tenants.api_requests_per_s``, per API process (ADR-0012)."""

    def check(self, tenant: str, rate: int) -> None:
        if (wait := self.take(tenant, float(rate))) is not None:
            raise RateLimited(f"tenant over its quota of {rate} requests/s", retry_after=wait)


@dataclass(frozen=True)
class Principal:
    actor: str  # "platform-admin", "token:<id>", "user:<id>/token:<id>" or "oauth:<client>"
    tenant: str | None  # None: the platform administrator
    scopes: frozenset[str]
    #: What authenticated it, to check again later (``token:<id>``, ``oauth:<client_id>``; empty: the platform's).
    credential: str = ""
    #: When that credential stops being valid (None: the platform's token, or unknown).
    expires_at: datetime | None = None

    @property
    def platform(self) -> bool:
        return self.tenant is None

    def need(self, scope: str) -> str:
        """The tenant, when this principal may use ``scope`` in it; ``Forbidden`` otherwise."""
        if self.tenant is None:
            raise Forbidden("the platform token manages tenants; use a tenant's API token for this")
        if scope not in self.scopes:
            raise Forbidden(f"this token lacks the {scope} scope")
        return self.tenant

    def need_platform(self) -> None:
        if self.tenant is not None:
            raise Forbidden("only the platform administrator manages tenants")

    def acting(self, request: Request[Any, Any, Any]) -> Actor:
        """This principal as the audit log records it, in this request."""
        return Actor(self.actor, request_id(request))


#: How route handlers receive the caller (the router provides it as the ``principal`` dependency).
CallerPrincipal = NamedDependency[Principal]
