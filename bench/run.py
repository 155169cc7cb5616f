"""``make bench``: Kestrel's ingest pipeline against this machine's physical limits, measured in one run.

Ceilings (each stage alone, same machine, same run):
  * Mosquitto alone: QoS 1 from the same simulated devices to one shared-subscription consumer (gmqtt).
  * JetStream alone: lean acked publishes (reply inbox, 10k window) of envelope-sized messages, file storage.
  * PostgreSQL COPY alone: binary COPY of telemetry rows into the real telemetry table, 5k rows per commit.
Pipeline: devices -> Mosquitto -> bridge -> JetStream -> writer -> PostgreSQL, QoS 1, counted in the database.
Latency: publish -> commit, from the load generator's send time and each row's commit timestamp
(``track_commit_timestamp``), so nothing polls. CPU time per message comes from /proc for every process.

Not a test: nothing here asserts. Results go to stdout and bench/out/latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import nats
import psutil
import psycopg
import uvloop
from scale import pick

from ingest.jetstream import ensure_streams
from ingest.storage import RawJson, prepare_connection, store_rows
from kestrel.devtools import seed
from kestrel.devtools.servers import MosquittoServer, NatsServer, PostgresServer, free_port
from kestrel.devtools.simulate import Fleet, device_ids
from kestrel.store.migrate import migrate
from kestrel_core.messages.telemetry import TelemetryLimits, normalize
from kestrel_core.topics import telemetry_topic

REPO = Path(__file__).resolve().parent.parent
SAMPLE = {"temp": 21.53, "humidity": 40.2, "battery": 3.71, "rssi": -67, "door_open": False}


@dataclass
class Stack:
    root: Path
    pg: PostgresServer
    nats: NatsServer
    mqtt: MosquittoServer


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def postgres_pids(pg: PostgresServer) -> list[int]:
    parent = psutil.Process(pg.pid)
    return [pg.pid, *(c.pid for c in parent.children(recursive=True))]


class CpuMeter:
    """CPU seconds used by named groups of processes between start() and stop()."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.before: dict[str, float] = {}

    def start(self) -> None:
        self.before = {k: cpu_seconds(v) for k, v in self.groups.items()}

    def stop(self) -> dict[str, float]:
        return {k: cpu_seconds(v) - self.before[k] for k, v in self.groups.items()}


# ------------------------------------------------------------------------------------------------ ceilings


def mosquitto_ceiling(stack: Stack, devices: int, seconds: float) -> tuple[float, float]:
    """Delivered msg/s through Mosquitto alone, and the broker's CPU µs per message."""
    sink = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "sink.py"), str(stack.mqtt.port), str(seconds + 6)],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)
    fleet = Fleet("127.0.0.1", stack.mqtt.port, "ceiling", device_ids("ceil", devices), rate=100_000)
    meter = CpuMeter({"mosquitto": [stack.mqtt.pid]})
    meter.start()
    uvloop.run(fleet.run(duration=seconds))
    cpu = meter.stop()["mosquitto"]
    out, _ = sink.communicate(timeout=60)
    result = json.loads(out)
    rate = result["count"] / max(result["seconds"], 1e-9)
    return rate, 1e6 * cpu / max(result["count"], 1)


def jetstream_ceiling(stack: Stack, count: int) -> tuple[float, float]:
    """Acked JetStream publishes per second (file storage), and nats-server CPU µs per message."""
    topic = telemetry_topic("ceiling", "dev-1")
    reading = msgspec.json.encode({"ts": int(time.time() * 1000), "seq": 1, "metrics": SAMPLE})
    payload = normalize(topic, reading, int(time.time() * 1e6), TelemetryLimits()).payload

    async def run() -> tuple[float, float]:
        nc = await nats.connect(stack.nats.url)
        js = nc.jetstream()
        await js.add_stream(name="CEILING", subjects=["ceiling.>"], storage="file")
        window = asyncio.Semaphore(10_000)
        done = asyncio.Event()
        acked = 0

        async def on_ack(msg: object) -> None:
            nonlocal acked
            acked += 1
            window.release()
            if acked == count:
                done.set()

        inbox = nc.new_inbox()
        await nc.subscribe(f"{inbox}.*", cb=on_ack)
        meter = CpuMeter({"nats": [stack.nats.pid]})
        meter.start()
        started = time.perf_counter()
        for i in range(count):
            await window.acquire()
            await nc.publish(f"ceiling.{i % 100}", payload, reply=f"{inbox}.{i}")
        await asyncio.wait_for(done.wait(), 120)
        elapsed = time.perf_counter() - started
        cpu = meter.stop()["nats"]
        await js.delete_stream("CEILING")
        await nc.close()
        return count / elapsed, 1e6 * cpu / count

    return asyncio.run(run())


