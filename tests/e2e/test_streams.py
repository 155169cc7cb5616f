"""Real-time streams end to end (issue 14): devices publish over mTLS through our Mosquitto plugin, the bridge puts the
readings on JetStream, devicesvc its twin events; the API (a real process) fans them out to real SSE, WebSocket and
GraphQL clients. Every "never receives" has a later event that must arrive first (the positive control)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from api.streams.hub import QUEUE_BYTES
from kestrel.devtools.servers import PostgresServer
from kestrel.store import credentials
from kestrel.store.session import operator, run_blocking
from tests.conftest import tenant_token
from tests.e2e.test_rules import publish, reading
from tests.prodstack import ProdStack, stack_with_api
from tests.streamclients import StalledWs, graphql_subscription, sse, wait_for, ws

pytestmark = pytest.mark.e2e
V1 = "/api/v1"


@pytest.fixture(scope="module")
def stack(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProdStack]:
    with stack_with_api(postgres, tmp_path_factory.mktemp("streams")) as s:
        yield s


def base(s: ProdStack) -> str:
    return f"http://127.0.0.1:{s.ports['api']}{V1}"


def readings_of(received: list[tuple[str, str, Any]], device: str) -> list[float]:
    return [r["metrics"]["temp"] for kind, _, e in received if kind == "telemetry" and e["device"] == device
            for r in e["data"]["readings"] if "temp" in r["metrics"]]  # fmt: skip


SUBSCRIPTION = "subscription($kinds: [String!]) { events(kinds: $kinds) { kind device cursor data } }"


def test_sse_websocket_and_graphql_clients_receive_a_reading_published_over_mtls(stack: ProdStack) -> None:
    """Three kinds of client at once; the device's connection (presence, from devicesvc) comes before its reading."""
    s = stack
    tenant, (device,) = s.tenant(1, prefix="live")
    auth = tenant_token(s.url, tenant)
    api = f"ws://127.0.0.1:{s.ports['api']}{V1}"

    async def run() -> None:
        async with sse(f"{base(s)}/stream", auth, kinds="telemetry,presence") as events, \
                ws(f"{api}/ws", auth) as socket, \
                graphql_subscription(f"{api}/graphql", {"authorization": auth["Authorization"]}, SUBSCRIPTION,
                                     {"kinds": ["telemetry"]}) as gql:  # fmt: skip
            assert events.status == 200, events.received
            await socket.send({"type": "subscribe", "id": "s1", "filter": {"kinds": ["telemetry"]}})
            assert await wait_for(lambda: socket.of("subscribed") and events.events("heartbeat"))
            await asyncio.sleep(0.5)  # the GraphQL subscription has no "subscribed" message: let it join its feed
            await publish(s, tenant, device, [reading(int(time.time() * 1000), 1, temp=21.5)])
            assert await wait_for(lambda: readings_of(events.received, device) == [21.5])
            assert await wait_for(lambda: len(socket.of("event")) == 1)
            (message,) = socket.of("event")
            assert message["id"] == "s1" and message["event"]["device"] == device
            assert message["event"]["data"]["readings"][0]["metrics"] == {"temp": 21.5}
            assert await wait_for(lambda: len(gql.of("next")) == 1)
            event = gql.of("next")[0]["payload"]["data"]["events"]
            assert event["kind"] == "telemetry" and event["data"]["readings"][0]["metrics"] == {"temp": 21.5}
            # the connection's presence comes through devicesvc, another pipeline: it may follow the reading
            assert await wait_for(lambda: any(kind == "presence" for kind, _, _ in events.received))
            presence = [e for kind, _, e in events.received if kind == "presence"]
            assert presence[0]["data"]["event"] == "connected" and presence[0]["device"] == device
            # three clients of one tenant, one feed in the process (three JetStream consumers), not one per client
            assert await asyncio.to_thread(s_metric, s, "kestrel_api_stream_feeds") == 1
            assert await asyncio.to_thread(s_metric, s, "kestrel_api_stream_clients") == 3
        with pytest.raises(ConnectionError, match=r"refused: .*4403"):
            async with graphql_subscription(f"{api}/graphql", {"authorization": "Bearer kst_nope"}, SUBSCRIPTION):
                pass

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
        # a kind the token's scopes do not cover is refused, naming the scope
        narrow = tenant_token(s.url, tenant, "telemetry:read")
        async with sse(f"{base(s)}/stream", narrow, kinds="telemetry,alarm") as refused:
            assert refused.status == 403 and "alarms:read" in json.dumps(refused.received)
        fresh = (await asyncio.to_thread(httpx.post, f"{base(s)}/stream/tickets", headers=auth)).json()["ticket"]
        async with sse(f"{base(s)}/stream", {"Origin": "https://evil.example"}, ticket=fresh) as foreign:
            assert foreign.status == 403, foreign.received
            assert "origin" in json.dumps(foreign.received)

    asyncio.run(run())


