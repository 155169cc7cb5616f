"""Shadows (ADR-0013): desired and reported state per device and name, versioned, with their history. Shared by the
API and the CLI (desired state, audited) and devicesvc (reported state, many shadows per transaction).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import msgspec
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from kestrel.store import audit, devices
from kestrel.store.rows import fetch_all
from kestrel.store.session import Actor
from kestrel_core import shadow
from kestrel_core.errors import Conflict, InvalidInput, PreconditionFailed

SHADOW_COLUMNS: Final = "device_id, name, version, desired, reported, metadata, updated_at"


class Shadow(msgspec.Struct, frozen=True, kw_only=True):
    device_id: str
    name: str
    version: int
    desired: dict[str, Any]
    reported: dict[str, Any]
    delta: dict[str, Any]
    metadata: dict[str, Any]
    updated_at: datetime | None


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _shadow(row: dict[str, Any]) -> Shadow:
    return Shadow(**row, delta=shadow.delta(row["desired"], row["reported"]))


def empty_shadow(device: str, name: str) -> Shadow:
    return Shadow(
        device_id=device,
        name=name,
        version=0,
        desired={},
        reported={},
        delta={},
        metadata={"desired": {}, "reported": {}},
        updated_at=None,
    )


async def read_shadow(conn: AsyncConnection[Any], device: str, name: str) -> Shadow | None:
    query = f"SELECT {SHADOW_COLUMNS} FROM device_shadows WHERE device_id = %s AND name = %s"
    cur = conn.cursor(row_factory=dict_row)
    row = await (await cur.execute(query, (device, name))).fetchone()
    return None if row is None else _shadow(row)


@dataclass(frozen=True)
class Patch:
    """One merge patch to one side of one shadow."""

    tenant: str
    device: str
    name: str
    side: str  # "desired" or "reported"
    patch: dict[str, Any]
    ts_ms: int
    actor: str
    #: The version the caller computed this from: ``Conflict`` (409) if the shadow moved on.
    expected_version: int | None = None
    #: The version an ``If-Match`` named: ``PreconditionFailed`` (412) if the shadow moved on.
    if_match: int | None = None


async def apply_patches(conn: AsyncConnection[Any], patches: list[Patch]) -> list[tuple[Shadow, bool] | InvalidInput]:
    """Apply patches in order, many shadows at once: rows locked in one statement (in key order, so concurrent
    callers never deadlock), written back in one pipeline with one history row per change. Desired: last writer
    wins, optionally versioned (``Conflict``); reported: guarded by the device's timestamps. Returns, per patch,
    the shadow after it and whether it changed anything, or the ``InvalidInput`` (too large, too deep) that
    refused it alone."""
    keys = sorted({(p.device, p.name, p.tenant) for p in patches})
    await conn.execute(
        "INSERT INTO device_shadows (device_id, name, tenant_id) SELECT * FROM unnest(%s::text[], %s::text[],"
        " %s::text[]) ON CONFLICT DO NOTHING",
        ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]),
    )
    cur = conn.cursor(row_factory=dict_row)
    rows = await (
        await cur.execute(
            f"SELECT {SHADOW_COLUMNS} FROM device_shadows WHERE (device_id, name) IN"
            " (SELECT * FROM unnest(%s::text[], %s::text[])) ORDER BY device_id, name FOR UPDATE",
            ([k[0] for k in keys], [k[1] for k in keys]),
        )
    ).fetchall()
    current = {(r["device_id"], r["name"]): r for r in rows}
    results: list[tuple[Shadow, bool] | InvalidInput] = []
    history: list[tuple[Any, ...]] = []
    dirty: set[tuple[str, str]] = set()
    for p in patches:
        row = current[(p.device, p.name)]
        if p.if_match is not None and p.if_match != row["version"]:
            raise PreconditionFailed(f"shadow of {p.device} changed since it was read (now version {row['version']})")
        if p.expected_version is not None and p.expected_version != row["version"]:
            raise Conflict(f"shadow of {p.device} is at version {row['version']}, not {p.expected_version}")
        try:
            doc, meta, changed = shadow.merge(
                row[p.side], row["metadata"].get(p.side, {}), p.patch, p.ts_ms, guard=p.side == "reported"
            )
        except InvalidInput as exc:
            results.append(exc)
            continue
        if changed:
            row = current[(p.device, p.name)] = {
                **row,
                p.side: doc,
                "metadata": {**row["metadata"], p.side: meta},
                "version": row["version"] + 1,
            }
            history.append((p.tenant, p.device, p.name, row["version"], p.side, Jsonb(p.patch), p.actor))
            dirty.add((p.device, p.name))
        results.append((_shadow(row), changed))
    if dirty:
        async with conn.cursor() as write:
            await write.executemany(
                "UPDATE device_shadows SET desired = %s, reported = %s, metadata = %s, version = %s,"
                " updated_at = now() WHERE device_id = %s AND name = %s",
                [
                    (Jsonb(r["desired"]), Jsonb(r["reported"]), Jsonb(r["metadata"]), r["version"], *key)
                    for key in sorted(dirty)
                    for r in (current[key],)
                ],
            )
            await write.executemany(
                "INSERT INTO shadow_history (tenant_id, device_id, name, version, side, patch, actor)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                history,
            )
    return results


async def update_shadow(
    conn: AsyncConnection[Any],
    tenant: str,
    device: str,
    name: str,
    side: str,
    patch: dict[str, Any],
    *,
    ts_ms: int,
    actor: str,
    expected_version: int | None = None,
    if_match: int | None = None,
) -> tuple[Shadow, bool]:
    """One patch (the API's and the CLI's desired state): the shadow after it, and whether it changed."""
    change = Patch(tenant, device, name, side, patch, ts_ms, actor, expected_version, if_match)
    (result,) = await apply_patches(conn, [change])
    if isinstance(result, InvalidInput):
        raise result
    return result


async def set_desired(
    conn: AsyncConnection[Any],
    actor: Actor,
    tenant: str,
    device: str,
    name: str,
    patch: dict[str, Any],
    *,
    expected_version: int | None = None,
    if_match: int | None = None,
) -> Shadow:
    """Merge ``patch`` into the desired state (devicesvc delivers the delta); audited when it changed anything."""
    found = await devices.get(conn, tenant, device)
    if found["status"] == "decommissioned":
        raise Conflict(f"device {device} is decommissioned")
    updated, changed = await update_shadow(
        conn, tenant, device, name, "desired", patch, ts_ms=now_ms(), actor=actor.name,
        expected_version=expected_version, if_match=if_match,
    )  # fmt: skip
    if changed:
        after = {"desired": patch, "version": expected_version}
        await audit.record(conn, actor, tenant, "shadow.desired", f"device:{device}/shadow:{name}", after=after)
    return updated


async def get(conn: AsyncConnection[Any], tenant: str, device: str, name: str) -> Shadow:
    """A device's shadow (version 0 and empty when it has none); ``NotFound`` for another tenant's device."""
    await devices.get(conn, tenant, device)
    return await read_shadow(conn, device, name) or empty_shadow(device, name)


async def history(
    conn: AsyncConnection[Any], tenant: str, device: str, name: str, *, limit: int
) -> list[dict[str, Any]]:
    """Changes of one shadow, newest first."""
    await devices.get(conn, tenant, device)
    return await fetch_all(
        conn,
        "SELECT version, side, patch, actor, at FROM shadow_history WHERE device_id = %s AND name = %s"
        " AND tenant_id = %s ORDER BY id DESC LIMIT %s",
        (device, name, tenant, limit),
    )
