"""Storage against TimescaleDB in a container (testcontainers), where a Docker engine exists.

This machine has none, so here the module skips with that reason; the GitHub workflow runs it. Without Docker,
tests/integration/test_timescale.py runs the TimescaleDB variant in a WASM PostgreSQL (all but the writer's COPY).
It proves the TimescaleDB variant of the migrations (hypertable, compression, retention, continuous
aggregate) and that the writer's insert path and the API's queries are the same code on both.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from kestrel.devtools import seed
from kestrel.store.migrate import migrate
from tests.docker import docker_unavailable

pytestmark = pytest.mark.docker


_reason = docker_unavailable("TimescaleDB")
if _reason:
    pytest.skip(_reason, allow_module_level=True)


@pytest.fixture(scope="module")
def timescale_url() -> Iterator[str]:
    from testcontainers.postgres import PostgresContainer  # noqa: PLC0415

    with PostgresContainer("timescale/timescaledb:2.17.2-pg16", driver=None) as pg:
        url = pg.get_connection_url()
        migrate(url)
        yield url


def test_timescale_variant_is_applied(timescale_url: str) -> None:
    with psycopg.connect(timescale_url) as conn:
        variants = {r[0] for r in conn.execute("SELECT variant FROM schema_migrations")}
        assert "timescale" in variants
        hypertables = [r[0] for r in conn.execute("SELECT hypertable_name FROM timescaledb_information.hypertables")]
        assert hypertables == ["telemetry"]
        jobs = {r[0] for r in conn.execute("SELECT proc_name FROM timescaledb_information.jobs")}
        assert {"policy_compression", "policy_retention", "policy_refresh_continuous_aggregate"} <= jobs
        caggs = [r[0] for r in conn.execute("SELECT view_name FROM timescaledb_information.continuous_aggregates")]
        assert caggs == ["telemetry_hourly"]
    assert migrate(timescale_url) == []


def test_writer_insert_path_and_api_queries_on_a_hypertable(timescale_url: str) -> None:
    from ingest.storage import RawJson, prepare_connection, store_rows  # noqa: PLC0415
    from kestrel.store import telemetry  # noqa: PLC0415

    seed.create_tenant(timescale_url, "ts-tenant", exist_ok=True)
    seed.create_devices(timescale_url, "ts-tenant", ["ts-dev"], exist_ok=True)
    now = datetime.now(UTC)
    start = now.replace(minute=now.minute - now.minute % 5, second=0, microsecond=0) - timedelta(minutes=30)
    rows = [
        (
            "ts-tenant",
            "ts-dev",
            "",
            start + timedelta(minutes=i),
            i,
            RawJson(json.dumps({"t": i}).encode()),
            datetime.now(UTC),
        )
        for i in range(10)
    ]

    async def store() -> int:
        conn = await psycopg.AsyncConnection.connect(timescale_url)
        await prepare_connection(conn)
        inserted = 0
        for _ in range(2):  # the second pass must insert nothing (idempotent)
            inserted += (await store_rows(conn, rows))[1]
        # The API's queries read the tenant's view (migration 0016), in the tenant's context.
        await conn.execute("SELECT set_config('kestrel.tenant', 'ts-tenant', false)")
        points = await telemetry.raw_points(
            conn,
            tenant="ts-tenant",
            device="ts-dev",
            metric="t",
            start=start,
            end=start + timedelta(hours=1),
            after=None,
            limit=100,
        )
        buckets = await telemetry.buckets(
            conn,
            tenant="ts-tenant",
            device="ts-dev",
            metric="t",
            agg="avg",
            bucket=timedelta(minutes=5),
            start=start,
            end=start + timedelta(hours=1),
        )
        await conn.close()
        assert [p["value"] for p in points] == list(range(10))
        assert [b["value"] for b in buckets] == [2.0, 7.0]
        return inserted

    assert asyncio.run(store()) == 10
