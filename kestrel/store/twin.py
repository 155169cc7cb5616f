"""Shadow and command rows (ADR-0013), shared by the API (inside its tenant's RLS transaction) and devicesvc.

Every command transition is one ``UPDATE ... WHERE status IN (predecessors)``: of two racing transitions only
one matches, so a command reaches exactly one terminal state and late or repeated answers change nothing.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import msgspec
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from kestrel_core import shadow
from kestrel_core.errors import Conflict, InvalidInput, PreconditionFailed
from kestrel_core.jsondoc import check_document

TERMINAL: Final = frozenset({"succeeded", "failed", "timed_out", "expired", "cancelled"})
OPEN: Final = ("queued", "sent", "delivered")
#: Which states each state may be reached from.
PREDECESSORS: Final[dict[str, tuple[str, ...]]] = {
    "sent": ("queued", "sent"),
    "delivered": ("queued", "sent"),
    "succeeded": OPEN,
    "failed": OPEN,
    "timed_out": ("sent", "delivered"),
    "expired": ("queued", "sent"),
    "cancelled": OPEN,
}


class Shadow(msgspec.Struct, frozen=True, kw_only=True):
    device_id: str
    name: str
    version: int
    desired: dict[str, Any]
    reported: dict[str, Any]
    delta: dict[str, Any]
    metadata: dict[str, Any]
    updated_at: datetime | None


class Command(msgspec.Struct, frozen=True, kw_only=True):
    command_id: str
    device_id: str
    name: str
    params: dict[str, Any]
    status: str
    timeout_s: int
    expires_at: datetime
    attempts: int
    max_attempts: int
    result: Any
    error: str | None
    created_by: str
    created_at: datetime
    sent_at: datetime | None
    delivered_at: datetime | None
    completed_at: datetime | None


#: A command's parameters: far below the broker's packet limit, as large as a device should have to parse.
COMMAND_PARAMS_MAX_BYTES: Final = 32 * 1024
COMMAND_PARAMS_MAX_DEPTH: Final = 8
COMMAND_COLUMNS: Final = ", ".join(Command.__struct_fields__)
SHADOW_COLUMNS: Final = "device_id, name, version, desired, reported, metadata, updated_at"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_command_id() -> str:
    return "c" + secrets.token_hex(12)


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
    query = f"SELECT {SHADOW_COLUMNS} FROM device_shadows WHERE device_id = %s AND name = %s"  # noqa: S608 - fixed
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
            f"SELECT {SHADOW_COLUMNS} FROM device_shadows WHERE (device_id, name) IN"  # noqa: S608 - fixed columns
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


async def insert_command(
    conn: AsyncConnection[Any],
    tenant: str,
    device: str,
    name: str,
    params: dict[str, Any],
    *,
    timeout_s: int,
    expires_at: datetime,
    max_attempts: int,
    actor: str,
) -> Command:
    """Queue a command (devicesvc is woken by the insert's notification) and record its first event. Parameters
    beyond the command limits are refused (``InvalidInput``/``ContentTooLarge``) before anything is written."""
    check_document(
        params, what="command params", max_depth=COMMAND_PARAMS_MAX_DEPTH, max_bytes=COMMAND_PARAMS_MAX_BYTES,
        reason_prefix="params_",
    )  # fmt: skip
    command_id = new_command_id()
    cur = conn.cursor(row_factory=dict_row)
    row = await (
        await cur.execute(
            "INSERT INTO commands (command_id, tenant_id, device_id, name, params, timeout_s, expires_at, max_attempts,"  # noqa: S608 - fixed columns
            f" created_by) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {COMMAND_COLUMNS}",
            (command_id, tenant, device, name, Jsonb(params), timeout_s, expires_at, max_attempts, actor),
        )
    ).fetchone()
    assert row is not None
    await command_event(conn, tenant, command_id, "queued")
    return Command(**row)


async def command_event(
    conn: AsyncConnection[Any], tenant: str, command_id: str, event: str, detail: dict[str, Any] | None = None
) -> None:
    await conn.execute(
        "INSERT INTO command_events (tenant_id, command_id, event, detail) VALUES (%s, %s, %s, %s)",
        (tenant, command_id, event, Jsonb(detail) if detail is not None else None),
    )


async def transition(
    conn: AsyncConnection[Any], command_id: str, to: str, *, detail: dict[str, Any] | None = None, **fields: Any
) -> Command | None:
    """Move a command to ``to`` if it is in one of its predecessor states; None when it is not (a race lost, a
    duplicate or a late answer). Records the event and stamps the matching ``*_at`` column."""
    sets = ["status = %s", "updated_at = now()"]
    values: list[Any] = [to]
    stamp = {"sent": "sent_at", "delivered": "delivered_at"}.get(to, "completed_at")
    sets.append(f"{stamp} = coalesce({stamp}, now())")
    for column, value in fields.items():
        if column not in ("result", "error", "attempts", "next_attempt_at"):
            raise ValueError(column)
        sets.append(f"{column} = %s")
        values.append(Jsonb(value) if column == "result" else value)
    cur = conn.cursor(row_factory=dict_row)
    row = await (
        await cur.execute(
            f"UPDATE commands SET {', '.join(sets)} WHERE command_id = %s AND status = ANY(%s)"  # noqa: S608
            f" RETURNING tenant_id, {COMMAND_COLUMNS}",
            (*values, command_id, list(PREDECESSORS[to])),
        )
    ).fetchone()
    if row is None:
        return None
    tenant = row.pop("tenant_id")
    await command_event(conn, tenant, command_id, to, detail)
    return Command(**row)
