"""Liveness, readiness and Prometheus metrics (operators' routes, outside ``/api/v1``)."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, get
from litestar.plugins.prometheus import PrometheusController
from litestar.types import ControllerRouterHandler

from api.context import pool
from api.problems import problem_specs
from kestrel import __version__
from kestrel.store.migrate import schema_version
from kestrel_core.errors import Unavailable


class Health(msgspec.Struct, frozen=True):
    status: str
    version: str = __version__


class MetricsController(PrometheusController):
    """Prometheus exposition for operators; not part of the public API document."""

    include_in_schema = False


@get("/healthz", operation_id="getLiveness", summary="Liveness", tags=["health"], include_in_schema=True)
async def healthz() -> Health:
    return Health("ok")


@get(
    "/readyz",
    operation_id="getReadiness",
    summary="Readiness: database reachable and migrated",
    tags=["health"],
    responses=problem_specs(503),
)
async def readyz(request: Request[Any, Any, Any]) -> Health:
    try:
        async with pool(request).connection(timeout=2) as conn:
            version = await schema_version(conn)
    except Exception as exc:
        raise Unavailable("database unreachable") from exc
    if version < request.app.state.schema_version:
        raise Unavailable("database schema is not migrated; run `kestrel db migrate`")
    return Health("ready")


class Version(msgspec.Struct, frozen=True):
    version: str = __version__


@get(
    "/version",
    operation_id="getVersion",
    summary="The platform's version (no credentials needed)",
    tags=["health"],
    security=[{}],
)
async def version() -> Version:
    return Version()


ROUTES: list[ControllerRouterHandler] = [healthz, readyz, MetricsController]
