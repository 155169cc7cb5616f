"""API throughput with tenancy on (not a test), against the same SQL straight on PostgreSQL in the same run.

Two tenants share the database; every API request authenticates a tenant token, opens a transaction that sets
the tenant for row-level security, runs the query as kestrel_api and encodes JSON. The ceiling runs the same
queries (with the same set_config and RLS) through psycopg with the same concurrency, no HTTP.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpload
import httpx
import psycopg
import uvloop
from psycopg_pool import AsyncConnectionPool
from scale import pick

from kestrel.devtools import seed
from kestrel.devtools.servers import PostgresServer, free_port
from kestrel.store.devices import PAGE, NewDevice
from kestrel.store.migrate import migrate
from kestrel.store.telemetry import bucket_sql
from kestrel_core.tokens import SCOPES

DEVICES = pick(2000, 50)
POINTS = pick(24 * 60, 120)  # one reading a minute (for a day), on the queried device
CONCURRENCY = pick(16, 4)
TOTAL = pick(3000, 100)


def _seed(url: str) -> tuple[str, str, str]:
    for tenant in ("bench-a", "bench-b"):
        seed.create_tenant(url, tenant)
        seed.import_devices(url, tenant, [NewDevice(f"{tenant}-{i:05d}", tags=["bench"]) for i in range(DEVICES)])
    start = datetime.now(UTC) - timedelta(days=1)
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO telemetry (tenant_id, device_id, stream, ts, seq, metrics, received_at)"
            " VALUES ('bench-a', 'bench-a-00000', '', %s, %s, %s, now())",
            [(start + timedelta(minutes=i), i, json.dumps({"temp": 20 + (i % 60) / 10})) for i in range(POINTS)],
        )
    _, token = seed.create_api_token(url, "bench-a", list(SCOPES), name="bench")
    return "bench-a", "bench-a-00000", token


async def direct(api_url: str, tenant: str, query: str, params: dict[str, object]) -> tuple[float, float, float]:
    """The ceiling: the same query as the API role with the tenant set, TOTAL times, CONCURRENCY at once."""
    latencies: list[float] = []
    queue = list(range(TOTAL))
    async with AsyncConnectionPool(api_url, min_size=CONCURRENCY, max_size=CONCURRENCY, open=False) as pool:
        await pool.wait()

        async def worker() -> None:
            while queue:
                queue.pop()
                started = time.perf_counter()
                async with pool.connection() as conn, conn.transaction():
                    await conn.execute("SELECT set_config('kestrel.tenant', %s, true)", (tenant,))
                    await (await conn.execute(query, params)).fetchall()
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return TOTAL / elapsed, 1000 * statistics.median(latencies), 1000 * latencies[int(len(latencies) * 0.99)]


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="kestrel-apibench-"))
    root.chmod(0o755)
    pg = PostgresServer(name="postgres", log_path=root / "pg.log", root=root / "pg", port=free_port())
    pg.start()
    api = None
    try:
        migrate(pg.url)
        tenant, device, token = _seed(pg.url)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("KESTREL_")} | {
            "KESTREL_API_DATABASE_URL": pg.api_url,
            "KESTREL_API_ADMIN_TOKEN": "bench-platform",
            "KESTREL_API_PORT": str(port),
            "KESTREL_API_POOL_MAX": str(CONCURRENCY),
        }
        api = subprocess.Popen([sys.executable, "-m", "api"], env=env, stderr=(root / "api.log").open("w"))
        for _ in range(100):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        auth = {"Authorization": f"Bearer {token}"}
        now = datetime.now(UTC)
        window = (
            f"from={(now - timedelta(days=1)).strftime('%Y-%m-%dT%H:%M:%SZ')}&to={now.strftime('%Y-%m-%dT%H:%M:%SZ')}"
        )
        cases = {
            f"device list (100 of {DEVICES:,})": (
                "/api/v1/devices?limit=100",
                PAGE,
                {"tenant": tenant, "status": None, "tag": None, "group": None, "after": None, "limit": 101},
            ),
            f"telemetry aggregate (24 h, 1 h buckets, avg of {POINTS:,} points)": (
                f"/api/v1/devices/{device}/telemetry?metric=temp&bucket=1h&agg=avg&{window}",
                bucket_sql("avg"),
                {
                    "tenant": tenant,
                    "device": device,
                    "metric": "temp",
                    "bucket": timedelta(hours=1),
                    "origin": datetime(2000, 1, 1, tzinfo=UTC),
                    "from": now - timedelta(days=1),
                    "to": now,
                },
            ),
        }
        print(f"API (one uvicorn process, pool {CONCURRENCY}) vs the same SQL as kestrel_api via psycopg;")
        print(f"{CONCURRENCY} concurrent, {TOTAL:,} requests each, tenancy (token + RLS transaction) on:")
        for name, (path, query, params) in cases.items():
            through = uvloop.run(
                httpload.measure(port, [httpload.request(port, "GET", path, auth)], TOTAL, CONCURRENCY)
            )
            ceiling = uvloop.run(direct(pg.api_url, tenant, query, params))
            print(f"  {name}")
            for label, (rate, p50, p99) in (("PostgreSQL direct (ceiling):", ceiling), ("REST API:", through)):
                print(f"    {label:<29} {rate:>7,.0f} /s   p50 {p50:.1f} ms   p99 {p99:.1f} ms")
            print(f"    ratio to the ceiling: {through[0] / ceiling[0]:.2f}")
    finally:
        if api is not None:
            api.terminate()
            api.wait(10)
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
