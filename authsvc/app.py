"""authsvc's HTTP surface: ``POST /mqtt/authn`` on the EMQX 5.8 contract, ``/healthz``.

Fails closed (ADR-0009): a definitive denial is ``200 {"result": "deny"}``; a request without the brokers'
shared key is refused with 401, and an internal failure (database down) answers 503. EMQX treats any
non-200 as "ignore" and our plugin as "defer", and both end in a deny when no other authenticator admits.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hmac
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.datastructures import State
from psycopg_pool import AsyncConnectionPool

from authsvc.contract import AuthnRequest, AuthnResponse
from authsvc.decide import DEFAULT_AUDIENCE, authenticate
from authsvc.revocation import CachedIdentity, MosquittoKicker, listen_for_revocations
from authsvc.store import PostgresIdentity
from kestrel.settings import Secret

log = logging.getLogger("kestrel.authsvc")
_request_decoder = msgspec.json.Decoder(AuthnRequest)


class AuthsvcSettings(msgspec.Struct, frozen=True, kw_only=True):
    """``KESTREL_AUTHSVC_*``; the database comes from ``KESTREL_DATABASE_URL``."""

    host: str = "127.0.0.1"
    port: int = 8090
    broker_key: Secret = msgspec.field(default_factory=lambda: Secret(""))
    jwt_audience: str = DEFAULT_AUDIENCE
    pool_max: int = 10
    cache_ttl_s: float = 30.0
    #: Mosquitto to disconnect revoked clients on (through the plugin's control topic), as a principal
    #: of role ``control``. Unset: revoked sessions end at their ``expire_at`` only (logged at start).
    kick_mqtt_host: str = "127.0.0.1"
    kick_mqtt_port: int = 0
    kick_username: str = ""
    kick_password: Secret = msgspec.field(default_factory=lambda: Secret(""))


def _problem(status: int, detail: str) -> Response[dict[str, object]]:
    body: dict[str, object] = {"type": "about:blank", "title": detail, "status": status}
    return Response(body, status_code=status, media_type="application/problem+json")


@post("/mqtt/authn", status_code=200)
async def authn(request: Request[Any, Any, Any]) -> Response[Any]:
    expected: str = request.app.state.broker_key
    given = request.headers.get("x-authsvc-key", "")
    if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        return _problem(401, "broker key missing or wrong")
    try:
        body = _request_decoder.decode(await request.body())
    except msgspec.MsgspecError:
        return _problem(400, "not an authentication request")
    try:
        decision: AuthnResponse = await authenticate(
            body, request.app.state.identity, dt.datetime.now(dt.UTC), request.app.state.jwt_audience
        )
    except Exception:
        log.exception("authentication failed internally; the broker will deny")
        return _problem(503, "authentication unavailable")
    return Response(msgspec.json.encode(decision), media_type="application/json")


@get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def create_app(settings: AuthsvcSettings, database_url: str) -> Litestar:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            database_url, min_size=1, max_size=settings.pool_max, open=False, timeout=2
        )
        await pool.open(wait=False)
        cache = CachedIdentity(PostgresIdentity(pool), ttl=settings.cache_ttl_s)
        app.state.identity = cache
        kicker = None
        if settings.kick_mqtt_port and settings.kick_username:
            kicker = MosquittoKicker(
                settings.kick_mqtt_host,
                settings.kick_mqtt_port,
                settings.kick_username,
                settings.kick_password.reveal(),
                instance=f"{socket.gethostname()[:40]}-{settings.port}".replace(".", "-"),
            )
        else:
            log.warning("no kick target configured: revoked sessions end at their expire_at only")
        listener = asyncio.create_task(
            listen_for_revocations(database_url, cache, kicker.kick if kicker else None), name="revocations"
        )
        try:
            yield
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            if kicker is not None:
                await kicker.close()
            await pool.close()

    return Litestar(
        route_handlers=[authn, healthz],
        lifespan=[lifespan],
        openapi_config=None,
        state=State({"broker_key": settings.broker_key.reveal(), "jwt_audience": settings.jwt_audience}),
    )
