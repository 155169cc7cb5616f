"""Revocations reach live sessions from a durable journal (ADR-0010, issue 12).

Every identity change that can withdraw a credential is journalled in ``identity_events`` by the changing
transaction (migrations 0006 and 0013) and announced on channel ``kestrel_identity``. A notification is only a
prompt: authsvc kicks what the journal holds after the shared cursor ``kicks``, and advances the cursor only once
the kick succeeded. It reads the journal on every notification, whenever its listener (re)connects and every
``sweep_s`` seconds, so a revocation committed while authsvc or its notification connection was down is enforced
when it returns. Replicas share the cursor (``FOR UPDATE SKIP LOCKED``): one of them kicks each change.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from authsvc.revocation import CachedIdentity
from kestrel.runtime.mqttclient import MqttError
from kestrel.store.rows import fetch_all, fetch_maybe
from kestrel_core.retry import Backoff

log = logging.getLogger("kestrel.authsvc")
CHANNEL = "kestrel_identity"
CURSOR = "kicks"
#: The notification connection's application_name (operators and the outage test find it by this name).
LISTENER = "kestrel-authsvc-listen"
BATCH = 1000
SWEEP_S = 5.0
#: Journal rows behind every cursor are kept this long (for an operator reading what was revoked when).
KEEP = "1 day"

Kicker = Callable[[list[str], list[str]], Awaitable[None]]


async def targets(conn: psycopg.AsyncConnection[Any], event: dict[str, Any]) -> tuple[set[str], set[str]]:
    """Client ids and usernames to disconnect for one journalled change (the journal holds withdrawals only)."""
    scope = event.get("scope")
    if scope == "device":
        return {str(event["device"])}, set()
    if scope == "service":
        return set(), {str(event["service"])}
    if scope == "tenant":
        rows = await fetch_all(conn, "SELECT device_id FROM devices WHERE tenant_id = %s", (event["tenant"],))
        return {r["device_id"] for r in rows}, set()
    if scope == "all":
        rows = await fetch_all(conn, "SELECT device_id FROM devices")
        return {r["device_id"] for r in rows}, set()
    log.warning("identity change of an unknown scope ignored", extra={"scope": str(scope)[:32]})
    return set(), set()


async def catch_up(conn: psycopg.AsyncConnection[Any], kick: Kicker) -> int:
    """Kick the targets of every journalled change after the cursor; returns how many changes were handled (0 when
    another replica holds the cursor: it does the work). A failed kick raises and leaves the cursor where it was."""
    handled = 0
    while True:
        async with conn.transaction():
            cursor = await fetch_maybe(
                conn, "SELECT last_id FROM identity_cursors WHERE name = %s FOR UPDATE SKIP LOCKED", (CURSOR,)
            )
            if cursor is None:
                return handled
            events = await fetch_all(
                conn,
                "SELECT id, event FROM identity_events WHERE id > %s ORDER BY id LIMIT %s",
                (cursor["last_id"], BATCH),
            )
            if not events:
                return handled
            clientids: set[str] = set()
            usernames: set[str] = set()
            for row in events:
                more_clients, more_users = await targets(conn, row["event"])
                clientids |= more_clients
                usernames |= more_users
            if clientids or usernames:
                await kick(sorted(clientids), sorted(usernames))
            await conn.execute(
                "UPDATE identity_cursors SET last_id = %s, updated_at = now() WHERE name = %s",
                (events[-1]["id"], CURSOR),
            )
            await conn.execute(
                "DELETE FROM identity_events WHERE id <= (SELECT min(last_id) FROM identity_cursors)"
                " AND at < now() - %s::interval",
                (KEEP,),
            )
        handled += len(events)
        log.info("identity changes enforced", extra={"changes": len(events), "kicked": len(clientids) + len(usernames)})
        if len(events) < BATCH:
            return handled


async def _enforce(conn: psycopg.AsyncConnection[Any], kick: Kicker | None) -> None:
    if kick is None:
        return
    try:
        await catch_up(conn, kick)
    except (MqttError, OSError):
        log.exception("could not disconnect revoked clients; retrying at the next sweep")


async def follow_identity_changes(
    database_url: str,
    cache: CachedIdentity,
    kick: Kicker | None,
    retry_s: float = 1.0,
    sweep_s: float = SWEEP_S,
) -> None:
    """Run until cancelled: LISTEN, invalidate the cache, enforce from the journal. Reconnects with back-off; the
    cache is off while the notification connection is down."""
    backoff = Backoff(base_s=retry_s, cap_s=10 * retry_s)
    connect = psycopg.AsyncConnection.connect
    failures = 0
    while True:
        try:
            async with (
                await connect(database_url, autocommit=True, application_name=LISTENER) as listen,
                await connect(database_url, autocommit=True) as query,
            ):
                await listen.execute(f"LISTEN {CHANNEL}")
                cache.clear()
                cache.enabled = True
                failures = 0
                log.info("listening for identity changes")
                await _enforce(query, kick)
                while True:
                    async for note in listen.notifies(timeout=sweep_s, stop_after=1):
                        cache.clear()
                        _log_change(note.payload)
                    await listen.execute("SELECT 1")  # a dead listener must not look like a quiet one
                    await _enforce(query, kick)
        except (psycopg.Error, OSError) as exc:
            log.warning("identity listener lost the database; cache off", extra={"error": str(exc)})
        cache.enabled = False
        cache.clear()
        failures += 1
        await asyncio.sleep(backoff.delay(failures))


def _log_change(payload: str) -> None:
    try:
        event = json.loads(payload)
    except ValueError:
        log.warning("unreadable identity notification (the journal is read anyway)")
        return
    log.info("identity changed", extra={"scope": event.get("scope"), "status": event.get("status")})
