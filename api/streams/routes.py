"""The streams' endpoints (issue 14, ADR-0021): ``POST /stream/tickets`` (a browser's single-use ticket),
``GET /stream`` (Server-Sent Events; ``Last-Event-ID`` resumes) and ``/ws`` (WebSocket, JSON messages)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, get, post
from litestar.connection import ASGIConnection
from litestar.params import HeaderParameter, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage
from psycopg_pool import AsyncConnectionPool

from api.auth import CallerPrincipal, Principal
from api.auth.bearer import bearer_principal
from api.context import tenant_transaction
from api.problems import problem_specs
from api.streams.access import check_origin, issue_ticket, redeem_ticket
from api.streams.hub import Hub
from api.streams.session import End, Gap, Heartbeat, Lagged, Out, events, subscribe
from kestrel_core.errors import Unavailable
from kestrel_core.live import Cursor, LiveEvent, parse_cursor, parse_filter

_encode = msgspec.json.Encoder()
#: A filter in a URL stays within what HTTP servers take in a request head (16 KiB); a longer one goes over the
#: WebSocket, in a message.
List = Annotated[str | None, QueryParameter(description="Comma-separated", max_length=2000)]


class Ticket(msgspec.Struct, frozen=True, kw_only=True):
    ticket: str
    expires_at: datetime
    #: Whose streams it opens, and the scopes they are checked against (what the console shows and hides).
    tenant: str
    scopes: list[str]


def hub_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Hub:
    hub: Hub | None = connection.app.state.get("hub")
    if hub is None:
        raise Unavailable("streams need NATS (KESTREL_API_NATS_URL)")
    return hub


def pool_of(connection: ASGIConnection[Any, Any, Any, Any]) -> AsyncConnectionPool[Any]:
    result: AsyncConnectionPool[Any] = connection.app.state.pool
    return result


async def stream_principal(connection: ASGIConnection[Any, Any, Any, Any], ticket: str | None) -> Principal:
    """A ticket's principal (spent), or the bearer token's; browsers from an allowed origin only."""
    check_origin(connection, connection.app.state.stream_origins)
    if ticket:
        return await redeem_ticket(pool_of(connection), ticket)
    principal = await bearer_principal(connection, connection.headers.get("authorization", ""))
    if principal.tenant is None:
        raise Unavailable("streams are a tenant's: use a tenant's API token or OAuth access token")
    return principal


@post("/stream/tickets", operation_id="createStreamTicket", summary="A single-use ticket that opens one stream",
      tags=["streams"], status_code=201)  # fmt: skip
async def create_ticket(request: Request[Any, Any, Any], principal: CallerPrincipal) -> Ticket:
    """For browsers, which cannot send a token with an EventSource or a WebSocket: valid 30 seconds, once; the
    stream it opens ends when the token that bought it expires or is revoked."""
    tenant = principal.tenant or ""
    async with tenant_transaction(request, tenant) as conn:
        ticket, expires_at = await issue_ticket(conn, principal)
    return Ticket(ticket=ticket, expires_at=expires_at, tenant=tenant, scopes=sorted(principal.scopes))


def _csv(value: str | None) -> list[str]:
    return [v for v in (value or "").split(",") if v]


def sse_message(out: Out) -> ServerSentEventMessage:
    """One SSE message: ``id`` is the cursor to resume from (the browser sends it back as ``Last-Event-ID``)."""
    if isinstance(out, LiveEvent):
        return ServerSentEventMessage(data=_encode.encode(out).decode(), event=out.kind, id=out.cursor)
    if isinstance(out, Heartbeat):
        return ServerSentEventMessage(data="{}", event="heartbeat", id=str(out.cursor))
    if isinstance(out, Lagged):
        return ServerSentEventMessage(data=_encode.encode({"cursor": str(out.cursor)}).decode(), event="lagged")
    if isinstance(out, Gap):
        return ServerSentEventMessage(data=_encode.encode({"stream": out.family}).decode(), event="gap")
    assert isinstance(out, End)
    return ServerSentEventMessage(data=_encode.encode({"reason": out.reason}).decode(), event="end")


@get("/stream", operation_id="streamEvents", summary="Server-Sent Events of the tenant's devices", tags=["streams"],
     security=[{}], responses=problem_specs(429, 503), media_type="text/event-stream")  # fmt: skip
async def stream(
    request: Request[Any, Any, Any],
    kinds: List = None,
    devices: List = None,
    groups: List = None,
    tags: List = None,
    metrics: List = None,
    cursor: Annotated[str | None, QueryParameter(description="Resume after this cursor (or Last-Event-ID)")] = None,
    ticket: Annotated[str | None, QueryParameter(description="A stream ticket, for browsers")] = None,
    last_event_id: Annotated[str | None, HeaderParameter(name="Last-Event-ID")] = None,
) -> ServerSentEvent:
    """Events as they happen (``event``: the kind; ``id``: the cursor), heartbeats every 15 s; ``lagged`` (too slow:
    reconnect with the cursor), ``gap`` (events lost to retention) and ``end`` (token expired or revoked) say why a
    stream changes or stops. Reconnecting with ``Last-Event-ID`` delivers exactly what was missed."""
    principal = await stream_principal(request, ticket)
    wanted = parse_filter({"kinds": _csv(kinds), "devices": _csv(devices), "groups": _csv(groups),
                           "tags": _csv(tags), "metrics": _csv(metrics)})  # fmt: skip
    resume: Cursor | None = parse_cursor(last_event_id or cursor or "") if (last_event_id or cursor) else None
    subscriber = await subscribe(request.app.state.get("hub"), pool_of(request), principal, wanted)
    hub = hub_of(request)

    async def messages() -> Any:
        async for out in events(
            hub, pool_of(request), principal, subscriber, resume, max_s=request.app.state.stream_max_s
        ):
            yield sse_message(out)

    return ServerSentEvent(messages(), retry_duration=2000, headers={"Cache-Control": "no-store"})


ROUTES = [create_ticket, stream]
