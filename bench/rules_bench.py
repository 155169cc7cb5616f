"""Rule benchmarks (not tests), each against a ceiling measured in the same run on the same servers (issue 13):

1. Evaluation throughput of one rule worker (``python -m rules``) with 1, 100 and 1,000 rules over a fleet, from
   the partitioned stream to committed states, against the raw JetStream consume rate of the same messages (a bare
   pull consumer on RULES_IN, no evaluation, no database).
2. Publish -> webhook received latency (p50/p99) with telemetry flowing at a fixed rate and a rule flipping an alarm
   on a share of the readings, against the raw JetStream publish -> subscriber latency of the same messages.
3. Dry-run speed: simulated seconds per wall second over stored telemetry at 1 Hz, against the time to only read
   the same rows from PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import nats
import psycopg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from scale import pick, servers

from ingest.jetstream import ensure_streams as ensure_telemetry
from kestrel.devtools import seed
from kestrel.devtools.servers import PostgresServer, free_port, http_ok
from kestrel.store.devices import NewDevice
from kestrel.store.dryrun import dry_run
from kestrel.store.migrate import migrate
from kestrel.store.session import tenant_scope
from kestrel_core.messages.telemetry import Point, TelemetryEnvelope
from kestrel_core.rules.model import parse_rule
from rules.stream import RULES_STREAM, ensure_streams

TENANT = "bench"
DEVICES = pick(1000, 50)
READINGS = {1: pick(20_000, 400), 100: pick(5_000, 100), 1000: pick(1_000, 20)}
RATE = pick(1000, 50)  # msg/s for the latency run
LATENCY_S = pick(10.0, 2.0)
FLIP_EVERY = pick(50, 10)  # one reading in FLIP_EVERY per device is hot (and the next one cools it)
DRY_DEVICES, DRY_HOURS = pick(100, 5), pick(24.0, 0.25)
PARTITIONS = 4
_json = msgspec.json.Encoder()


def envelope(device: str, ts_ms: int, seq: int, metrics: dict[str, Any]) -> bytes:
    point = Point(ts_ms * 1000, seq, msgspec.Raw(_json.encode(metrics)))
    return _json.encode(TelemetryEnvelope(tenant=TENANT, device=device, received_us=ts_ms * 1000, identity="device",
                                          points=[point]))  # fmt: skip


def rule(threshold: float, notify: list[str] | None = None, metrics: list[str] | None = None) -> dict[str, Any]:
    when = {"op": "compare", "cmp": "gt", "left": {"kind": "metric", "name": "temp"},
            "right": {"kind": "const", "value": threshold}}  # fmt: skip
    return {"name": f"temp over {threshold}", "metrics": metrics or ["temp"], "notify": notify or [],
            "alarm": {"when": when}}  # fmt: skip


def set_rules(url: str, documents: list[dict[str, Any]]) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("DELETE FROM rules; DELETE FROM rule_partitions")
        for i, document in enumerate(documents):
            conn.execute(
                "INSERT INTO rules (rule_id, tenant_id, name, definition) VALUES (%s, %s, %s, %s)",
                (f"r{i:024x}", TENANT, document["name"], json.dumps(document)),
            )


def scrape(port: int, name: str) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def start_worker(
    root: Path, pg: PostgresServer, nats_url: str, extra: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = dict(os.environ) | {
        "KESTREL_DATABASE_URL": pg.url, "KESTREL_RULES_NATS_URL": nats_url, "KESTREL_RULES_METRICS_PORT": str(port),
        "KESTREL_RULES_PARTITIONS": str(PARTITIONS), "KESTREL_RULES_WEBHOOK_ALLOW_PRIVATE": "true",
    } | (extra or {})  # fmt: skip
    log = (root / "rules.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "rules"], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not http_ok(f"http://127.0.0.1:{port}/metrics"):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"rule worker did not start: {(root / 'rules.log').read_text()[-2000:]}")
        time.sleep(0.1)
    return proc, port


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(30)


async def publish(nats_url: str, messages: list[tuple[str, bytes]]) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    for start in range(0, len(messages), 500):
        acks = [js.publish(subject, data) for subject, data in messages[start : start + 500]]
        await asyncio.gather(*acks)
    await nc.close()


async def rules_in_count(nats_url: str, at_least: int) -> int:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    while (info := await js.stream_info(RULES_STREAM)).state.messages < at_least:
        await asyncio.sleep(0.1)
    await nc.close()
    return int(info.state.last_seq)


async def raw_consume(nats_url: str, after_seq: int, count: int) -> float:
    """The ceiling: messages/s a bare pull consumer gets from RULES_IN (no evaluation, no database)."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    config = ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                            opt_start_seq=after_seq + 1, filter_subject="rules.>")  # fmt: skip
    sub = await js.pull_subscribe("rules.>", stream=RULES_STREAM, config=config)
    got, started = 0, time.perf_counter()
    while got < count:
        got += len(await sub.fetch(500, timeout=5))
    rate = got / (time.perf_counter() - started)
    await nc.close()
    return rate