def copy_ceiling(stack: Stack, rows: int, batch: int = 5000) -> tuple[float, float]:
    """Rows/s PostgreSQL stores through the writer's own statements, alone, and its CPU µs per row.

    The writer's path exactly (binary COPY into its session staging table, then ``INSERT ... SELECT`` joined to the
    registry into ``telemetry`` with the same indexes, constraints and row-level security, as the writer's role),
    ``batch`` rows per commit, with no NATS and no decoding in front of it.
    """
    tenant = "ceiling"
    devices = device_ids("copy", 500)
    seed.create_tenant(stack.pg.url, tenant, exist_ok=True)
    seed.create_devices(stack.pg.url, tenant, devices, exist_ok=True)
    raw = RawJson(msgspec.json.encode(SAMPLE))
    base = datetime.now(UTC) - timedelta(minutes=10)
    data = [(tenant, devices[i % 500], "", base + timedelta(microseconds=i), i, raw, base) for i in range(rows)]
    meter = CpuMeter({"postgres": postgres_pids(stack.pg)})

    async def run() -> float:
        async with await psycopg.AsyncConnection.connect(stack.pg.url) as conn:
            await prepare_connection(conn)
            meter.start()
            started = time.perf_counter()
            for i in range(0, rows, batch):
                _, inserted, unknown = await store_rows(conn, data[i : i + batch])
                if inserted != len(data[i : i + batch]) or unknown:
                    raise RuntimeError(f"COPY ceiling stored {inserted} of {batch} rows (unknown devices {unknown})")
            elapsed = time.perf_counter() - started
            await conn.execute("DELETE FROM telemetry WHERE tenant_id = %s", (tenant,))
            await conn.commit()
            return elapsed

    elapsed = asyncio.run(run())
    cpu = meter.stop()["postgres"]
    return rows / elapsed, 1e6 * cpu / rows


# ------------------------------------------------------------------------------------------------ pipeline


def start_services(stack: Stack, bridges: int, tag: str) -> dict[str, list[subprocess.Popen[bytes]]]:
    env = dict(
        os.environ,
        KESTREL_DATABASE_URL=stack.pg.url,
        KESTREL_BRIDGE_MQTT_PORT=str(stack.mqtt.port),
        KESTREL_BRIDGE_NATS_URL=stack.nats.url,
        KESTREL_WRITER_NATS_URL=stack.nats.url,
        KESTREL_BRIDGE_SHARE_GROUP=f"ingest-{tag}",
    )
    logs = stack.root / "logs"
    logs.mkdir(exist_ok=True)
    procs: dict[str, list[subprocess.Popen[bytes]]] = {"writer": [], "bridge": []}
    writer_env = env | {"KESTREL_WRITER_METRICS_PORT": str(free_port())}
    procs["writer"].append(
        subprocess.Popen(
            [sys.executable, "-m", "ingest", "writer"], env=writer_env, stderr=(logs / f"writer-{tag}.log").open("w")
        )
    )
    for i in range(bridges):
        bridge_env = env | {
            "KESTREL_BRIDGE_CLIENT_ID": f"bench-bridge-{tag}-{i}",
            "KESTREL_BRIDGE_METRICS_PORT": str(free_port()),
        }
        procs["bridge"].append(
            subprocess.Popen(
                [sys.executable, "-m", "ingest", "bridge"],
                env=bridge_env,
                stderr=(logs / f"bridge-{tag}-{i}.log").open("w"),
            )
        )
    time.sleep(3)
    return procs


def stop_services(procs: dict[str, list[subprocess.Popen[bytes]]]) -> None:
    for group in procs.values():
        for p in group:
            p.terminate()
    for group in procs.values():
        for p in group:
            p.wait(30)


def stored(stack: Stack, tenant: str) -> int:
    with psycopg.connect(stack.pg.url) as conn:
        row = conn.execute("SELECT count(*) FROM telemetry WHERE tenant_id = %s", (tenant,)).fetchone()
        return int(row[0]) if row else 0


