"""Journals published in order: tables of events (command transitions, lifecycle changes) that devicesvc publishes on
NATS after a cursor kept in ``twin_cursors``; one replica at a time holds a cursor (SKIP LOCKED), and each event's
row id is its ``Nats-Msg-Id``, so a publish repeated after a crash is dropped by the stream."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from devicesvc import decide
from devicesvc.ports import Twin
from kestrel.store.rows import fetch_all, fetch_maybe
from kestrel_core.messages.twin import CommandEvent, LifecycleEvent, TwinEvent


def _command(row: dict[str, Any]) -> TwinEvent:
    return CommandEvent(
        tenant=row["tenant_id"], device=row["device_id"], command_id=row["command_id"], event=row["event"],
        status=row["status"], detail=row["detail"], at=decide.ms(row["at"]) or 0,
    )  # fmt: skip


def _lifecycle(row: dict[str, Any]) -> TwinEvent:
    return LifecycleEvent(tenant=row["tenant_id"], device=row["device_id"], status=row["status"],
                          previous=row["previous"], at=decide.ms(row["at"]) or 0)  # fmt: skip


#: cursor name -> (rows after the cursor, in id order; the event of a row; the message id's prefix)
JOURNALS: Final[dict[str, tuple[str, Callable[[dict[str, Any]], TwinEvent], str]]] = {
    "command_events": (
        "SELECT e.id, e.tenant_id, c.device_id, e.command_id, e.event, e.detail, e.at, c.status"
        " FROM command_events e JOIN commands c USING (command_id) WHERE e.id > %s ORDER BY e.id LIMIT 1000",
        _command,
        "command-event",
    ),
    "lifecycle_events": (
        "SELECT id, tenant_id, device_id, status, previous, at FROM lifecycle_events WHERE id > %s"
        " ORDER BY id LIMIT 1000",
        _lifecycle,
        "lifecycle-event",
    ),
}


async def publish(twin: Twin, name: str) -> int:
    """Publish the journal's rows after its cursor; 0 when another replica holds the cursor."""
    query, to_event, prefix = JOURNALS[name]
    async with twin.pool.connection() as conn, conn.transaction():
        await conn.execute("INSERT INTO twin_cursors (name) VALUES (%s) ON CONFLICT DO NOTHING", (name,))
        cursor = await fetch_maybe(
            conn, "SELECT last_id FROM twin_cursors WHERE name = %s FOR UPDATE SKIP LOCKED", (name,)
        )
        if cursor is None:
            return 0
        rows = await fetch_all(conn, query, (cursor["last_id"],))
        for row in rows:
            await twin.events.publish(to_event(row), f"{prefix}:{row['id']}")
        if rows:
            await conn.execute("UPDATE twin_cursors SET last_id = %s WHERE name = %s", (rows[-1]["id"], name))
    return len(rows)