def _fleet(s: ProdStack, prefix: str) -> tuple[str, str, dict[str, str]]:
    """A tenant with one device in group ``plant`` tagged ``site:1``: the same names in every tenant."""
    tenant, (device,) = s.tenant(1, prefix=prefix)
    auth = tenant_token(s.url, tenant)
    assert httpx.post(f"{base(s)}/groups", headers=auth, json={"group_id": "plant"}).status_code == 201
    assert httpx.put(f"{base(s)}/groups/plant/devices/{device}", headers=auth).status_code in (200, 201, 204)
    assert httpx.patch(f"{base(s)}/devices/{device}", headers=auth, json={"tags": ["site:1"]}).status_code == 200
    return tenant, device, auth


def test_a_client_never_receives_another_tenants_events_whatever_filter_it_asks_for(stack: ProdStack) -> None:
    """Tenant B has the same group and tag names as A. Each of A's hostile filters also selects A's own device: B's
    device publishes first, A's after it (the control), and only A's reaches the client."""
    s = stack
    mine, my_device, auth = _fleet(s, "iso-a")
    theirs, their_device, _ = _fleet(s, "iso-b")
    hostile: list[dict[str, str]] = [
        {},  # everything A may see
        {"devices": f"{their_device},{my_device}"},
        {"groups": "plant"},
        {"tags": "site:1"},
        {"kinds": "telemetry,presence,shadow,command,lifecycle,alarm", "metrics": "temp"},
        {"cursor": "t0.e0.a0"},  # replay of the streams from their start
    ]
    refused = [{"devices": "*"}, {"devices": ">"}, {"devices": f"{theirs}.d.{their_device}"}, {"kinds": "secrets"},
               {"cursor": "t1.e1"}, {"tags": "a b"}]  # fmt: skip

    async def run() -> None:
        for params in refused:
            async with sse(f"{base(s)}/stream", auth, **params) as bad:
                assert bad.status == 400, (params, bad.received)
        stamp = int(time.time() * 1000)
        async with contextlib.AsyncExitStack() as opened:
            clients = [await opened.enter_async_context(sse(f"{base(s)}/stream", auth, **p)) for p in hostile]
            assert await wait_for(lambda: all(c.events("heartbeat") for c in clients))
            await publish(s, theirs, their_device, [reading(stamp, 1, temp=66.0)])
            await publish(s, mine, my_device, [reading(stamp, 1, temp=21.0)])
            for params, client in zip(hostile, clients, strict=True):
                assert await wait_for(lambda c=client: 21.0 in readings_of(c.received, my_device)), params  # type: ignore[misc]
                assert {e["device"] for _, _, e in client.received if "device" in e} <= {my_device}, params
                assert their_device not in json.dumps(client.received) and theirs not in json.dumps(client.received)

    asyncio.run(run())


