"""Real stream clients for the tests (issue 14): an SSE reader over httpx, a WebSocket client (``websockets``) and a
GraphQL subscription over graphql-transport-ws; each collects what it receives on its own thread-free asyncio task."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import websockets
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri


@dataclass
class Sse:
    """What one SSE connection received: (event, id, data) in order; ``status`` of the response."""

    received: list[tuple[str, str, Any]] = field(default_factory=list)
    status: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def events(self, kind: str | None = None) -> list[tuple[str, str, Any]]:
        return [r for r in self.received if kind is None or r[0] == kind]


async def read_sse(response: httpx.Response, into: Sse) -> None:
    event, ident, data = "message", "", []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                into.received.append((event, ident, json.loads("\n".join(data))))
                into.arrived.set()
            event, ident, data = "message", "", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "id":
                ident = value
            elif name == "data":
                data.append(value)


@contextlib.asynccontextmanager
async def sse(url: str, headers: dict[str, str] | None = None, **params: str) -> AsyncIterator[Sse]:
    """An open SSE stream collecting in the background; closed on exit."""
    into = Sse()
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client,
        client.stream("GET", url, headers=headers or {}, params=params) as response,
    ):
        into.status = response.status_code
        if response.status_code != 200:
            await response.aread()
            into.received.append(("problem", "", response.json()))
            yield into
            return
        task = asyncio.create_task(read_sse(response, into))
        try:
            yield into
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def wait_for(predicate: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return bool(predicate())


@dataclass
class Ws:
    socket: Any
    received: list[dict[str, Any]] = field(default_factory=list)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.received if m.get("type") == kind]

    async def send(self, message: dict[str, Any]) -> None:
        await self.socket.send(json.dumps(message))


@contextlib.asynccontextmanager
async def collecting(socket: Any) -> AsyncIterator[Ws]:
    """Every message the socket receives, collected in the background until the block ends."""
    client = Ws(socket)

    async def read() -> None:
        async for raw in socket:
            client.received.append(json.loads(raw))

    task = asyncio.create_task(read())
    try:
        yield client
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


@contextlib.asynccontextmanager
async def ws(url: str, headers: dict[str, str] | None = None, origin: str | None = None) -> AsyncIterator[Ws]:
    connecting = websockets.connect(url, additional_headers=headers or {}, origin=origin, max_size=2**22)  # type: ignore[arg-type]
    async with connecting as socket, collecting(socket) as client:
        yield client


class StalledWs:
    """A WebSocket client on a plain socket with a small receive buffer that reads only when told to (sans-I/O
    protocol of ``websockets``): a client that stops reading, for certain."""

    def __init__(self, url: str, headers: dict[str, str], rcvbuf: int = 16 * 1024) -> None:
        uri = parse_uri(url)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect((uri.host, uri.port))
        self.protocol = ClientProtocol(uri, max_size=2**24)
        request = self.protocol.connect()
        request.headers.update(headers)
        self.protocol.send_request(request)
        self._flush()
        self.pending: list[dict[str, Any]] = []
        while self.protocol.handshake_exc is None and self.protocol.state.name == "CONNECTING":
            self._read()
        if self.protocol.handshake_exc is not None:
            raise self.protocol.handshake_exc

    def _flush(self) -> None:
        for chunk in self.protocol.data_to_send():
            self.sock.sendall(chunk)

    def _read(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("closed")
        self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if isinstance(event, Frame) and event.opcode == Opcode.TEXT:
                self.pending.append(json.loads(event.data))
        self._flush()

    def send(self, message: dict[str, Any]) -> None:
        self.protocol.send_text(json.dumps(message).encode())
        self._flush()

    def recv(self, timeout: float = 20.0) -> dict[str, Any]:
        self.sock.settimeout(timeout)
        while not self.pending:
            self._read()
        return self.pending.pop(0)

    def close(self) -> None:
        self.sock.close()


@contextlib.asynccontextmanager
async def graphql_subscription(
    url: str, init: dict[str, Any], query: str, variables: dict[str, Any] | None = None
) -> AsyncIterator[Ws]:
    """A graphql-transport-ws connection: ``connection_init`` with ``init``, then one subscription ``query`` (id
    "1"); ``received`` collects every server message (``next``, ``error``, ``complete``)."""
    async with websockets.connect(url, subprotocols=["graphql-transport-ws"]) as socket:  # type: ignore[list-item]
        await socket.send(json.dumps({"type": "connection_init", "payload": init}))
        try:
            ack = json.loads(await asyncio.wait_for(socket.recv(), 10))
        except websockets.ConnectionClosed as closed:
            raise ConnectionError(f"refused: {closed}") from closed
        if ack.get("type") != "connection_ack":
            raise ConnectionError(f"refused: {ack}")
        await socket.send(json.dumps({"id": "1", "type": "subscribe",
                                      "payload": {"query": query, "variables": variables or {}}}))  # fmt: skip
        async with collecting(socket) as client:
            yield client
