"""Commands (ADR-0013): queued by the API and the CLI (audited), moved through their states by devicesvc.

Every transition is one ``UPDATE ... WHERE status IN (predecessors)``: of two racing transitions only one matches,
so a command reaches exactly one terminal state and late or repeated answers change nothing.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import msgspec
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from kestrel.store import audit, devices
from kestrel.store.rows import fetch_all, fetch_one
from kestrel.store.session import Actor
from kestrel_core.errors import Conflict
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


def new_command_id() -> str:
    return "c" + secrets.token_hex(12)


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
            "INSERT INTO commands (command_id, tenant_id, device_id, name, params, timeout_s, expires_at, max_attempts,"
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
            f"UPDATE commands SET {', '.join(sets)} WHERE command_id = %s AND status = ANY(%s)"
            f" RETURNING tenant_id, {COMMAND_COLUMNS}",
            (*values, command_id, list(PREDECESSORS[to])),
        )
    ).fetchone()
    if row is None:
        return None
    tenant = row.pop("tenant_id")
    await command_event(conn, tenant, command_id, to, detail)
    return Command(**row)


async def send(
    conn: AsyncConnection[Any],
    actor: Actor,
    tenant: str,
    device: str,
    name: str,
    params: dict[str, Any],
    *,
    timeout_s: int,
    expires_in_s: int,
    max_attempts: int,
) -> Command:
    """Queue a command for a device that is not suspended or decommissioned (it waits for an offline one until
    it expires); audited."""
    found = await devices.get(conn, tenant, device)
    if found["status"] in ("suspended", "decommissioned"):
        raise Conflict(f"device {device} is {found['status']}")
    command = await insert_command(
        conn, tenant, device, name, params, timeout_s=timeout_s,
        expires_at=datetime.now(UTC) + timedelta(seconds=expires_in_s), max_attempts=max_attempts, actor=actor.name,
    )  # fmt: skip
    request = {"name": name, "params": params, "timeout_s": timeout_s, "expires_in_s": expires_in_s,
               "max_attempts": max_attempts}  # fmt: skip
    await audit.record(
        conn, actor, tenant, "command.create", f"device:{device}/command:{command.command_id}", after=request
    )
    return command


async def page(
    conn: AsyncConnection[Any], tenant: str, device: str, *, status: str | None, limit: int
) -> list[Command]:
    """A device's commands, newest first."""
    await devices.get(conn, tenant, device)
    rows = await fetch_all(
        conn,
        f"SELECT {COMMAND_COLUMNS} FROM commands WHERE device_id = %s AND tenant_id = %s"
        " AND (%s::text IS NULL OR status = %s) ORDER BY created_at DESC LIMIT %s",
        (device, tenant, status, status, limit),
    )
    return [Command(**r) for r in rows]


async def detail(conn: AsyncConnection[Any], tenant: str, command_id: str) -> tuple[Command, list[dict[str, Any]]]:
    """A command and every state it went through (``NotFound`` for another tenant's)."""
    row = await fetch_one(
        conn,
        f"SELECT {COMMAND_COLUMNS} FROM commands WHERE command_id = %s AND tenant_id = %s",
        (command_id, tenant),
        f"command {command_id} not found",
    )
    events = await fetch_all(
        conn,
        "SELECT event, detail, at FROM command_events WHERE command_id = %s AND tenant_id = %s ORDER BY id",
        (command_id, tenant),
    )
    return Command(**row), events


async def cancel(conn: AsyncConnection[Any], actor: Actor, tenant: str, command_id: str) -> None:
    """Cancel a command that has not ended (``Conflict`` when it has); audited."""
    before, _ = await detail(conn, tenant, command_id)
    if await transition(conn, command_id, "cancelled", detail={"by": actor.name}) is None:
        raise Conflict(f"command {command_id} already ended ({before.status})")
    await audit.record(conn, actor, tenant, "command.cancel", f"command:{command_id}")


async def tenant_of(conn: AsyncConnection[Any], command_id: str) -> str:
    """The tenant a command belongs to (the operator addresses commands by id alone)."""
    row = await fetch_one(
        conn,
        "SELECT tenant_id FROM commands WHERE command_id = %s",
        (command_id,),
        f"command {command_id} does not exist",
    )
    return str(row["tenant_id"])