def throughput(root: Path, pg: PostgresServer, nats_url: str, devices: list[str]) -> None:
    total = max(READINGS.values())
    now = int(time.time() * 1000) - 3_600_000
    messages = []
    for i in range(total):
        device = devices[i % len(devices)]
        messages.append((f"v1.{TENANT}.d.{device}.telemetry", envelope(device, now + i, i, {"temp": 20.0 + i % 7})))
    asyncio.run(publish(nats_url, messages))
    last = asyncio.run(rules_in_count(nats_url, total))
    print(f"Rule evaluation, one worker ({PARTITIONS} partitions), {len(devices)} devices:")
    for count, readings in READINGS.items():
        set_rules(pg.url, [rule(1e9) for _ in range(count)])  # never fires: evaluation and state, no effects
        with psycopg.connect(pg.url) as conn:  # start every partition just before the last `readings` messages
            for partition in range(PARTITIONS):
                conn.execute("INSERT INTO rule_partitions (partition, stream_seq) VALUES (%s, %s)",
                             (partition, last - readings))  # fmt: skip
            conn.execute("DELETE FROM rule_state")
        raw = asyncio.run(raw_consume(nats_url, last - readings, readings))
        proc, port = start_worker(root, pg, nats_url)
        try:
            while scrape(port, "kestrel_rules_readings_total") == 0:
                time.sleep(0.01)
            started = time.perf_counter()
            while scrape(port, "kestrel_rules_readings_total") < readings:
                time.sleep(0.02)
            rate = readings / (time.perf_counter() - started)
        finally:
            stop(proc)
        print(f"  {count:>5} rules: {rate:>9,.0f} readings/s ({rate * count:>11,.0f} evaluations/s); raw consume"
              f" {raw:,.0f} msg/s; ratio to the raw JetStream consume rate: {rate / raw:.4f}")  # fmt: skip


