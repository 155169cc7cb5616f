"""The composition root: pools, authentication, limits, every resource's routes, errors and the OpenAPI document."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

from litestar import Litestar, Router
from litestar.datastructures import State
from litestar.di import Provide
from litestar.handlers import HTTPRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.plugins.prometheus import PrometheusConfig
from psycopg_pool import AsyncConnectionPool

from api import (
    alarms,
    audit,
    channels,
    claims,
    commands,
    devices,
    groups,
    health,
    oauth,
    presence,
    rules,
    shadows,
    streams,
    telemetry,
    tenants,
    tokens,
    users,
)
from api.auth import RateLimiter, provide_principal
from api.auth.access_tokens import SigningKeys
from api.bounds import BODY_LIMIT, accepted_media_types, require_media_type
from api.console import console_routers
from api.graphql import graphql_controller
from api.openapi import RefinedJson
from api.problems import handle_exception, problem_specs
from api.settings import ApiSettings
from api.streams import ws
from api.streams.hub import Hub
from kestrel import __version__
from kestrel.runtime.nats import connect_nats
from kestrel.store.migrate import available_migrations, privileged
from kestrel.store.pool import checked_pool
from kestrel_core.errors import Unavailable

log = logging.getLogger("kestrel.api")

#: Every resource's routes under /api/v1, in the order the document lists them.
RESOURCES: Final[list[list[HTTPRouteHandler]]] = [
    tenants.ROUTES,
    devices.ROUTES,
    groups.ROUTES,
    telemetry.ROUTES,
    presence.ROUTES,
    shadows.ROUTES,
    commands.ROUTES,
    streams.ROUTES,
    rules.ROUTES,
    alarms.ROUTES,
    channels.ROUTES,
    claims.ROUTES,
    users.ROUTES,
    tokens.ROUTES,
    oauth.ROUTES,
    audit.ROUTES,
]
API_ERRORS: Final = problem_specs(400, 401, 403, 404, 409, 412, 429)
BODY_ERRORS: Final = problem_specs(413, 415)
PRIVILEGED_DETAIL: Final = (
    "the API's database role owns tables or bypasses row-level security; connect it as kestrel_api"
    " (KESTREL_API_DATABASE_URL)"
)


async def _refuse_privileged_role(pool: AsyncConnectionPool[Any]) -> None:
    """Tenant isolation rests on row-level security, which a table owner or a BYPASSRLS role would skip: the
    API refuses to serve with such a role (ADR-0012). An unreachable database is left to /readyz."""
    try:
        async with pool.connection(timeout=5) as conn:
            refused = await privileged(conn)
    except Exception:  # noqa: BLE001 - unreachable now; readiness reports it, requests fail closed
        log.warning("database unreachable at start; the role check runs when it answers")
        return
    if refused:
        raise Unavailable(PRIVILEGED_DETAIL)


async def _connect_hub(app: Litestar, settings: ApiSettings) -> None:
    """NATS for the streams, in the background: the API serves everything else while NATS is away (streams 503)."""
    app.state.hub = Hub(await connect_nats(settings.nats_url, "kestrel-api"), settings.stream_max_per_tenant)


def _routes() -> list[HTTPRouteHandler]:
    """Every resource route, each documenting the errors it can answer."""
    handlers = [handler for routes in RESOURCES for handler in routes]
    for handler in handlers:
        body_errors = BODY_ERRORS if accepted_media_types(handler) else {}
        handler.responses = {**API_ERRORS, **body_errors, **(handler.responses or {})}
    return handlers


def _openapi() -> OpenAPIConfig:
    return OpenAPIConfig(
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
    )


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
        app.state.hub = None
        connecting = asyncio.create_task(_connect_hub(app, settings)) if settings.nats_url and open_pool else None
        try:
            yield
        finally:
            if connecting is not None:
                connecting.cancel()
                with contextlib.suppress(BaseException):
                    await connecting
            if app.state.hub is not None:
                await app.state.hub.nc.close()
            await pool.close()
            if platform is not None:
                await platform.close()

    api_v1 = Router(
        path="/api/v1",
        route_handlers=[
            *_routes(),
            oauth.token,
            health.version,
            ws.ws,
            graphql_controller(settings.graphql_introspection),
        ],
        dependencies={"principal": Provide(provide_principal)},
        security=[{"bearerAuth": []}],
        before_request=require_media_type,
        request_max_body_size=BODY_LIMIT,
    )
    prometheus = PrometheusConfig(app_name="kestrel_api", prefix="kestrel_api", group_path=True, exclude=["/metrics"])
    return Litestar(
        route_handlers=[api_v1, *health.ROUTES, *console_routers()],
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
                "stream_max_s": settings.stream_max_s,
                "stream_origins": frozenset(o.strip() for o in settings.stream_origins.split(",") if o.strip()),
            }
        ),
        openapi_config=_openapi(),
    )


__all__ = ["ApiSettings", "create_app"]
