"""Real-time stream benchmarks (not tests), each against a ceiling measured in the same run (issue 14):

1. Publish -> received latency (p50/p99) with 1, 100 and 1,000 concurrent WebSocket clients on one API process, while
   readings are published to JetStream at a fixed rate, against a plain NATS subscriber's latency of the same
   messages (the ceiling: what NATS itself takes).
2. Fan-out: events/s the API process delivers to N clients for a burst, against the events/s NATS itself delivers
   to N plain subscriptions of the same burst (ratio).
3. Memory per idle WebSocket subscription: the API process's resident memory before and after opening them.

Clients and the API share this machine's cores: the client side (decoding every event in Python) is part of what is
measured, so the ratios are conservative.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import websockets
from scale import pick, servers

from ingest.jetstream import ensure_streams as ensure_telemetry
from kestrel.devtools import seed
from kestrel.devtools.servers import free_port
from kestrel.store.migrate import migrate
from kestrel_core.messages.telemetry import Point, TelemetryEnvelope
from kestrel_core.tokens import SCOPES

TENANT = "bench"
CLIENTS = pick((1, 100, 1000), (1, 10))
RATE = pick(20, 10)  # msg/s during the latency runs
LATENCY_S = pick(5.0, 1.0)
BURST = pick(2000, 50)
BURST_EVENTS = pick(100_000, 500)  # a burst is at most this many deliveries in all (the clients are Python too)
IDLE = pick(1000, 20)
_json = msgspec.json.Encoder()


def envelope(seq: int) -> bytes:
    now = time.time()
    metrics = msgspec.Raw(_json.encode({"temp": 20.0 + seq % 10, "sent": now}))
    point = Point(int(now * 1_000_000), seq, metrics)
    return _json.encode(TelemetryEnvelope(tenant=TENANT, device=f"d{seq % 10}", received_us=int(now * 1e6),
                                          identity="device", points=[point]))  # fmt: skip


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000 if ordered else float("nan")


class Clients:
    """N WebSocket clients subscribed to the tenant's telemetry; every event's latency and arrival time."""

    def __init__(self, url: str, token: str, count: int) -> None:
        self.url, self.token, self.count = url, token, count
        self.sockets: list[Any] = []
        self.latencies: list[float] = []
        self.arrivals: list[float] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def open(self) -> None:
        async def one() -> Any:
            socket = await websockets.connect(self.url, additional_headers={"Authorization": f"Bearer {self.token}"},
                                              max_queue=None)  # fmt: skip
            await socket.send(json.dumps({"type": "subscribe", "id": "s", "filter": {"kinds": ["telemetry"]}}))
            while json.loads(await socket.recv())["type"] != "subscribed":
                pass
            return socket

        for start in range(0, self.count, 100):
            self.sockets += await asyncio.gather(*(one() for _ in range(min(100, self.count - start))))
        self.tasks = [asyncio.create_task(self.read(s)) for s in self.sockets]

    async def read(self, socket: Any) -> None:
        async for raw in socket:
            message = json.loads(raw)
            if message["type"] == "event":
                now = time.time()
                self.arrivals.append(now)
                self.latencies += [now - r["metrics"]["sent"] for r in message["event"]["data"]["readings"]]

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*(s.close() for s in self.sockets), return_exceptions=True)


class Raw:
    """The ceiling: a plain NATS subscriber on the same subjects."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.arrivals: list[float] = []

    async def on(self, msg: Any) -> None:
        now = time.time()
        self.arrivals.append(now)
        for point in msgspec.json.decode(msg.data, type=TelemetryEnvelope).points:
            self.latencies.append(now - msgspec.json.decode(point.metrics)["sent"])


async def publish(nc: Any, count: int, rate: float | None, prefix: str = "v1") -> None:
    """Into the stream: acknowledged one by one at ``rate``, or as fast as NATS takes them (no rate); ``prefix``
    other than ``v1``: plain NATS subjects no stream keeps (the ceiling's burst, which the API never sees)."""
    js = nc.jetstream()
    for seq in range(count):
        subject = f"{prefix}.{TENANT}.d.d{seq % 10}.telemetry"
        if rate:
            await js.publish(subject, envelope(seq))
            await asyncio.sleep(1 / rate)
        else:
            await nc.publish(subject, envelope(seq))
    await nc.flush()


