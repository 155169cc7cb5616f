"""The REST API: routes, schemas and the composition root ``create_app``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, Final

import msgspec
from litestar import Litestar, Request, Router, get
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.spec import Components, SecurityScheme
from litestar.params import PathParameter, QueryParameter
from litestar.plugins.prometheus import PrometheusConfig, PrometheusController
from psycopg_pool import AsyncConnectionPool

from api import queries
from api.auth import CallerPrincipal, RateLimiter, pool, provide_principal, tenant_transaction
from api.bounds import BODY_LIMIT, accepted_media_types, require_media_type
from api.control import ROUTES as CONTROL_ROUTES
from api.graphql import graphql_controller
from api.oauth import MANAGEMENT_ROUTES as OAUTH_MANAGEMENT
from api.oauth import SigningKeys
from api.oauth import token as oauth_token
from api.openapi import RefinedJson
from api.problems import PROBLEM_JSON, Problem, handle_exception
from api.twin import ROUTES as TWIN_ROUTES
from kestrel import __version__
from kestrel.store.migrate import available_migrations
from kestrel.store.pool import checked_pool
from kestrel_core.errors import InvalidInput, Unavailable
from kestrel_core.messages.telemetry import NO_SEQ, MetricValue
from kestrel_core.settings import Secret
from kestrel_core.topics import ID_PATTERN

log = logging.getLogger("kestrel.api")
DeviceId = Annotated[str, PathParameter(pattern=f"^{ID_PATTERN}$", description="Device id")]
Limit = Annotated[int, QueryParameter(ge=1, le=10_000, description="Page size")]


class ApiSettings(msgspec.Struct, frozen=True, kw_only=True):
    """``KESTREL_API_*``. ``database_url`` connects as the API's own role (kestrel_api: no table owned, no
    BYPASSRLS); ``admin_token`` is the platform administrator's bootstrap token."""

    host: str = "127.0.0.1"
    port: int = 8080
    admin_token: Secret = msgspec.field(default_factory=lambda: Secret(""))
    database_url: Secret = msgspec.field(default_factory=lambda: Secret(""))
    #: The platform token's operations (tenants) connect as kestrel_platform, never as the API's role (ADR-0012).
    platform_database_url: Secret = msgspec.field(default_factory=lambda: Secret(""))
    graphql_introspection: bool = False
    #: Ed25519 private key (PEM) signing OAuth access tokens; unset: the token endpoint issues none.
    signing_key_file: str = ""
    #: Comma-separated public keys (PEM files) of rotated-out signing keys, still accepted until their tokens expire.
    previous_signing_keys: str = ""
    pool_min: int = 1
    pool_max: int = 10


# ---------------------------------------------------------------------------------------------- schemas


class TelemetryPoint(msgspec.Struct, frozen=True, kw_only=True):
    """One stored reading: the chosen metric's value, or every metric when no ``metric`` was asked for."""

    ts: datetime
    seq: int | None
    stream: str
    value: MetricValue | dict[str, MetricValue] | None


class TelemetryBucket(msgspec.Struct, frozen=True, kw_only=True):
    bucket: datetime
    value: MetricValue | None
    samples: int


class Telemetry(msgspec.Struct, frozen=True, kw_only=True):
    """Raw points (no ``bucket``/``agg``) or aggregated buckets (both given)."""

    device_id: str
    metric: str | None
    start: datetime = msgspec.field(name="from")
    end: datetime = msgspec.field(name="to")
    bucket: str | None = None
    agg: queries.Agg | None = None
    points: list[TelemetryPoint] = msgspec.field(default_factory=list)
    buckets: list[TelemetryBucket] = msgspec.field(default_factory=list)
    next_cursor: str | None = None


class Health(msgspec.Struct, frozen=True):
    status: str
    version: str = __version__


def _problems(*codes: int) -> dict[int, ResponseSpec]:
    described = {
        400: "Invalid request",
        401: "Missing, invalid, expired or revoked token",
        403: "The token lacks the scope",
        404: "Not found (or another tenant's)",
        409: "Conflict",
        412: "If-Match does not match the current version",
        413: "The body is larger than this route takes",
        415: "The body's media type is not one this route takes",
        429: "The tenant is over its request quota (see Retry-After)",
        503: "Not ready",
    }
    return {
        code: ResponseSpec(
            data_container=Problem, media_type=PROBLEM_JSON, description=described[code], generate_examples=False
        )
        for code in codes
    }


