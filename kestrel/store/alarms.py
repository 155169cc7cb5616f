"""Alarms as people handle them (issue 13): list and filter, acknowledge, clear by hand, comment, read the history
and the notification log. The rule workers raise and clear them (``rules.effects``); every transition is a row of
``alarm_events``, the outbox of the NATS events, so the workers publish people's transitions too (woken by
``kestrel_alarms``)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Final

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from kestrel.store import audit
from kestrel.store.rows import fetch_all, fetch_one
from kestrel.store.session import Actor

COLUMNS: Final = (
    "alarm_id, rule_id, rule_name, device_id, severity, status, acknowledged, raised_at, raised_values, retriggers,"
    " acknowledged_at, acknowledged_by, cleared_at, cleared_by, cleared_values, version, updated_at"
)
NOTIFY: Final = "kestrel_alarms"


async def page(
    conn: AsyncConnection[Any],
    tenant: str,
    *,
    status: str | None = None,
    severity: str | None = None,
    acknowledged: bool | None = None,
    device: str | None = None,
    group: str | None = None,
    rule: str | None = None,
    before: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Newest first (by alarm id within a raise time); ``before``: the last alarm id of the previous page."""
    return await fetch_all(
        conn,
        f"SELECT {COLUMNS} FROM alarms a WHERE tenant_id = %(tenant)s"
        " AND (%(status)s::text IS NULL OR status = %(status)s)"
        " AND (%(severity)s::text IS NULL OR severity = %(severity)s)"
        " AND (%(ack)s::boolean IS NULL OR acknowledged = %(ack)s)"
        " AND (%(device)s::text IS NULL OR device_id = %(device)s)"
        " AND (%(rule)s::text IS NULL OR rule_id = %(rule)s)"
        " AND (%(group)s::text IS NULL OR EXISTS (SELECT 1 FROM device_group_members m WHERE m.tenant_id = a.tenant_id"
        "      AND m.group_id = %(group)s AND m.device_id = a.device_id))"
        " AND (%(before)s::text IS NULL OR (raised_at, alarm_id) < (SELECT raised_at, alarm_id FROM alarms"
        "      WHERE tenant_id = %(tenant)s AND alarm_id = %(before)s))"
        " ORDER BY raised_at DESC, alarm_id DESC LIMIT %(limit)s",
        {"tenant": tenant, "status": status, "severity": severity, "ack": acknowledged, "device": device,
         "rule": rule, "group": group, "before": before, "limit": limit},
    )  # fmt: skip


async def get(conn: AsyncConnection[Any], tenant: str, alarm_id: str, *, lock: bool = False) -> dict[str, Any]:
    return await fetch_one(
        conn,
        f"SELECT {COLUMNS} FROM alarms WHERE tenant_id = %s AND alarm_id = %s" + (" FOR UPDATE" if lock else ""),
        (tenant, alarm_id),
        f"alarm {alarm_id} not found",
    )


async def record_event(
    conn: AsyncConnection[Any],
    tenant: str,
    alarm_id: str,
    event: str,
    actor: str,
    values: object = None,
    at: datetime | None = None,
) -> int:
    """Append a transition (at ``at``, default now) to the history and the NATS outbox; returns its id (the events'
    ``Nats-Msg-Id``)."""
    row = await fetch_one(
        conn,
        'INSERT INTO alarm_events (alarm_id, tenant_id, event, actor, "values", at)'
        " VALUES (%s, %s, %s, %s, %s, coalesce(%s, now())) RETURNING id",
        (alarm_id, tenant, event, actor, Jsonb(values if values is not None else {}), at),
        "alarm event not recorded",
    )
    await conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY, alarm_id))
    return int(row["id"])


#: What a person does to an alarm: (whether it is done already, the change, the event, the audit action).
_BY_HAND: Final[dict[str, tuple[Callable[[dict[str, Any]], bool], str, str, str]]] = {
    "acknowledge": (lambda a: bool(a["acknowledged"]),
                    "acknowledged = true, acknowledged_at = now(), acknowledged_by = %s", "acknowledged",
                    "alarm.acknowledge"),
    "clear": (lambda a: a["status"] == "cleared", "status = 'cleared', cleared_at = now(), cleared_by = %s", "cleared",
              "alarm.clear"),
}  # fmt: skip


async def _by_hand(conn: AsyncConnection[Any], actor: Actor, tenant: str, alarm_id: str, what: str) -> dict[str, Any]:
    done, change, event, action = _BY_HAND[what]
    before = await get(conn, tenant, alarm_id, lock=True)
    if done(before):
        return before  # idempotent: a second acknowledgement or clear changes nothing
    await conn.execute(
        f"UPDATE alarms SET {change}, version = version + 1, updated_at = now() WHERE tenant_id = %s AND alarm_id = %s",
        (actor.name, tenant, alarm_id),
    )
    await record_event(conn, tenant, alarm_id, event, actor.name)
    await audit.record(conn, actor, tenant, action, f"alarm:{alarm_id}")
    return await get(conn, tenant, alarm_id)


async def acknowledge(conn: AsyncConnection[Any], actor: Actor, tenant: str, alarm_id: str) -> dict[str, Any]:
    """Acknowledge (idempotent: an acknowledged alarm stays as it was)."""
    return await _by_hand(conn, actor, tenant, alarm_id, "acknowledge")


async def clear(conn: AsyncConnection[Any], actor: Actor, tenant: str, alarm_id: str) -> dict[str, Any]:
    """Clear by hand (idempotent). The rule may raise a new alarm later if its condition holds again."""
    return await _by_hand(conn, actor, tenant, alarm_id, "clear")


async def comment(conn: AsyncConnection[Any], actor: Actor, tenant: str, alarm_id: str, body: str) -> dict[str, Any]:
    await get(conn, tenant, alarm_id)
    row = await fetch_one(
        conn,
        "INSERT INTO alarm_comments (alarm_id, tenant_id, author, body) VALUES (%s, %s, %s, %s)"
        " RETURNING id, author, body, created_at",
        (alarm_id, tenant, actor.name, body),
        "comment not recorded",
    )
    await record_event(conn, tenant, alarm_id, "commented", actor.name, {"comment_id": row["id"]})
    return row


async def history(conn: AsyncConnection[Any], tenant: str, alarm_id: str) -> dict[str, list[dict[str, Any]]]:
    """The alarm's transitions, comments and notification deliveries, oldest first."""
    await get(conn, tenant, alarm_id)
    args = (tenant, alarm_id)
    return {
        "events": await fetch_all(
            conn,
            'SELECT id, event, actor, at, "values" FROM alarm_events WHERE tenant_id = %s AND alarm_id = %s'
            " ORDER BY id",
            args,
        ),
        "comments": await fetch_all(
            conn,
            "SELECT id, author, body, created_at FROM alarm_comments WHERE tenant_id = %s AND alarm_id = %s"
            " ORDER BY id",
            args,
        ),
        "deliveries": await fetch_all(
            conn,
            "SELECT delivery_id, channel_id, event_id, status, attempts, last_error, created_at, delivered_at"
            " FROM deliveries WHERE tenant_id = %s AND alarm_id = %s ORDER BY created_at, delivery_id",
            args,
        ),
    }