def test_a_revoked_or_expired_token_ends_the_stream(stack: ProdStack) -> None:
    s = stack
    tenant, _ = s.tenant(0, prefix="rv")
    admin = tenant_token(s.url, tenant)
    created = httpx.post(f"{base(s)}/tokens", headers=admin, json={"scopes": ["telemetry:read"], "name": "viewer"})
    token = created.json()
    _, short = run_blocking(s.url, lambda c: credentials.create_token(
        c, operator(), tenant, ["telemetry:read"], expires_at=datetime.now(UTC) + timedelta(seconds=4), name="short"),
        tenant=tenant)  # fmt: skip

    async def run() -> None:
        async with sse(f"{base(s)}/stream", {"Authorization": f"Bearer {token['token']}"}) as revoked, \
                sse(f"{base(s)}/stream", {"Authorization": f"Bearer {short}"}) as expiring, \
                sse(f"{base(s)}/stream", admin) as control:  # fmt: skip
            assert await wait_for(lambda: revoked.events("heartbeat") and expiring.events("heartbeat"))
            revoke = await asyncio.to_thread(httpx.delete, f"{base(s)}/tokens/{token['token_id']}", headers=admin)
            assert revoke.status_code == 204
            assert await wait_for(lambda: revoked.events("end"), 15)
            assert await wait_for(lambda: expiring.events("end"), 15)
            assert revoked.events("end")[0][2] == {"reason": "token_expired_or_revoked"}
            assert not control.events("end")  # the admin's own stream goes on
        async with sse(f"{base(s)}/stream", {"Authorization": f"Bearer {token['token']}"}) as again:
            assert again.status == 401

    asyncio.run(run())


def test_a_client_that_stops_reading_is_bounded_told_where_it_stopped_and_never_slows_another(
    stack: ProdStack,
) -> None:
    """A WebSocket client stops reading (a small receive buffer, no reads) while a device sends 24 MB of readings;
    the API's queued bytes stay within one client's bound (1 MiB), a second client receives every reading with a
    latency measured against the device's clock, and the slow one, reading again, is told it lagged with a cursor
    from which a new subscription gets the rest: every reading exactly once between the two."""
    s = stack
    tenant, (device,) = s.tenant(1, prefix="slow")
    auth = tenant_token(s.url, tenant)
    count, pad = 600, "x" * 250
    bulky = {f"m{i:03d}": pad for i in range(150)}  # ~40 KB a reading
    url = f"ws://127.0.0.1:{s.ports['api']}{V1}/ws"

    async def run() -> None:
        slow = StalledWs(url, auth)
        try:
            await stall_and_catch_up(slow)
        finally:
            slow.close()

    async def stall_and_catch_up(slow: StalledWs) -> None:
        async with sse(f"{base(s)}/stream", auth, kinds="telemetry", metrics="seq_no,sent") as fast:
            slow.send({"type": "subscribe", "id": "slow", "filter": {"kinds": ["telemetry"]}})
            assert slow.recv()["type"] == "subscribed"
            assert await wait_for(lambda: fast.events("heartbeat"))
            peak = 0.0
            sender = asyncio.create_task(publish(s, tenant, device, [
                reading(int(time.time() * 1000), i, seq_no=i, sent=time.time(), **bulky) for i in range(count)]))  # fmt: skip
            latencies: list[float] = []
            seen = 0
            while not sender.done() or seen < count:
                peak = max(peak, await asyncio.to_thread(s_metric, s, "kestrel_api_stream_queued_bytes"))
                fresh = [e for _, _, e in fast.events("telemetry")][seen:]
                now = time.time()
                latencies += [now - r["metrics"]["sent"] for e in fresh for r in e["data"]["readings"]]
                seen += len(fresh)
                await asyncio.sleep(0.05)
                if sender.done() and sender.exception():
                    raise sender.exception()  # type: ignore[misc]
            got = [r["metrics"]["seq_no"] for _, _, e in fast.events("telemetry") for r in e["data"]["readings"]]
            assert got == list(range(count))  # the other client missed nothing, in order
            latencies.sort()
            print(f"\nfast client latency p50 {latencies[len(latencies) // 2]:.3f} s, max {latencies[-1]:.3f} s;"
                  f" queued peak {peak / 1024:.0f} KiB")  # fmt: skip
            assert latencies[-1] < 5.0  # generous: the publishes themselves take seconds; a blocked fan-out never ends
            assert peak <= 2 * QUEUE_BYTES  # two clients, each within its bound, whatever the slow one was sent
        # the slow client reads again: what reached it, then where it stopped
        first: list[int] = []
        while (message := await asyncio.to_thread(slow.recv))["type"] != "lagged":
            if message["type"] == "event":
                first += [r["seq"] for r in message["event"]["data"]["readings"]]
        assert 0 < len(first) < count
        slow.send({"type": "subscribe", "id": "again", "filter": {"kinds": ["telemetry"]}, "cursor": message["cursor"]})
        rest: list[int] = []
        while len(first) + len(rest) < count:
            message = await asyncio.to_thread(slow.recv)
            if message["type"] == "event" and message["id"] == "again":
                rest += [r["seq"] for r in message["event"]["data"]["readings"]]
        assert first + rest == list(range(count)), (len(first), first[-3:], rest[:3], len(rest))

    asyncio.run(run())


