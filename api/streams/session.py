"""One client's subscription from start to end, the same for SSE, WebSocket and GraphQL (ADR-0021): join the
process's feed, replay what the client missed since its cursor, then live events with heartbeats; the credential is
checked again every few seconds; the end says why (lagged, token expired or revoked, scope lost)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

from psycopg_pool import AsyncConnectionPool

from api.auth.principal import Principal
from api.streams.access import recheck
from api.streams.hub import Hub, Subscriber
from kestrel.store.dryrun import scoped_devices
from kestrel.store.session import tenant_scope
from kestrel_core.errors import Unauthenticated, Unavailable
from kestrel_core.live import KIND_SCOPES, Cursor, Filter, LiveEvent, granted_kinds
from kestrel_core.rules.actions import Scope

HEARTBEAT_S: Final = 15.0
RECHECK_S: Final = 5.0
#: Groups and tags are resolved to devices when the subscription starts and again this often.
MEMBERS_S: Final = 30.0


@dataclass(frozen=True, slots=True)
class Heartbeat:
    cursor: Cursor


@dataclass(frozen=True, slots=True)
class Lagged:
    """The client fell too far behind; it resumes from ``cursor`` (everything before was delivered)."""

    cursor: Cursor


@dataclass(frozen=True, slots=True)
class Gap:
    """The stream ``family`` no longer holds events right after the client's cursor (retention): some are lost."""

    family: str


@dataclass(frozen=True, slots=True)
class End:
    reason: str  # token_expired_or_revoked, scope_lost, max_lifetime (reconnect with the cursor)


Out = LiveEvent | Heartbeat | Lagged | Gap | End


async def selected_devices(pool: AsyncConnectionPool[Any], tenant: str, wanted: Filter) -> frozenset[str] | None:
    """The devices a filter selects in the tenant, as a rule's scope does (``scoped_devices``); the devices it names
    count even before they exist. None: every device."""
    if not wanted.selects_devices:
        return None
    named = frozenset(wanted.devices)
    if not (wanted.groups or wanted.tags):
        return named
    scope = Scope(devices=list(wanted.devices), groups=list(wanted.groups), tags=list(wanted.tags))
    async with pool.connection() as conn, tenant_scope(conn, tenant):
        return named | frozenset(await scoped_devices(conn, tenant, scope) or ())


async def subscribe(
    hub: Hub | None, pool: AsyncConnectionPool[Any], principal: Principal, wanted: Filter
) -> Subscriber:
    """A subscriber for ``principal``'s tenant: ``Forbidden`` for a kind its scopes do not allow, ``Unavailable``
    without NATS (``hub`` None), ``RateLimited`` when the tenant has its most streams open in this process."""
    assert principal.tenant is not None
    kinds = granted_kinds(wanted, principal.scopes)
    if hub is None:
        raise Unavailable("streams need NATS (KESTREL_API_NATS_URL)")
    hub.admit(principal.tenant)
    devices = await selected_devices(pool, principal.tenant, wanted)
    return Subscriber(tenant=principal.tenant, kinds=kinds, wanted=wanted, devices=devices)


async def events(
    hub: Hub,
    pool: AsyncConnectionPool[Any],
    principal: Principal,
    subscriber: Subscriber,
    cursor: Cursor | None,
    *,
    max_s: float = 3600.0,
    joined: Cursor | None = None,
    heartbeat_s: float = HEARTBEAT_S,
    recheck_s: float = RECHECK_S,
) -> AsyncIterator[Out]:
    """Everything the client receives, until it ends (the caller stops iterating when the client leaves).
    ``joined``: the caller joined the hub already (``hub.join``), at that position, to tell the client it is live."""
    ends_at = time.monotonic() + max_s
    live_start = joined if joined is not None else await hub.join(subscriber)
    try:
        if cursor is not None:
            async for missed in hub.replay(subscriber, cursor, live_start):
                yield Gap(missed) if isinstance(missed, str) else missed
            subscriber.delivered = live_start
        yield Heartbeat(live_start)  # where the live events start: a first resume point
        now = time.monotonic()
        next_beat, next_check, next_members = now + heartbeat_s, now + recheck_s, now + MEMBERS_S
        while True:
            if time.monotonic() >= ends_at:
                yield End("max_lifetime")
                return
            wait = max(0.0, min(next_beat, next_check, ends_at) - time.monotonic())
            event = await subscriber.next(wait)
            if event is not None:
                yield event
                next_beat = time.monotonic() + heartbeat_s
            elif subscriber.lagged:
                yield Lagged(subscriber.delivered)  # everything up to it was sent; the rest is in the streams
                return
            now = time.monotonic()
            if now >= next_beat:
                position = hub.position(subscriber.tenant)
                if position is not None and not subscriber.queue:  # all it was sent: the feed's position is its own
                    subscriber.delivered = position
                yield Heartbeat(subscriber.delivered)
                next_beat = now + heartbeat_s
            if now >= next_check:
                try:
                    scopes = await recheck(pool, principal)
                except Unauthenticated:
                    yield End("token_expired_or_revoked")
                    return
                if any(KIND_SCOPES[k] not in scopes for k in subscriber.kinds):
                    yield End("scope_lost")
                    return
                next_check = time.monotonic() + recheck_s
            if now >= next_members and subscriber.wanted.selects_devices:
                subscriber.devices = await selected_devices(pool, subscriber.tenant, subscriber.wanted)
                next_members = now + MEMBERS_S
    finally:
        hub.leave(subscriber)  # no await: a cancelled stream must still leave
