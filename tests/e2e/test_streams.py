"""Real-time streams end to end (issue 14): devices publish over mTLS through our Mosquitto plugin, the bridge puts the
readings on JetStream, devicesvc its twin events; the API (a real process) fans them out to real SSE, WebSocket and
GraphQL clients. Every "never receives" has a later event that must arrive first (the positive control)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from kestrel.devtools.servers import PostgresServer
from tests.conftest import _nats, tenant_token
from tests.e2e.test_rules import publish, reading
from tests.prodstack import ProdStack, prod_stack
from tests.streamclients import sse, wait_for, ws

pytestmark = pytest.mark.e2e
V1 = "/api/v1"


@pytest.fixture(scope="module")
def stack(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProdStack]:
    root = tmp_path_factory.mktemp("streams")
    nats_server = _nats(root / "nats")
    nats_server.start()
    try:
        with prod_stack(postgres, nats_server, root, services=("authsvc", "bridge", "writer", "devicesvc", "api")) as s:
            yield s
    finally:
        nats_server.stop()


def base(s: ProdStack) -> str:
    return f"http://127.0.0.1:{s.ports['api']}{V1}"


def readings_of(received: list[tuple[str, str, Any]], device: str) -> list[float]:
    return [r["metrics"]["temp"] for kind, _, e in received if kind == "telemetry" and e["device"] == device
            for r in e["data"]["readings"] if "temp" in r["metrics"]]  # fmt: skip


def test_an_sse_and_a_websocket_client_receive_a_reading_published_over_mtls(stack: ProdStack) -> None:
    s = stack
    tenant, (device,) = s.tenant(1, prefix="live")
    auth = tenant_token(s.url, tenant)

    async def run() -> None:
        async with sse(f"{base(s)}/stream", auth, kinds="telemetry") as events, \
                ws(f"ws://127.0.0.1:{s.ports['api']}{V1}/ws", auth) as socket:  # fmt: skip
            assert events.status == 200, events.received
            await socket.send({"type": "subscribe", "id": "s1", "filter": {"kinds": ["telemetry"]}})
            assert await wait_for(lambda: socket.of("subscribed") and events.events("heartbeat"))
            await publish(s, tenant, device, [reading(int(time.time() * 1000), 1, temp=21.5)])
            assert await wait_for(lambda: readings_of(events.received, device) == [21.5])
            assert await wait_for(lambda: len(socket.of("event")) == 1)
            (message,) = socket.of("event")
            assert message["id"] == "s1" and message["event"]["device"] == device
            assert message["event"]["data"]["readings"][0]["metrics"] == {"temp": 21.5}

    asyncio.run(run())


def test_resume_with_last_event_id_returns_exactly_the_missed_events(stack: ProdStack) -> None:
    s = stack
    tenant, (device,) = s.tenant(1, prefix="resume")
    auth = tenant_token(s.url, tenant)
    now = int(time.time() * 1000)

    async def run() -> None:
        async with sse(f"{base(s)}/stream", auth, kinds="telemetry") as first:
            await wait_for(lambda: first.events("heartbeat"))
            await publish(s, tenant, device, [reading(now + i, i, temp=float(i)) for i in range(3)])
            assert await wait_for(lambda: len(readings_of(first.received, device)) == 3)
            cursor = first.events("telemetry")[-1][1]
        # disconnected: five more readings happen
        await publish(s, tenant, device, [reading(now + i, i, temp=float(i)) for i in range(3, 8)])
        async with sse(f"{base(s)}/stream", auth | {"Last-Event-ID": cursor}, kinds="telemetry") as second:
            # the control: a reading published after the reconnect arrives after the missed ones
            await wait_for(lambda: second.events("heartbeat"))
            await publish(s, tenant, device, [reading(now + 8, 8, temp=8.0)])
            assert await wait_for(lambda: 8.0 in readings_of(second.received, device))
            assert readings_of(second.received, device) == [3.0, 4.0, 5.0, 6.0, 7.0, 8.0]

    asyncio.run(run())


def test_a_ticket_opens_one_stream_once_and_a_foreign_origin_is_refused(stack: ProdStack) -> None:
    s = stack
    tenant, _ = s.tenant(0, prefix="tk")
    auth = tenant_token(s.url, tenant)
    ticket = httpx.post(f"{base(s)}/stream/tickets", headers=auth).json()["ticket"]

    async def run() -> None:
        async with sse(f"{base(s)}/stream", ticket=ticket) as first:
            assert first.status == 200
            assert await wait_for(lambda: first.events("heartbeat"))
        async with sse(f"{base(s)}/stream", ticket=ticket) as again:
            assert again.status == 401, again.received
        fresh = httpx.post(f"{base(s)}/stream/tickets", headers=auth).json()["ticket"]
        async with sse(f"{base(s)}/stream", {"Origin": "https://evil.example"}, ticket=fresh) as foreign:
            assert foreign.status == 403, foreign.received
            assert "origin" in json.dumps(foreign.received)

    asyncio.run(run())