def s_metric(s: ProdStack, family: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{s.ports['api']}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(family + " "))


def test_a_graphql_subscription_resumes_from_its_cursor(stack: ProdStack) -> None:
    """The cursor of the last event a GraphQL subscription received resumes a new subscription with exactly what
    was published in between, then live events."""
    s = stack
    tenant, (device,) = s.tenant(1, prefix="gqlr")
    auth = tenant_token(s.url, tenant)
    api = f"ws://127.0.0.1:{s.ports['api']}{V1}/graphql"
    query = 'subscription($c: String) { events(kinds: ["telemetry"], cursor: $c) { cursor data } }'
    now = int(time.time() * 1000)

    def temps(client: Any) -> list[float]:
        return [
            r["metrics"]["temp"] for m in client.of("next") for r in m["payload"]["data"]["events"]["data"]["readings"]
        ]

    async def run() -> None:
        init = {"authorization": auth["Authorization"]}
        async with graphql_subscription(api, init, query) as first:
            await asyncio.sleep(0.5)  # no "subscribed" message in graphql-transport-ws: let it join its feed
            await publish(s, tenant, device, [reading(now, 1, temp=1.0)])
            assert await wait_for(lambda: temps(first) == [1.0])
            cursor = first.of("next")[-1]["payload"]["data"]["events"]["cursor"]
        await publish(s, tenant, device, [reading(now + 1, 2, temp=2.0), reading(now + 2, 3, temp=3.0)])
        async with graphql_subscription(api, init, query, {"c": cursor}) as second:
            assert await wait_for(lambda: temps(second) == [2.0, 3.0])
            await publish(s, tenant, device, [reading(now + 3, 4, temp=4.0)])  # and live after the replay
            assert await wait_for(lambda: temps(second) == [2.0, 3.0, 4.0])

    asyncio.run(run())


def test_a_tenant_cannot_open_more_streams_than_its_share_of_a_process(stack: ProdStack) -> None:
    """With two streams per tenant allowed, a tenant's third is 429 while another tenant still opens its own; closing
    one makes room again. (The API restarts with the limit, then without it.)"""
    s = stack
    s.extra_env["api"] = {"KESTREL_API_STREAM_MAX_PER_TENANT": "2"}
    s.stop("api")
    s.start("api")
    try:
        busy, _ = s.tenant(0, prefix="cap")
        other, _ = s.tenant(0, prefix="capb")
        auth, other_auth = tenant_token(s.url, busy), tenant_token(s.url, other)

        async def run() -> None:
            async with sse(f"{base(s)}/stream", auth) as one, sse(f"{base(s)}/stream", auth) as two:
                assert await wait_for(lambda: one.events("heartbeat") and two.events("heartbeat"))
                async with sse(f"{base(s)}/stream", auth) as third:
                    assert third.status == 429, third.received
                async with sse(f"{base(s)}/stream", other_auth) as theirs:  # the control: another tenant is served
                    assert theirs.status == 200
            # both closed: their subscriptions have left the feed
            assert await wait_for(lambda: s_metric(s, "kestrel_api_stream_clients") == 0)
            async with sse(f"{base(s)}/stream", auth) as again:
                assert again.status == 200

        asyncio.run(run())
    finally:
        s.extra_env.pop("api")
        s.stop("api")
        s.start("api")
