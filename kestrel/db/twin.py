"""Shadow and command rows (ADR-0013), shared by the API (inside its tenant's RLS transaction) and devicesvc.

Every command transition is one ``UPDATE ... WHERE status IN (predecessors)``: of two racing transitions only
one matches, so a command reaches exactly one terminal state and late or repeated answers change nothing.
"""

from __future__ import annotations

import secrets
import time
from datetime import datetime
from typing import Any, Final

import msgspec
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from kestrel import shadow
from kestrel.errors import Conflict

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


async def read_shadow(conn: AsyncConnection[Any], device: str, name: str, *, lock: bool = False) -> Shadow | None:
    query = f"SELECT {SHADOW_COLUMNS} FROM device_shadows WHERE device_id = %s AND name = %s"  # noqa: S608 - fixed
    cur = conn.cursor(row_factory=dict_row)
    row = await (await cur.execute(query + (" FOR UPDATE" if lock else ""), (device, name))).fetchone()
    return None if row is None else _shadow(row)


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
) -> tuple[Shadow, bool]:
    """Merge ``patch`` into one side (desired: last writer wins, optionally versioned; reported: guarded by the
    device's timestamps). Returns the new shadow and whether anything changed."""
    await conn.execute(
        "INSERT INTO device_shadows (tenant_id, device_id, name) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
        (tenant, device, name),
    )
    current = await read_shadow(conn, device, name, lock=True)
    assert current is not None
    if expected_version is not None and expected_version != current.version:
        raise Conflict(f"shadow of {device} is at version {current.version}, not {expected_version}")
    doc, meta, changed = shadow.merge(
        getattr(current, side), current.metadata.get(side, {}), patch, ts_ms, guard=side == "reported"
    )
    if not changed:
        return current, False
    metadata = {**current.metadata, side: meta}
    cur = conn.cursor(row_factory=dict_row)
    row = await (
        await cur.execute(
            f"UPDATE device_shadows SET {side} = %s, metadata = %s, version = version + 1, updated_at = now()"  # noqa: S608
            f" WHERE device_id = %s AND name = %s RETURNING {SHADOW_COLUMNS}",
            (Jsonb(doc), Jsonb(metadata), device, name),
        )
    ).fetchone()
    assert row is not None
    await conn.execute(
        "INSERT INTO shadow_history (tenant_id, device_id, name, version, side, patch, actor)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (tenant, device, name, row["version"], side, Jsonb(patch), actor),
    )
    return _shadow(row), True


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
    """Queue a command (devicesvc is woken by the insert's notification) and record its first event."""
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