def latency(root: Path, pg: PostgresServer, nats_url: str, devices: list[str]) -> None:
    port = free_port()
    sink = subprocess.Popen([sys.executable, str(Path(__file__).with_name("webhook_sink.py")), str(port)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    if sink.stdout is None or sink.stdout.readline().strip() != "ready":
        raise SystemExit("the webhook sink did not start")
    with psycopg.connect(pg.url) as conn:
        conn.execute("DELETE FROM deliveries; DELETE FROM channels")
        conn.execute("INSERT INTO channels (channel_id, tenant_id, kind, config, secret, per_minute)"
                     " VALUES ('hook', %s, 'webhook', %s, 'bench-secret', 10000)",
                     (TENANT, json.dumps({"kind": "webhook", "url": f"http://127.0.0.1:{port}/"})))  # fmt: skip
    set_rules(pg.url, [rule(80, ["hook"], ["temp", "sent"])])
    with psycopg.connect(pg.url) as conn:
        last = asyncio.run(rules_in_count(nats_url, 0))
        for partition in range(PARTITIONS):
            conn.execute("INSERT INTO rule_partitions (partition, stream_seq) VALUES (%s, %s)", (partition, last))
    proc, _ = start_worker(root, pg, nats_url)
    raw: list[float] = []

    async def run() -> None:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()

        async def on_raw(msg: Any) -> None:
            point = msgspec.json.decode(msg.data)["points"][0]  # [ts_us, seq, metrics]
            raw.append(time.time() * 1000 - float(point[2]["sent"]))

        await nc.subscribe(f"v1.{TENANT}.d.*.telemetry", cb=on_raw)
        base = int(time.time() * 1000)
        sent, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < LATENCY_S:
            due = int(elapsed * RATE)
            while sent < due:
                device = devices[sent % len(devices)]
                round_ = sent // len(devices)
                hot = round_ % FLIP_EVERY == 0
                metrics = {"temp": 90.0 if hot else 70.0, "sent": time.time() * 1000}
                await js.publish(f"v1.{TENANT}.d.{device}.telemetry", envelope(device, base + sent, sent, metrics))
                sent += 1
            await asyncio.sleep(0.001)
        await asyncio.sleep(5)
        await nc.close()

    try:
        asyncio.run(run())
    finally:
        stop(proc)
        sink.terminate()
    seen: list[float] = json.loads(sink.communicate(timeout=30)[0].strip().splitlines()[-1])
    if not seen:
        raise SystemExit("no webhook arrived")
    p50, p99 = statistics.quantiles(seen, n=100)[49], statistics.quantiles(seen, n=100)[98]
    r50 = statistics.median(raw)
    print(f"Publish -> webhook received, {RATE} msg/s over {len(devices)} devices, {len(seen)} notifications:")
    print(f"  p50 {p50:.1f} ms, p99 {p99:.1f} ms; raw JetStream publish -> subscriber p50 {r50:.2f} ms;"
          f" ratio to the raw publish -> receive p50: {r50 / p50:.4f}")  # fmt: skip


def dry_speed(pg: PostgresServer) -> None:
    tenant = "dry"
    seed.create_tenant(pg.url, tenant)
    names = [f"dry-{i:03d}" for i in range(DRY_DEVICES)]
    seed.import_devices(pg.url, tenant, [NewDevice(n) for n in names])
    seconds = int(DRY_HOURS * 3600)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=seconds + 60)
    with psycopg.connect(pg.url) as conn:  # COPY is refused under row-level security: batched INSERTs of arrays
        conn.execute("SELECT telemetry_ensure_partitions(%s, %s)", (start, start + timedelta(seconds=seconds)))
        for name in names:
            for first in range(0, seconds, 50_000):
                span = range(first, min(seconds, first + 50_000))
                conn.execute(
                    "INSERT INTO telemetry (tenant_id, device_id, stream, ts, seq, metrics, received_at)"
                    " SELECT %s, %s, '', %s + make_interval(secs => s), s,"
                    " jsonb_build_object('temp', 70 + (s / 60) %% 20), now() FROM unnest(%s::int[]) AS s",
                    (tenant, name, start, list(span)),
                )
    end = start + timedelta(seconds=seconds)
    hot = parse_rule(rule(80) | {"alarm": {**rule(80)["alarm"], "for_s": 30}})
    per_call = max(1, 900_000 // seconds)  # devices per dry run: under its 1,000,000-reading bound

    async def run() -> tuple[float, float, int, int]:
        async with await psycopg.AsyncConnection.connect(pg.url) as conn:
            read_started = time.perf_counter()
            async with tenant_scope(conn, tenant):
                cur = await conn.execute(
                    "SELECT device_id, ts, seq, metrics FROM tenant_telemetry WHERE tenant_id = %s"
                    " AND ts >= %s AND ts < %s ORDER BY device_id, ts, seq",
                    (tenant, start, end),
                )
                rows = len(await cur.fetchall())
            read = time.perf_counter() - read_started
            started, transitions = time.perf_counter(), 0
            for i in range(0, len(names), per_call):
                async with tenant_scope(conn, tenant):
                    result = await dry_run(conn, tenant, hot, start=start, end=end, devices=names[i : i + per_call])
                transitions += sum(len(d.transitions) for d in result.devices)
            return read, time.perf_counter() - started, rows, transitions

    read, wall, rows, transitions = asyncio.run(run())
    print(f"Dry run, {DRY_DEVICES} devices x {DRY_HOURS:g} h at 1 Hz ({rows:,} readings, {transitions:,} transitions):")
    print(f"  {seconds / wall:,.0f} simulated s per wall s ({rows / wall:,.0f} readings/s);"
          f" reading the rows alone {read:.1f} s; ratio to the read-only time: {read / wall:.4f}")  # fmt: skip


def main() -> None:
    with servers("kestrel-rulesbench-") as (root, pg, nats_server):
        migrate(pg.url)
        seed.create_tenant(pg.url, TENANT)
        devices = [f"b-{i:05d}" for i in range(DEVICES)]
        seed.import_devices(pg.url, TENANT, [NewDevice(d) for d in devices])

        async def streams() -> None:
            nc = await nats.connect(nats_server.url)
            await ensure_telemetry(nc)
            await ensure_streams(nc, PARTITIONS)
            await nc.close()

        asyncio.run(streams())
        throughput(root, pg, nats_server.url, devices)
        latency(root, pg, nats_server.url, devices[: min(100, len(devices))])
        dry_speed(pg)


if __name__ == "__main__":
    main()
