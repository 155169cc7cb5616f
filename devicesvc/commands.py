"""Commands between the database and devices: fair dispatch with retries, responses, deadlines, and every
transition as a NATS event (ADR-0013)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, Final

from psycopg import AsyncConnection

from devicesvc import decide
from devicesvc.ports import Twin
from kestrel.store import commands
from kestrel.store.rows import fetch_all, fetch_maybe
from kestrel_core.errors import InvalidInput
from kestrel_core.messages.twin import CommandResponse
from kestrel_core.topics import Uplink

log = logging.getLogger("kestrel.devicesvc")
#: Commands due to be sent, in fair rounds: at most ``per_device`` of one device and ``per_tenant`` of one tenant per
#: round, tenants interleaved (the candidates are ranked without locks, then locked with SKIP LOCKED).
DUE_COMMANDS: Final = """
WITH due AS (
    SELECT c.command_id,
           row_number() OVER (PARTITION BY c.device_id ORDER BY c.created_at) AS device_rank,
           row_number() OVER (PARTITION BY c.tenant_id ORDER BY c.created_at) AS tenant_rank
    FROM commands c JOIN device_presence p ON p.device_id = c.device_id
    WHERE p.online AND c.expires_at >= now() + interval '2 seconds' AND (c.status = 'queued'
          OR (c.status = 'sent' AND c.next_attempt_at <= now() AND c.attempts < c.max_attempts)
          OR (c.status = 'delivered' AND c.answer_wanted))
)
SELECT c.command_id, c.tenant_id, c.device_id, c.name, c.params, c.status, c.attempts, c.expires_at
FROM commands c JOIN due USING (command_id)
WHERE due.device_rank <= %(per_device)s AND due.tenant_rank <= %(per_tenant)s
ORDER BY due.tenant_rank, c.created_at
LIMIT %(batch)s
FOR UPDATE OF c SKIP LOCKED
"""
#: How each deadline is computed, for the state it moves a command to.
DEADLINES: Final = (("expired", "expires_at"), ("timed_out", "sent_at + make_interval(secs => timeout_s)"))


async def record_response(twin: Twin, uplink: Uplink, response: CommandResponse) -> None:
    """A device's answer moves its command on; a late or repeated one is recorded and changes nothing."""
    command_id = uplink.arg
    async with twin.pool.connection() as conn, conn.transaction():
        row = await fetch_maybe(
            conn,
            "SELECT tenant_id, device_id, status FROM commands WHERE command_id = %s FOR UPDATE",
            (command_id,),
        )
        if row is None or row["tenant_id"] != uplink.tenant or row["device_id"] != uplink.device:
            # Unknown, or another device's command: the same answer, so nothing is learnt from it.
            raise InvalidInput("unknown_command", "no such command for this device")
        fields: dict[str, Any] = {}
        if response.status != "delivered":
            fields = {"result": response.result, "error": response.error}
        moved = await commands.transition(conn, command_id, response.status, **fields)
        if moved is None:
            late = row["status"] in commands.TERMINAL
            await commands.command_event(
                conn, uplink.tenant, command_id, "late_response" if late else "duplicate_response",
                {"status": response.status},
            )  # fmt: skip
        await conn.execute("UPDATE device_presence SET last_seen = now() WHERE device_id = %s", (uplink.device,))
    if moved is not None:
        twin.metrics.commands.labels(response.status).inc()


async def _send(twin: Twin, conn: AsyncConnection[Any], row: dict[str, Any], now: datetime) -> None:
    message = decide.command_message(row, now)
    if (error := decide.too_large(message, twin.devices.max_packet_bytes)) is not None:
        await commands.transition(conn, row["command_id"], "failed", error=error, detail={"reason": "too_large"})
        twin.metrics.commands.labels("failed").inc()
        log.warning(
            "command too large for the broker; failed", extra={"command": row["command_id"], "bytes": message.size}
        )
        return
    twin.devices.publish(
        message.topic,
        message.payload,
        response_topic=message.response_topic,
        correlation_data=message.correlation,
        message_expiry_interval=message.expiry_s,
        user_property=message.properties,
        content_type=decide.CONTENT_TYPE,
        payload_format_id=1,
    )
    twin.metrics.published.labels("command").inc()
    next_at = decide.next_attempt(now, row["attempts"], twin.settings.retry_base_s)
    if row["status"] == "queued":
        await commands.transition(conn, row["command_id"], "sent", attempts=message.attempt, next_attempt_at=next_at)
        twin.metrics.commands.labels("sent").inc()
    elif row["status"] == "delivered":  # asked for its answer once, until the device connects again
        await conn.execute(
            "UPDATE commands SET attempts = attempts + 1, answer_wanted = false, updated_at = now()"
            " WHERE command_id = %s",
            (row["command_id"],),
        )
        await commands.command_event(
            conn, row["tenant_id"], row["command_id"], "answer_requested", {"attempt": message.attempt}
        )
    else:
        await conn.execute(
            "UPDATE commands SET attempts = attempts + 1, next_attempt_at = %s, updated_at = now()"
            " WHERE command_id = %s",
            (next_at, row["command_id"]),
        )
        await commands.command_event(conn, row["tenant_id"], row["command_id"], "retry", {"attempt": message.attempt})


async def dispatch(twin: Twin) -> int:
    """Send queued commands to connected devices; re-send unacknowledged ones whose backoff elapsed; ask a device
    that connected again for the answers to its delivered commands (they may have been lost with the connection).

    Fair: each round takes at most ``per_device`` commands of one device and ``per_tenant`` of one tenant, in
    rounds across tenants, so no device or tenant with a backlog delays another's commands. A command the broker
    could never carry (its packet above the broker's maximum) fails at once with the reason, instead of being
    published: the broker would drop devicesvc's connection, and every other command with it (issue 10).
    """
    if not twin.devices.connected:
        return 0
    settings = twin.settings
    async with twin.pool.connection() as conn, conn.transaction():
        rows = await fetch_all(
            conn, DUE_COMMANDS, {"per_device": settings.per_device, "per_tenant": settings.per_tenant, "batch": 500}
        )
        now = datetime.now(UTC)
        for row in rows:
            await _send(twin, conn, row, now)
    return len(rows)


async def expire(twin: Twin) -> None:
    """Commands past their expiry before delivery, and commands past their timeout once sent."""
    async with twin.pool.connection() as conn, conn.transaction():
        for status, deadline in DEADLINES:
            rows = await fetch_all(
                conn,
                f"WITH moved AS (UPDATE commands SET status = %s, completed_at = now(), updated_at = now()"  # noqa: S608 - fixed deadlines
                f" WHERE status = ANY(%s) AND {deadline} <= now() RETURNING tenant_id, command_id)"
                f" INSERT INTO command_events (tenant_id, command_id, event)"
                f" SELECT tenant_id, command_id, %s FROM moved RETURNING command_id",
                (status, list(commands.PREDECESSORS[status]), status),
            )
            if rows:
                twin.metrics.commands.labels(status).inc(len(rows))
