"""Retention: history older than ``history_days`` is deleted in chunks, so no transaction grows large. The current
state (shadows, presence, open commands) is never pruned."""

from __future__ import annotations

import logging
from typing import Final

from devicesvc.ports import Twin

log = logging.getLogger("kestrel.devicesvc")
#: Retention statements: (days, chunk). Command events go before their commands (foreign key).
PRUNE: Final = (
    "DELETE FROM shadow_history WHERE id IN (SELECT id FROM shadow_history"
    " WHERE at < now() - make_interval(days => %s) LIMIT %s)",
    "DELETE FROM device_connections WHERE ctid IN (SELECT ctid FROM device_connections"
    " WHERE disconnected_at < now() - make_interval(days => %s) LIMIT %s)",
    "DELETE FROM command_events WHERE id IN (SELECT e.id FROM command_events e JOIN commands c USING (command_id)"
    " WHERE c.completed_at < now() - make_interval(days => %s) LIMIT %s)",
    "DELETE FROM lifecycle_events WHERE id IN (SELECT id FROM lifecycle_events WHERE at < now()"
    " - make_interval(days => %s) AND id <= (SELECT coalesce(max(last_id), 0) FROM twin_cursors"
    " WHERE name = 'lifecycle_events') LIMIT %s)",
    "DELETE FROM commands WHERE command_id IN (SELECT command_id FROM commands c WHERE completed_at < now()"
    " - make_interval(days => %s) AND NOT EXISTS (SELECT 1 FROM command_events e WHERE e.command_id = c.command_id)"
    " LIMIT %s)",
)


async def prune(twin: Twin, chunk: int = 10_000) -> int:
    deleted = 0
    for statement in PRUNE:
        while True:
            async with twin.pool.connection() as conn, conn.transaction():
                cur = await conn.execute(statement, (twin.settings.history_days, chunk))
                deleted += cur.rowcount
            if cur.rowcount < chunk:
                break
    if deleted:
        log.info("history pruned", extra={"rows": deleted, "older_than_days": twin.settings.history_days})
    return deleted
