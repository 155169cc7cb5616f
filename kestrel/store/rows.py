"""Rows by name: every storage function reads ``dict`` rows (``dict_row``), never ``row[n]``."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection, sql
from psycopg.abc import Params
from psycopg.rows import dict_row

from kestrel_core.errors import NotFound

Query = str | sql.SQL | sql.Composed


async def fetch_all(conn: AsyncConnection[Any], query: Query, params: Params | None = None) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=dict_row)
    return await (await cur.execute(query, params)).fetchall()


async def fetch_maybe(conn: AsyncConnection[Any], query: Query, params: Params | None = None) -> dict[str, Any] | None:
    cur = conn.cursor(row_factory=dict_row)
    return await (await cur.execute(query, params)).fetchone()


async def fetch_one(conn: AsyncConnection[Any], query: Query, params: Params | None, missing: str) -> dict[str, Any]:
    """The first row; ``NotFound(missing)`` when there is none."""
    row = await fetch_maybe(conn, query, params)
    if row is None:
        raise NotFound(missing)
    return row
