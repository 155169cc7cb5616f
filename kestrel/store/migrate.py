"""Numbered SQL migrations, applied in order, each once (``kestrel db migrate``).

Files are ``NNNN_name.sql`` or, where storage differs, ``NNNN_name.native.sql`` and
``NNNN_name.timescale.sql``: the TimescaleDB variant is chosen when the extension can be loaded
(ADR-0006). A file whose first line is ``-- kestrel: no-transaction`` runs statement by statement
in autocommit mode (TimescaleDB continuous aggregates require it). Concurrent runs serialise on an
advisory lock, so several services may call ``migrate`` at start-up.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import psycopg
from psycopg.rows import dict_row

from kestrel.store.rows import fetch_maybe
from kestrel_core.errors import Conflict

Variant = Literal["native", "timescale"]
_FILE = re.compile(r"\A(\d{4})_([a-z0-9_]+)(?:\.(native|timescale))?\.sql\Z")
_LOCK_KEY = 0x6B657374  # "kest"
NO_TRANSACTION = "-- kestrel: no-transaction"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    variant: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available_migrations(variant: Variant) -> list[Migration]:
    """The migrations for ``variant``, in version order."""
    found: dict[int, Migration] = {}
    for entry in resources.files("kestrel.store").joinpath("migrations").iterdir():
        match = _FILE.match(entry.name)
        if not match:
            continue
        version, name, file_variant = int(match[1]), match[2], match[3] or "any"
        if file_variant not in ("any", variant):
            continue
        if version in found:
            raise ValueError(f"two migrations with version {version:04d}")
        found[version] = Migration(version, name, file_variant, entry.read_text())
    return [found[v] for v in sorted(found)]


def detect_variant(conn: psycopg.Connection) -> Variant:
    """``timescale`` when the extension is in this database or can be created now, else ``native``.

    Creating it needs the library preloaded and enough privilege; a failed attempt rolls back and
    leaves the native variant.
    """
    if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone():
        return "timescale"
    if not conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone():
        return "native"
    try:
        with conn.transaction():
            conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    except psycopg.Error:
        return "native"
    return "timescale"


def _statements(sql: str) -> list[str]:
    body = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in body.split(";\n") if s.strip()]


def migrate(conninfo: str) -> list[Migration]:
    """Apply every pending migration; return those applied now (empty when up to date)."""
    applied_now: list[Migration] = []
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL, variant text NOT NULL,"
                " checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            rows = conn.cursor(row_factory=dict_row).execute("SELECT version, checksum, variant FROM schema_migrations")
            done = {row["version"]: (row["checksum"], row["variant"]) for row in rows}
            variant = detect_variant(conn)
            for migration in available_migrations(variant):
                if migration.version in done:
                    checksum, _ = done[migration.version]
                    if checksum != migration.checksum:
                        raise Conflict(
                            f"migration {migration.version:04d}_{migration.name} changed after it was applied"
                        )
                    continue
                _apply(conn, migration)
                applied_now.append(migration)
            conn.execute("SELECT telemetry_maintain()")
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return applied_now


def _apply(conn: psycopg.Connection, migration: Migration) -> None:
    record = (
        "INSERT INTO schema_migrations (version, name, variant, checksum) VALUES (%s, %s, %s, %s)",
        (migration.version, migration.name, migration.variant, migration.checksum),
    )
    if migration.sql.startswith(NO_TRANSACTION):
        for statement in _statements(migration.sql):
            conn.execute(statement.encode())
        conn.execute(*record)
        return
    with conn.transaction():
        conn.execute(migration.sql.encode())
        conn.execute(*record)


async def schema_version(conn: psycopg.AsyncConnection[Any]) -> int:
    """The newest migration applied (0 on an empty database)."""
    row = await fetch_maybe(conn, "SELECT coalesce(max(version), 0) AS version FROM schema_migrations")
    return int(row["version"]) if row else 0


async def privileged(conn: psycopg.AsyncConnection[Any]) -> bool:
    """True when the connection's role owns tables or bypasses row-level security: tenant isolation rests on RLS,
    which such a role would skip (ADR-0012)."""
    row = await fetch_maybe(
        conn,
        "SELECT r.rolsuper OR r.rolbypassrls OR EXISTS (SELECT 1 FROM pg_tables t"
        " WHERE t.schemaname = 'public' AND t.tableowner = current_user) AS privileged"
        " FROM pg_roles r WHERE r.rolname = current_user",
    )
    return row is not None and bool(row["privileged"])