def pipeline_run(
    stack: Stack, *, devices: int, rate: float, seconds: float, bridges: int, tag: str
) -> dict[str, object]:
    """Offer ``rate`` msg/s from ``devices`` connections for ``seconds``; measure what gets stored."""
    tenant = f"bench-{tag}-{uuid.uuid4().hex[:6]}"
    ids = device_ids(f"{tag}{uuid.uuid4().hex[:4]}", devices)
    seed.create_tenant(stack.pg.url, tenant)
    seed.create_devices(stack.pg.url, tenant, ids)
    procs = start_services(stack, bridges, tag)
    groups = {
        "bridge": [p.pid for p in procs["bridge"]],
        "writer": [p.pid for p in procs["writer"]],
        "mosquitto": [stack.mqtt.pid],
        "nats-server": [stack.nats.pid],
        "postgres": postgres_pids(stack.pg),
        "load generator": [os.getpid()],
    }
    fleet = Fleet("127.0.0.1", stack.mqtt.port, tenant, ids, rate=rate, record=True)
    meter = CpuMeter(groups)
    warmup = min(5.0, seconds / 4)

    async def drive() -> tuple[int, int, float]:
        task = asyncio.create_task(fleet.run(duration=seconds))
        await asyncio.sleep(warmup)
        c1, t1 = await asyncio.to_thread(stored, stack, tenant), time.monotonic()
        await asyncio.sleep(seconds - warmup - 1)
        c2, t2 = await asyncio.to_thread(stored, stack, tenant), time.monotonic()
        await task
        return c1, c2, t2 - t1

    meter.start()
    started = time.monotonic()
    c1, c2, window = uvloop.run(drive())
    deadline = time.monotonic() + 120
    while stored(stack, tenant) < fleet.stats.acked and time.monotonic() < deadline:
        time.sleep(0.25)
    drain_s = time.monotonic() - started
    cpu = meter.stop()
    total = stored(stack, tenant)
    with psycopg.connect(stack.pg.url) as conn:
        commits = conn.execute(
            "SELECT device_id, seq, extract(epoch FROM pg_xact_commit_timestamp(xmin)) FROM telemetry"
            " WHERE tenant_id = %s",
            (tenant,),
        ).fetchall()
    stop_services(procs)
    sent_at = fleet.stats.acked_keys
    first = min(sent_at.values()) if sent_at else 0
    latencies = sorted(
        float(ts) - sent_at[(d, s)] for d, s, ts in commits if (d, s) in sent_at and sent_at[(d, s)] > first + warmup
    )
    keys = {(d, s) for d, s, _ in commits}
    return {
        "offered_rate": rate,
        "devices": devices,
        "bridges": bridges,
        "acked": fleet.stats.acked,
        "acked_rate": fleet.stats.acked / seconds,
        "stored": total,
        "stored_rate_steady": (c2 - c1) / window,
        "stored_rate_overall": total / drain_s,
        "lost": len([k for k in sent_at if k not in keys]),
        "duplicates": len(commits) - len(keys),
        "latency_p50_ms": 1000 * statistics.median(latencies) if latencies else None,
        "latency_p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else None,
        "latency_max_ms": 1000 * latencies[-1] if latencies else None,
        "cpu_us_per_msg": {k: 1e6 * v / max(total, 1) for k, v in cpu.items()},
    }


def machine() -> dict[str, object]:
    model = ""
    with contextlib.suppress(OSError, StopIteration):
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=pick(500, 20), help="simulated device connections")
    parser.add_argument("--seconds", type=float, default=pick(20.0, 5.0), help="length of each pipeline run")
    parser.add_argument("--max-rate", type=float, default=pick(20_000, 400), help="offered rate for the throughput run")
    parser.add_argument("--latency-rate", type=float, default=pick(5_000, 100), help="fixed offered rate for latency")
    parser.add_argument("--bridges", type=int, default=1, help="bridge processes")
    parser.add_argument("--smoke", action="store_true", help="seconds and tiny rates: does it still run?")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="kestrel-bench-"))
    root.chmod(0o755)
    pg = PostgresServer(
        name="postgres",
        log_path=root / "pg.log",
        root=root / "pg",
        port=free_port(),
        shared_buffers="1GB",
        extra_conf="track_commit_timestamp = on\n",
    )
    nats_server = NatsServer(
        name="nats", log_path=root / "nats.log", root=root / "nats", port=free_port(), monitor_port=free_port()
    )
    mqtt = MosquittoServer(name="mosquitto", log_path=root / "mqtt.log", root=root / "mqtt", port=free_port())
    stack = Stack(root, pg, nats_server, mqtt)
    results: dict[str, object] = {"machine": machine(), "args": vars(args)}
    try:
        for server in (pg, nats_server, mqtt):
            server.start()
        migrate(pg.url)

        async def streams() -> None:
            nc = await nats.connect(nats_server.url)
            await ensure_streams(nc)
            await nc.close()

        asyncio.run(streams())
        print("measuring ceilings ...", flush=True)
        mq_rate, mq_cpu = mosquitto_ceiling(stack, args.devices, pick(10, 2))
        js_rate, js_cpu = jetstream_ceiling(stack, pick(200_000, 5_000))
        pg_rate, pg_cpu = copy_ceiling(stack, pick(200_000, 5_000))
        results["ceilings"] = {
            "mosquitto_qos1_msg_s": mq_rate,
            "mosquitto_cpu_us_per_msg": mq_cpu,
            "jetstream_msg_s": js_rate,
            "nats_cpu_us_per_msg": js_cpu,
            "postgres_copy_rows_s": pg_rate,
            "postgres_cpu_us_per_row": pg_cpu,
        }
        print("measuring sustained throughput ...", flush=True)
        results["throughput"] = pipeline_run(
            stack, devices=args.devices, rate=args.max_rate, seconds=args.seconds, bridges=args.bridges, tag="max"
        )
        print("measuring latency at a fixed rate ...", flush=True)
        results["latency"] = pipeline_run(
            stack, devices=args.devices, rate=args.latency_rate, seconds=args.seconds, bridges=args.bridges, tag="lat"
        )
        results["latency_low"] = pipeline_run(
            stack,
            devices=args.devices,
            rate=args.latency_rate / 2,
            seconds=args.seconds,
            bridges=args.bridges,
            tag="low",
        )
    finally:
        for server in (mqtt, nats_server, pg):
            server.stop()
    report(results)
    out = REPO / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / pick("latest.json", "smoke.json")).write_text(json.dumps(results, indent=2, default=str))


