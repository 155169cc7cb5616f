"""Real stream clients for the tests (issue 14): an SSE reader over httpx, a WebSocket client (``websockets``) and a
GraphQL subscription over graphql-transport-ws; each collects what it receives on its own thread-free asyncio task."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import websockets


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
async def ws(url: str, headers: dict[str, str] | None = None, origin: str | None = None) -> AsyncIterator[Ws]:
    async with websockets.connect(url, additional_headers=headers or {}, origin=origin, max_size=2**22) as socket:  # type: ignore[arg-type]
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
