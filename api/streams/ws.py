"""``/api/v1/ws``: the WebSocket stream (ADR-0021). JSON messages; one socket carries several subscriptions, each
with its filter and cursor, changed at any time.

Client: ``{"type": "subscribe", "id": "s1", "filter": {...}, "cursor": "t..e..a.."}``, ``{"type": "unsubscribe",
"id": "s1"}``, ``{"type": "ack", "id": "s1", "cursor": "..."}`` (what it has processed; told back when it lags),
``{"type": "ping"}``.
Server: ``subscribed``, ``event`` (``{"id", "event": LiveEvent}``), ``heartbeat`` (``{"id", "cursor"}``), ``lagged``
(``{"id", "cursor"}``: the subscription ended, subscribe again from the cursor), ``gap``, ``error`` (a problem
document, with the subscription's id when it concerns one), ``pong`` and ``end`` (then the socket closes: 4401 when
the token expired or was revoked)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final

import msgspec
from litestar import WebSocket, websocket
from litestar.exceptions import WebSocketDisconnect

from api.auth import Principal
from api.problems import problem_type, status_and_kind
from api.streams.routes import hub_of, pool_of, stream_principal
from api.streams.session import End, Gap, Heartbeat, Lagged, events, subscribe
from kestrel_core.errors import KestrelError
from kestrel_core.live import LiveEvent, parse_cursor, parse_filter

log = logging.getLogger("kestrel.api.streams")
MAX_SUBSCRIPTIONS: Final = 16
#: A refused connection's close code: 4000 + the HTTP status it would have had (1013: try again later).
CLOSE_CODES: Final = {401: 4401, 403: 4403, 429: 4429, 503: 1013}
MAX_MESSAGE: Final = 64 * 1024
_encode = msgspec.json.Encoder()


class Connection:
    def __init__(self, socket: WebSocket[Any, Any, Any], principal: Principal) -> None:
        self.socket = socket
        self.principal = principal
        self.pumps: dict[str, asyncio.Task[None]] = {}
        self.acked: dict[str, str] = {}
        self.send_lock = asyncio.Lock()
        self.ended = asyncio.Event()

    async def send(self, message: dict[str, Any]) -> None:
        async with self.send_lock:
            await self.socket.send_data(_encode.encode(message).decode())

    async def problem(self, exc: KestrelError, sub_id: str | None = None) -> None:
        status, kind = status_and_kind(exc)
        problem = {"type": problem_type(kind), "status": status, "detail": exc.detail}
        await self.send({"type": "error", **({"id": sub_id} if sub_id else {}), "problem": problem})

    async def subscribe(self, message: dict[str, Any]) -> None:
        sub_id = str(message.get("id", ""))[:64]
        if not sub_id or sub_id in self.pumps:
            raise _Refusal("a subscription needs an id of its own", sub_id)
        if len(self.pumps) >= MAX_SUBSCRIPTIONS:
            raise _Refusal(f"at most {MAX_SUBSCRIPTIONS} subscriptions per connection", sub_id)
        try:
            wanted = parse_filter(message.get("filter"))
            cursor = parse_cursor(message["cursor"]) if message.get("cursor") else None
            subscriber = await subscribe(hub_of(self.socket), pool_of(self.socket), self.principal, wanted)
        except KestrelError as exc:
            await self.problem(exc, sub_id)
            return
        # joined before "subscribed" is said: whatever is published after the client reads it reaches it
        hub = hub_of(self.socket)
        live_start = await hub.join(subscriber)
        pump = asyncio.create_task(self.pump(sub_id, subscriber, cursor, live_start))
        pump.add_done_callback(lambda _: hub.leave(subscriber))  # also when cancelled before it ran at all
        self.pumps[sub_id] = pump
        await self.send({"type": "subscribed", "id": sub_id, "cursor": str(live_start)})

    async def pump(self, sub_id: str, subscriber: Any, cursor: Any, live_start: Any) -> None:
        hub = hub_of(self.socket)
        try:
            async for out in events(hub, pool_of(self.socket), self.principal, subscriber, cursor,
                                    max_s=self.socket.app.state.stream_max_s, joined=live_start):  # fmt: skip
                if isinstance(out, LiveEvent):
                    await self.send({"type": "event", "id": sub_id, "event": out})
                elif isinstance(out, Heartbeat):
                    await self.send({"type": "heartbeat", "id": sub_id, "cursor": str(out.cursor)})
                elif isinstance(out, Gap):
                    await self.send({"type": "gap", "id": sub_id, "stream": out.family})
                elif isinstance(out, Lagged):
                    await self.send({"type": "lagged", "id": sub_id, "cursor": str(out.cursor),
                                     "acked": self.acked.get(sub_id)})  # fmt: skip
                    return
                elif isinstance(out, End):
                    await self.send({"type": "end", "reason": out.reason})
                    self.ended.set()
                    return
        except (WebSocketDisconnect, OSError, RuntimeError):
            self.ended.set()
        finally:
            self.pumps.pop(sub_id, None)

    async def handle(self, raw: str | bytes) -> None:
        if len(raw) > MAX_MESSAGE:
            raise _Refusal(f"a message is at most {MAX_MESSAGE} bytes")
        try:
            message = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise _Refusal("a message is a JSON object") from exc
        if not isinstance(message, dict):
            raise _Refusal("a message is a JSON object")
        kind = message.get("type")
        if kind == "subscribe":
            await self.subscribe(message)
        elif kind == "unsubscribe":
            task = self.pumps.pop(str(message.get("id", "")), None)
            if task is not None:
                task.cancel()
        elif kind == "ack":
            self.acked[str(message.get("id", ""))[:64]] = str(message.get("cursor", ""))[:80]
        elif kind == "ping":
            await self.send({"type": "pong"})
        else:
            raise _Refusal("type is one of subscribe, unsubscribe, ack, ping")

    async def read(self) -> None:
        while True:
            raw = await self.socket.receive_data(mode="text")
            try:
                await self.handle(raw)
            except _Refusal as refusal:
                await self.send({"type": "error", **({"id": refusal.sub_id} if refusal.sub_id else {}),
                                 "problem": {"type": "urn:kestrel:problem:invalid_input.bad_message", "status": 400,
                                             "detail": str(refusal)}})  # fmt: skip


class _Refusal(Exception):
    def __init__(self, detail: str, sub_id: str | None = None) -> None:
        super().__init__(detail)
        self.sub_id = sub_id


@websocket("/ws")
async def ws(socket: WebSocket[Any, Any, Any]) -> None:
    """Authenticated by ``?ticket=`` (browsers) or the ``Authorization`` header before the socket is accepted."""
    try:
        principal = await stream_principal(socket, socket.query_params.get("ticket"))
        hub_of(socket)
    except KestrelError as exc:
        status, _ = status_and_kind(exc)
        await socket.close(code=CLOSE_CODES.get(status, 1011), reason=exc.detail[:120])
        return
    await socket.accept()
    connection = Connection(socket, principal)
    reader = asyncio.create_task(connection.read())
    ender = asyncio.create_task(connection.ended.wait())
    try:
        await asyncio.wait({reader, ender}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (reader, ender, *connection.pumps.values()):
            task.cancel()
        with contextlib.suppress(Exception):
            await socket.close(code=4401 if connection.ended.is_set() else 1000)