API_ERRORS = _problems(400, 401, 403, 404, 409, 412, 429)
BODY_ERRORS = _problems(413, 415)


# ------------------------------------------------------------------------------------------------ routes


class MetricsController(PrometheusController):
    """Prometheus exposition for operators; not part of the public API document."""

    include_in_schema = False


@get(
    "/devices/{device_id:str}/telemetry", summary="Query a device's telemetry", tags=["telemetry"], responses=API_ERRORS
)
async def get_telemetry(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    device_id: DeviceId,
    metric: Annotated[
        str | None,
        QueryParameter(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}$", description="Metric name; required with agg"),
    ] = None,
    start: Annotated[datetime | None, QueryParameter(name="from", description="Inclusive start (RFC 3339)")] = None,
    end: Annotated[datetime | None, QueryParameter(name="to", description="Exclusive end (RFC 3339)")] = None,
    bucket: Annotated[str | None, QueryParameter(pattern=r"^[1-9][0-9]{0,5}[smhd]$", description="e.g. 5m")] = None,
    agg: Annotated[queries.Agg | None, QueryParameter(description="Aggregate per bucket")] = None,
    limit: Limit = 1000,
    cursor: Annotated[str | None, QueryParameter(description="next_cursor of the previous page")] = None,
) -> Telemetry:
    start, end = queries.window(start, end)
    if (bucket is None) != (agg is None):
        raise InvalidInput("bad_aggregation", "bucket and agg go together")
    if agg is not None and metric is None:
        raise InvalidInput("bad_aggregation", "an aggregate needs a metric")
    tenant = principal.need("telemetry:read")
    async with tenant_transaction(request, tenant) as conn:
        device = await queries.get_device(conn, device_id)
        if agg is not None and bucket is not None and metric is not None:
            rows = await queries.buckets(
                conn,
                tenant=device["tenant_id"],
                device=device_id,
                metric=metric,
                agg=agg,
                bucket=queries.parse_bucket(bucket),
                start=start,
                end=end,
            )
            return Telemetry(
                device_id=device_id,
                metric=metric,
                start=start,
                end=end,
                bucket=bucket,
                agg=agg,
                buckets=[TelemetryBucket(**row) for row in rows],
            )
        after = queries.decode_cursor(cursor) if cursor else None
        rows = await queries.raw_points(
            conn,
            tenant=device["tenant_id"],
            device=device_id,
            metric=metric,
            start=start,
            end=end,
            after=after,
            limit=limit + 1,
        )
    page = rows[:limit]
    points = [
        TelemetryPoint(ts=r["ts"], seq=None if r["seq"] == NO_SEQ else r["seq"], stream=r["stream"], value=r["value"])
        for r in page
    ]
    next_cursor = None
    if len(rows) > limit:
        last = page[-1]
        next_cursor = queries.encode_cursor(last["ts"], last["seq"], last["stream"])
    return Telemetry(device_id=device_id, metric=metric, start=start, end=end, points=points, next_cursor=next_cursor)


@get("/healthz", summary="Liveness", tags=["health"], include_in_schema=True)
async def healthz() -> Health:
    return Health("ok")