def _ratio(value: float) -> str:
    """Two decimals, or two significant digits below 0.01 (a smoke run's tiny rates are not zero)."""
    return f"{value:.2f}" if value >= 0.01 else f"{value:.2g}"


def report(r: dict[str, object]) -> None:
    c: dict[str, float] = r["ceilings"]  # type: ignore[assignment]
    t: dict[str, object] = r["throughput"]  # type: ignore[assignment]
    lat: dict[str, object] = r["latency"]  # type: ignore[assignment]
    steady = float(t["stored_rate_steady"])  # type: ignore[arg-type]
    print()
    print(f"machine: {r['machine']}")
    print("\nCeilings measured in this run (each stage alone):")
    print(
        f"  Mosquitto alone, QoS 1, {r['args']['devices']} devices -> 1 consumer   "
        f"{c['mosquitto_qos1_msg_s']:>9,.0f} msg/s"
    )  # type: ignore[index]
    print(f"  JetStream alone, acked publishes (file)              {c['jetstream_msg_s']:>9,.0f} msg/s")
    print(f"  PostgreSQL binary COPY into telemetry               {c['postgres_copy_rows_s']:>9,.0f} rows/s")
    print("\nPipeline (devices -> Mosquitto -> bridge -> JetStream -> writer -> PostgreSQL), QoS 1:")
    print(f"  offered {t['offered_rate']:,.0f} msg/s, broker acknowledged {t['acked_rate']:,.0f} msg/s")
    print(f"  stored, sustained: {steady:,.0f} msg/s")
    for name, key in (
        ("Mosquitto", "mosquitto_qos1_msg_s"),
        ("JetStream", "jetstream_msg_s"),
        ("PostgreSQL COPY", "postgres_copy_rows_s"),
    ):
        print(f"    ratio to {name + ' ceiling:':<26}{_ratio(steady / c[key]):>6}")
    print(f"  lost {t['lost']}, duplicates {t['duplicates']} (acknowledged {t['acked']}, stored {t['stored']})")
    print(f"\nLatency publish -> committed at a fixed {lat['offered_rate']:,.0f} msg/s:")
    print(
        f"  p50 {lat['latency_p50_ms']:.1f} ms   p99 {lat['latency_p99_ms']:.1f} ms   "
        f"max {lat['latency_max_ms']:.1f} ms"
    )
    print(
        f"  stored {lat['stored_rate_steady']:,.0f} msg/s sustained, lost {lat['lost']}, duplicates {lat['duplicates']}"
    )
    low: dict[str, object] = r["latency_low"]  # type: ignore[assignment]
    print(
        f"  at {low['offered_rate']:,.0f} msg/s: p50 {low['latency_p50_ms']:.1f} ms   "
        f"p99 {low['latency_p99_ms']:.1f} ms"
        f"   max {low['latency_max_ms']:.1f} ms (stored {low['stored_rate_steady']:,.0f} msg/s, lost {low['lost']},"
        f" duplicates {low['duplicates']})"
    )
    print("\nCPU time per stored message (throughput run):")
    for name, us in t["cpu_us_per_msg"].items():  # type: ignore[attr-defined]
        print(f"  {name:<16}{us:>7.1f} µs")
    print(f"  {'total':<16}{sum(t['cpu_us_per_msg'].values()):>7.1f} µs")  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
