"""authsvc's HTTP surface: ``POST /mqtt/authn`` on the EMQX 5.8 contract, ``/healthz``, ``/metrics``.

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
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.datastructures import State
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest

from authsvc import acl
from authsvc.contract import AuthnRequest, AuthnResponse, AuthzRequest, AuthzResponse
from authsvc.decide import DEFAULT_AUDIENCE, authenticate, device_acl
from authsvc.journal import follow_identity_changes
from authsvc.revocation import CachedIdentity, EmqxKicker, MosquittoKicker
from authsvc.store import PostgresIdentity
from kestrel.store.pool import checked_pool
from kestrel_core.errors import InvalidInput
from kestrel_core.settings import Secret

log = logging.getLogger("kestrel.authsvc")
_request_decoder = msgspec.json.Decoder(AuthnRequest)
_authz_decoder = msgspec.json.Decoder(AuthzRequest)


class AuthsvcSettings(msgspec.Struct, frozen=True, kw_only=True):
    """``KESTREL_AUTHSVC_*``; the database comes from ``KESTREL_DATABASE_URL``."""

    #: The HTTP listener the broker calls (loopback or a private network).
    host: str = "127.0.0.1"
    #: Its port.
    port: int = 8090
    #: The secret the broker sends in X-Authsvc-Key; requests without it are refused.
    broker_key: Secret = msgspec.field(default_factory=lambda: Secret(""))
    #: The aud device JWTs must carry.
    jwt_audience: str = DEFAULT_AUDIENCE
    #: Database connections.
    pool_max: int = 10
    #: Lookups are cached this long; identity changes invalidate the cache at once (LISTEN).
    cache_ttl_s: float = 30.0
    #: Mosquitto to disconnect revoked clients on (through the plugin's control topic), as a principal
    #: of role ``control``. Unset: revoked sessions end at their ``expire_at`` only (logged at start).
    kick_mqtt_host: str = "127.0.0.1"
    #: 0: no Mosquitto to kick on.
    kick_mqtt_port: int = 0
    #: The control principal's name.
    kick_username: str = ""
    #: The control principal's secret.
    kick_password: Secret = msgspec.field(default_factory=lambda: Secret(""))
    #: EMQX (production): its REST API and an API key, to disconnect revoked clients cluster-wide.
    kick_emqx_url: str = ""
    #: EMQX API key.
    kick_emqx_key: str = ""
    #: EMQX API secret.
    kick_emqx_secret: Secret = msgspec.field(default_factory=lambda: Secret(""))


def _problem(status: int, detail: str) -> Response[dict[str, object]]:
    body: dict[str, object] = {"type": "about:blank", "title": detail, "status": status}
    return Response(body, status_code=status, media_type="application/problem+json")


def _broker_refused(request: Request[Any, Any, Any]) -> Response[dict[str, object]] | None:
    expected: str = request.app.state.broker_key
    given = request.headers.get("x-authsvc-key", "")
    if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        return _problem(401, "broker key missing or wrong")
    return None


@post("/mqtt/authn", status_code=200)
async def authn(request: Request[Any, Any, Any]) -> Response[Any]:
    if refusal := _broker_refused(request):
        return refusal
    try:
        body = _request_decoder.decode(await request.body())
    except msgspec.MsgspecError:
        return _problem(400, "not an authentication request")
    seconds: Histogram = request.app.state.authn_seconds
    started = time.perf_counter()
    try:
        decision: AuthnResponse = await authenticate(
            body, request.app.state.identity, dt.datetime.now(dt.UTC), request.app.state.jwt_audience
        )
    except Exception:
        seconds.labels("error").observe(time.perf_counter() - started)
        log.exception("authentication failed internally; the broker will deny")
        return _problem(503, "authentication unavailable")
    seconds.labels(decision.result).observe(time.perf_counter() - started)
    return Response(msgspec.json.encode(decision), media_type="application/json")


_AUTHZ_DENY = msgspec.json.encode(AuthzResponse(result="deny"))
_AUTHZ_ALLOW = msgspec.json.encode(AuthzResponse(result="allow"))


@post("/mqtt/authz", status_code=200)
async def authz(request: Request[Any, Any, Any]) -> Response[Any]:
    """The optional per-check fallback (EMQX HTTP authorization source): the device's rules as in its authn
    answer, identified by the client attributes that answer set. Anything unexpected is a deny."""
    if refusal := _broker_refused(request):
        return refusal
    try:
        body = _authz_decoder.decode(await request.body())
    except msgspec.MsgspecError:
        return _problem(400, "not an authorization request")
    allowed = False
    if body.device and body.device == body.clientid and body.action in ("publish", "subscribe"):
        try:
            rules = device_acl(body.tenant, body.device)
            qos = int(body.qos or "0")
        except (InvalidInput, ValueError):
            rules, qos = [], -1
        action: acl.Action = "publish" if body.action == "publish" else "subscribe"
        allowed = acl.decide(rules, action, body.topic, qos) is True
    return Response(_AUTHZ_ALLOW if allowed else _AUTHZ_DENY, media_type="application/json")


@get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/metrics", media_type=CONTENT_TYPE_LATEST)
async def metrics(request: Request[Any, Any, Any]) -> bytes:
    """Prometheus: ``kestrel_authsvc_authn_seconds{result}`` (allow, deny, error: the SLOs of docs/slo.md)."""
    return generate_latest(request.app.state.registry)


def _metrics() -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    seconds = Histogram(
        "kestrel_authsvc_authn_seconds", "Time to decide a broker authentication, by result (allow, deny, error)",
        ["result"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=registry,
    )  # fmt: skip
    return registry, seconds


def create_app(settings: AuthsvcSettings, database_url: str) -> Litestar:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # Below the brokers' authn timeout (plugin 1.5 s, EMQX 3 s): with the database down, 503 comes first.
        pool = checked_pool(database_url, max_size=settings.pool_max, timeout=1.0)
        await pool.open(wait=False)
        cache = CachedIdentity(PostgresIdentity(pool), ttl=settings.cache_ttl_s)
        app.state.identity = cache
        kickers: list[MosquittoKicker | EmqxKicker] = []
        if settings.kick_mqtt_port and settings.kick_username:
            kickers.append(
                MosquittoKicker(
                    settings.kick_mqtt_host,
                    settings.kick_mqtt_port,
                    settings.kick_username,
                    settings.kick_password.reveal(),
                    instance=f"{socket.gethostname()[:40]}-{settings.port}".replace(".", "-"),
                )
            )
        if settings.kick_emqx_url:
            kickers.append(
                EmqxKicker(settings.kick_emqx_url, settings.kick_emqx_key, settings.kick_emqx_secret.reveal())
            )
        if not kickers:
            log.warning("no kick target configured: revoked sessions end at their expire_at only")

        async def kick(clientids: list[str], usernames: list[str]) -> None:
            for kicker in kickers:
                await kicker.kick(clientids, usernames)

        listener = asyncio.create_task(
            follow_identity_changes(database_url, cache, kick if kickers else None), name="revocations"
        )
        try:
            yield
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            for kicker in kickers:
                await kicker.close()
            await pool.close()
            log.info("authsvc stopped")

    registry, authn_seconds = _metrics()
    return Litestar(
        route_handlers=[authn, authz, healthz, metrics],
        logging_config=None,  # keep kestrel.runtime.logs' JSON lines (Litestar would install its own format)
        lifespan=[lifespan],
        openapi_config=None,
        state=State(
            {
                "broker_key": settings.broker_key.reveal(),
                "jwt_audience": settings.jwt_audience,
                "registry": registry,
                "authn_seconds": authn_seconds,
            }
        ),
    )