@get("/readyz", summary="Readiness: database reachable and migrated", tags=["health"], responses=_problems(503))
async def readyz(request: Request[Any, Any, Any]) -> Health:
    try:
        async with pool(request).connection(timeout=2) as conn:
            row = await (await conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")).fetchone()
    except Exception as exc:
        raise Unavailable("database unreachable") from exc
    if row is None or row[0] < request.app.state.schema_version:
        raise Unavailable("database schema is not migrated; run `kestrel db migrate`")
    return Health("ready")


# -------------------------------------------------------------------------------------------- app factory


PRIVILEGED_ROLE: Final = (
    "SELECT r.rolsuper OR r.rolbypassrls, EXISTS (SELECT 1 FROM pg_tables t"
    " WHERE t.schemaname = 'public' AND t.tableowner = current_user)"
    " FROM pg_roles r WHERE r.rolname = current_user"
)
PRIVILEGED_DETAIL: Final = (
    "the API's database role owns tables or bypasses row-level security; connect it as kestrel_api"
    " (KESTREL_API_DATABASE_URL)"
)


async def _refuse_privileged_role(pool: AsyncConnectionPool[Any]) -> None:
    """Tenant isolation rests on row-level security, which a table owner or a BYPASSRLS role would skip: the
    API refuses to serve with such a role (ADR-0012). An unreachable database is left to /readyz."""
    try:
        async with pool.connection(timeout=5) as conn:
            row = await (await conn.execute(PRIVILEGED_ROLE)).fetchone()
    except Exception:  # noqa: BLE001 - unreachable now; readiness reports it, requests fail closed
        log.warning("database unreachable at start; the role check runs when it answers")
        return
    if row is not None and (row[0] or row[1]):
        raise Unavailable(PRIVILEGED_DETAIL)


def create_app(settings: ApiSettings, database_url: str, *, open_pool: bool = True) -> Litestar:
    """Build the API. ``open_pool=False`` builds it without a database (OpenAPI generation)."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        pool = checked_pool(database_url, min_size=settings.pool_min, max_size=settings.pool_max, timeout=3.0)
        if open_pool:
            await pool.open(wait=False)
            await _refuse_privileged_role(pool)
        app.state.pool = pool
        platform = None
        if settings.platform_database_url:
            platform = checked_pool(settings.platform_database_url.reveal(), min_size=0, max_size=2, timeout=3.0)
            if open_pool:
                await platform.open(wait=False)
                await _refuse_privileged_role(platform)
        app.state.platform_pool = platform
        try:
            yield
        finally:
            await pool.close()
            if platform is not None:
                await platform.close()

    prometheus = PrometheusConfig(app_name="kestrel_api", group_path=True, exclude=["/metrics"])
    for handler in [*CONTROL_ROUTES, *TWIN_ROUTES, *OAUTH_MANAGEMENT]:  # every route documents the errors it can answer
        body_errors = BODY_ERRORS if accepted_media_types(handler) else {}
        handler.responses = {**API_ERRORS, **body_errors, **(handler.responses or {})}
    api_v1 = Router(
        path="/api/v1",
        route_handlers=[
            *CONTROL_ROUTES,
            *TWIN_ROUTES,
            *OAUTH_MANAGEMENT,
            oauth_token,
            get_telemetry,
            graphql_controller(settings.graphql_introspection),
        ],
        dependencies={"principal": Provide(provide_principal)},
        security=[{"bearerAuth": []}],
        before_request=require_media_type,
        request_max_body_size=BODY_LIMIT,
    )
    return Litestar(
        route_handlers=[api_v1, healthz, readyz, MetricsController],
        logging_config=None,  # keep kestrel.runtime.logs' JSON lines (Litestar would install its own format)
        lifespan=[lifespan],
        exception_handlers={Exception: handle_exception},
        middleware=[prometheus.middleware],
        state=State(
            {
                "admin_token": settings.admin_token.reveal(),
                "rate_limiter": RateLimiter(),
                "signing_keys": SigningKeys.load(settings.signing_key_file, settings.previous_signing_keys),
                "schema_version": max(m.version for m in available_migrations("native")),
            }
        ),
        openapi_config=OpenAPIConfig(
            title="Kestrel API",
            version=__version__,
            description="Kestrel IoT platform REST API. Errors are RFC 9457 problem details.",
            components=Components(
                security_schemes={
                    "bearerAuth": SecurityScheme(
                        type="http", scheme="bearer", description="API token, OAuth access token, or the platform token"
                    ),
                    "basicAuth": SecurityScheme(type="http", scheme="basic", description="OAuth client id and secret"),
                }
            ),
            path="/schema",
            create_examples=False,
            render_plugins=[RefinedJson()],
        ),
    )


__all__ = ["ApiSettings", "create_app"]
