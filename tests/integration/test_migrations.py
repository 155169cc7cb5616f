"""Migrations and partition maintenance against a real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from kestrel.devtools.servers import PostgresServer
from kestrel.store.migrate import available_migrations, detect_variant, migrate
from kestrel_core.errors import Conflict

pytestmark = pytest.mark.integration


def test_migrate_is_idempotent(database_url: str) -> None:
    assert migrate(database_url) == []
    with psycopg.connect(database_url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    assert versions == [m.version for m in available_migrations("native")]


def test_native_variant_without_timescaledb(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        assert detect_variant(conn) == "native"
        strategy = conn.execute("SELECT partstrat FROM pg_partitioned_table WHERE partrelid = 'telemetry'::regclass")
        assert strategy.fetchone() == ("r",)


def _partitions(conn: psycopg.Connection) -> set[str]:
    return {
        r[0]
        for r in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'telemetry'::regclass"
        )
    }


def test_partitions_exist_ahead_and_old_ones_are_dropped(database_url: str) -> None:
    today = datetime.now(UTC).date()
    with psycopg.connect(database_url, autocommit=True) as conn:
        ahead = {f"telemetry_p{(today + timedelta(days=d)):%Y%m%d}" for d in range(0, 7)}
        assert ahead <= _partitions(conn)
        old_day = datetime.now(UTC) - timedelta(days=60)
        conn.execute("SELECT telemetry_ensure_partitions(%s, %s)", (old_day, old_day))
        old = f"telemetry_p{old_day:%Y%m%d}"
        assert old in _partitions(conn)
        conn.execute("SELECT telemetry_maintain()")  # retention is 30 days by default
        assert old not in _partitions(conn)
        assert ahead <= _partitions(conn)


def test_a_changed_migration_is_refused(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE schema_migrations SET checksum = 'tampered' WHERE version = 1")
        try:
            with pytest.raises(Conflict):
                migrate(database_url)
        finally:
            from kestrel.store.migrate import available_migrations as av  # noqa: PLC0415

            conn.execute("UPDATE schema_migrations SET checksum = %s WHERE version = 1", (av("native")[0].checksum,))


def test_concurrent_migrations_on_a_fresh_database(postgres: PostgresServer) -> None:
    """Several services may run migrate at start-up at once; the advisory lock serialises them."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    with psycopg.connect(postgres.admin_url, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS migrate_race")
        conn.execute("CREATE DATABASE migrate_race OWNER kestrel")
    url = postgres.url.rsplit("/", 1)[0] + "/migrate_race"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: migrate(url), range(4)))
    assert sorted(len(r) for r in results) == [0, 0, 0, len(available_migrations("native"))]