async def raw_fanout(nc: Any, subscribers: int, burst: int) -> float:
    """Events/s NATS delivers to ``subscribers`` plain subscriptions of a burst."""
    arrivals: list[float] = []

    async def on(_: Any) -> None:
        arrivals.append(time.time())

    subs = [await nc.subscribe(f"raw.{TENANT}.d.*.telemetry", cb=on) for _ in range(subscribers)]
    started = time.time()
    await publish(nc, burst, None, prefix="raw")
    await settle(lambda: arrivals, burst * subscribers, wait_s=120)
    for sub in subs:
        await sub.unsubscribe()
    return len(arrivals) / max(1e-6, max(arrivals, default=started) - started)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def settle(counter: Any, expected: int, wait_s: float = 30.0) -> None:
    deadline = time.monotonic() + wait_s
    while len(counter()) < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def run(nats_url: str, api_port: int, token: str, api_pid: int) -> None:
    nc = await nats.connect(nats_url)
    url = f"ws://127.0.0.1:{api_port}/api/v1/ws"
    print(f"streams: one API process, WebSocket clients on the same machine; {RATE} msg/s for {LATENCY_S:g} s")
    for count in CLIENTS:
        raw = Raw()
        sub = await nc.subscribe(f"v1.{TENANT}.d.*.telemetry", cb=raw.on)
        clients = Clients(url, token, count)
        await clients.open()
        messages = int(RATE * LATENCY_S)
        await publish(nc, messages, RATE)
        await settle(lambda c=clients: c.latencies, messages * count)
        if len(clients.latencies) != messages * count:  # a client told "subscribed" must get everything after
            raise SystemExit(f"lost events: {len(clients.latencies)} of {messages * count} reached the clients")
        print(f"  {count:>5} clients: latency p50 {pct(clients.latencies, 0.5):.1f} ms p99 "
              f"{pct(clients.latencies, 0.99):.1f} ms ({len(clients.latencies)}/{messages * count} events); raw NATS "
              f"p50 {pct(raw.latencies, 0.5):.1f} ms p99 {pct(raw.latencies, 0.99):.1f} ms;"
              f" ratio to the raw NATS p50: {pct(clients.latencies, 0.5) / max(pct(raw.latencies, 0.5), 1e-3):.2f}"
              )  # fmt: skip
        await sub.unsubscribe()
        burst = min(BURST, max(20, BURST_EVENTS // count))
        ceiling = await raw_fanout(nc, count, burst)
        clients.arrivals.clear()
        started = time.time()
        await publish(nc, burst, None)
        await settle(lambda c=clients: c.arrivals, burst * count, wait_s=120)
        fanout = len(clients.arrivals) / max(1e-6, max(clients.arrivals, default=started) - started)
        print(f"         burst of {burst}: the API delivered {fanout:,.0f} events/s ({len(clients.arrivals)} events),"
              f" NATS to {count} plain subscriptions {ceiling:,.0f}/s; ratio to the raw NATS subscribe rate:"
              f" {fanout / ceiling:.2f}")  # fmt: skip
        await clients.close()
    before = rss_kib(api_pid)
    idle = Clients(url, token, IDLE)
    await idle.open()
    await asyncio.sleep(1)
    after = rss_kib(api_pid)
    per = (after - before) / IDLE
    print(f"  idle: {IDLE} subscriptions raised the API's RSS by {after - before} KiB: {per:.1f} KiB each;"
          f" ratio to the per-client queue bound (1 MiB): {max(per, 0.01) / 1024:.4f}")  # fmt: skip
    await idle.close()
    await nc.close()


def main() -> None:
    with servers("kestrel-streamsbench-") as (root, pg, nats_server):
        migrate(pg.url)
        seed.create_tenant(pg.url, TENANT)
        seed.create_devices(pg.url, TENANT, [f"d{i}" for i in range(10)])
        _, token = seed.create_api_token(pg.url, TENANT, list(SCOPES), name="bench")

        async def streams() -> None:
            nc = await nats.connect(nats_server.url)
            await ensure_telemetry(nc)
            await nc.close()

        asyncio.run(streams())
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("KESTREL_")} | {
            "KESTREL_API_DATABASE_URL": pg.api_url, "KESTREL_API_ADMIN_TOKEN": "bench-platform",
            "KESTREL_API_PORT": str(port), "KESTREL_API_NATS_URL": nats_server.url,
        }  # fmt: skip
        api = subprocess.Popen([sys.executable, "-m", "api"], env=env, stderr=(root / "api.log").open("w"))
        try:
            for _ in range(200):
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            time.sleep(0.5)  # NATS connects in the background
            asyncio.run(run(nats_server.url, port, token, api.pid))
        finally:
            api.terminate()
            api.wait(10)


if __name__ == "__main__":
    main()
