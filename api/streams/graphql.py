"""GraphQL subscriptions over graphql-transport-ws on ``/api/v1/graphql`` (ADR-0021): the same events, filters,
cursors, bounds and re-checks as the SSE and WebSocket streams. The socket authenticates in ``connection_init``
(``{"ticket": "kstt_..."}`` from a browser, or ``{"authorization": "Bearer ..."}``); a subscription that lags or
whose token ends finishes with an error saying so (with the cursor to resume from)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import strawberry
from graphql import GraphQLError
from litestar.connection import ASGIConnection
from strawberry.scalars import JSON
from strawberry.types import Info

from api.auth import Principal
from api.auth.bearer import bearer_principal
from api.streams.access import check_origin, redeem_ticket
from api.streams.routes import hub_of, pool_of
from api.streams.session import End, Gap, Heartbeat, Lagged, events, subscribe
from kestrel_core.errors import KestrelError
from kestrel_core.live import LiveEvent, parse_cursor, parse_filter


@strawberry.type
class StreamEvent:
    kind: str
    device: str
    #: Resume after this event with ``events(cursor: ...)``.
    cursor: str
    data: JSON


async def connect(socket: ASGIConnection[Any, Any, Any, Any], params: dict[str, Any]) -> Principal:
    """The principal of a ``connection_init`` payload; ``KestrelError`` refuses the socket."""
    check_origin(socket, socket.app.state.stream_origins)
    if isinstance(params.get("ticket"), str):
        return await redeem_ticket(pool_of(socket), params["ticket"])
    principal = await bearer_principal(socket, str(params.get("authorization", "")))
    if principal.tenant is None:
        raise KestrelError("streams are a tenant's")
    return principal


@strawberry.type
class Subscription:
    @strawberry.subscription(description="Events of the caller's tenant as they happen; `cursor` resumes.")
    async def events(
        self,
        info: Info[Any, Any],
        kinds: list[str] | None = None,
        devices: list[str] | None = None,
        groups: list[str] | None = None,
        tags: list[str] | None = None,
        metrics: list[str] | None = None,
        cursor: str | None = None,
    ) -> AsyncGenerator[StreamEvent, None]:
        principal: Principal = info.context.principal
        socket = info.context.websocket
        if socket is None or principal.tenant is None:
            raise GraphQLError("subscriptions need a WebSocket authenticated in connection_init")
        try:
            wanted = parse_filter({"kinds": kinds or [], "devices": devices or [], "groups": groups or [],
                                   "tags": tags or [], "metrics": metrics or []})  # fmt: skip
            resume = parse_cursor(cursor) if cursor else None
            subscriber = await subscribe(hub_of(socket), pool_of(socket), principal, wanted)
        except KestrelError as exc:
            raise GraphQLError(exc.detail) from exc
        async for out in events(
            hub_of(socket), pool_of(socket), principal, subscriber, resume, max_s=socket.app.state.stream_max_s
        ):
            if isinstance(out, LiveEvent):
                yield StreamEvent(kind=out.kind, device=out.device, cursor=out.cursor, data=out.data)
            elif isinstance(out, Lagged):
                raise GraphQLError("lagged: subscribe again from the cursor", extensions={"cursor": str(out.cursor)})
            elif isinstance(out, End):
                raise GraphQLError(f"stream ended: {out.reason}", extensions={"reason": out.reason})
            elif isinstance(out, Gap):  # events lost to retention after the cursor: said, as an event of its own
                gap: Any = {"stream": out.family}
                yield StreamEvent(kind="gap", device="", cursor=str(subscriber.delivered), data=gap)
            else:
                assert isinstance(out, Heartbeat)
