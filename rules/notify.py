"""Notification delivery (issue 13, ADR-0019): deliveries are claimed in short transactions (``SKIP LOCKED``, so
workers share them, with a lease so a crashed worker's claim returns), then sent one task each, a bounded number in
flight, so a receiver that hangs holds one slot for at most the timeout and never the others. Outcomes: delivered;
retried with jittered exponential backoff; dead after the last attempt (or at once when no retry can help), with the
reason in the log. Per-channel rate limit: past ``per_minute`` deliveries in the last minute, an alarm's delivery is
folded into the channel's open digest instead of being sent; the first fold opens it and it goes out one window
later (a storm becomes one message). One alarm's notifications reach a channel in the order of its transitions (a
clear never overtakes its raise)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import msgspec
import psycopg
from psycopg.types.json import Jsonb

from kestrel.store.rows import fetch_all
from kestrel_core.messages.alarms import AlarmEvent
from kestrel_core.retry import Backoff
from kestrel_core.rules.channels import ChannelConfig, ChatChannel, EmailChannel, WebhookChannel, fields
from rules.decide import after_failure
from rules.ports import Rules
from rules.transports import Failed, Transports

log = logging.getLogger("kestrel.rules.notify")
DUE: Final = """
SELECT d.delivery_id, d.tenant_id, d.channel_id, d.kind, d.payload, d.attempts, d.created_at, c.config, c.secret,
       c.per_minute
FROM deliveries d JOIN channels c ON c.tenant_id = d.tenant_id AND c.channel_id = d.channel_id
WHERE d.status = 'pending' AND d.next_attempt_at <= now()
  -- one alarm's notifications reach a channel in the order of its transitions: never ahead of an earlier one
  AND NOT EXISTS (SELECT 1 FROM deliveries e WHERE e.tenant_id = d.tenant_id AND e.channel_id = d.channel_id
                  AND e.alarm_id = d.alarm_id AND e.status = 'pending' AND e.event_id < d.event_id)
ORDER BY d.next_attempt_at LIMIT %s FOR UPDATE OF d SKIP LOCKED
"""
#: Alarm deliveries of a channel first attempted in the last minute (retries count once).
RECENT: Final = """
SELECT count(*) AS n FROM deliveries
WHERE tenant_id = %s AND channel_id = %s AND kind = 'alarm' AND last_attempt_at > now() - interval '60 seconds'
"""


#: The channel's digest that still takes folds: not yet claimed for sending.
OPEN_DIGEST: Final = """
SELECT delivery_id FROM deliveries
WHERE tenant_id = %s AND channel_id = %s AND kind = 'digest' AND status = 'pending' AND attempts = 0
"""


def _digest_id(first_folded: str) -> str:
    return "n" + hashlib.sha256(f"digest/{first_folded}".encode()).hexdigest()[:24]


async def _fold(conn: Any, key: tuple[str, str], row: dict[str, Any], width: int) -> None:
    """Fold a rate-limited delivery into its channel's open digest, opening one (sent ``width`` seconds later) when
    there is none: the window starts with the storm, so a storm is one digest wherever it falls on the clock."""
    found = await fetch_all(conn, OPEN_DIGEST, key)
    if found:
        digest = found[0]["delivery_id"]
    else:
        digest, opened = _digest_id(row["delivery_id"]), datetime.now(UTC)
        await conn.execute(
            "INSERT INTO deliveries (delivery_id, tenant_id, channel_id, kind, payload, next_attempt_at)"
            " VALUES (%s, %s, %s, 'digest', %s, %s)",
            (digest, *key, Jsonb({"window_start": opened.isoformat()}), opened + timedelta(seconds=width)),
        )
    await conn.execute("UPDATE deliveries SET status = 'digested', digest_id = %s WHERE delivery_id = %s",
                       (digest, row["delivery_id"]))  # fmt: skip


async def claim(rules: Rules, limit: int) -> list[dict[str, Any]]:
    """Due deliveries, leased to this worker. A first attempt past its channel's ``per_minute`` is folded into the
    channel's open digest instead (see ``_fold``)."""
    lease, width = rules.settings.delivery_timeout_s * 3 + 5, rules.settings.digest_window_s
    async with rules.pool.connection() as conn, conn.transaction():
        rows = await fetch_all(conn, DUE, (limit,))
        recent: dict[tuple[str, str], int] = {}
        for key in sorted({(r["tenant_id"], r["channel_id"]) for r in rows}):
            # One claimer per channel at a time, so that concurrent workers do not both spend its last slots.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('kestrel.channel'), hashtext(%s))", ("/".join(key),)
            )
            recent[key] = (await fetch_all(conn, RECENT, key))[0]["n"]
        send = []
        for row in sorted(rows, key=lambda r: r["created_at"]):
            key = (row["tenant_id"], row["channel_id"])
            if row["kind"] == "digest" or row["attempts"] > 0 or recent[key] < row["per_minute"]:
                recent[key] += row["kind"] == "alarm" and row["attempts"] == 0
                send.append(row)
                continue
            await _fold(conn, key, row, width)
            rules.counted("delivery", "digested")
        if send:
            await conn.execute(
                "UPDATE deliveries SET attempts = attempts + 1, last_attempt_at = coalesce(last_attempt_at, now()),"
                " next_attempt_at = now() + make_interval(secs => %s) WHERE delivery_id = ANY(%s)",
                (lease, [r["delivery_id"] for r in send]),
            )
        for row in send:
            row["attempts"] += 1
        return send


async def _digest(rules: Rules, row: dict[str, Any]) -> dict[str, Any]:
    async with rules.pool.connection() as conn:
        folded = await fetch_all(
            conn,
            "SELECT payload FROM deliveries WHERE digest_id = %s ORDER BY created_at LIMIT 1000",
            (row["delivery_id"],),
        )
    return {
        "kind": "digest", "tenant": row["tenant_id"], "channel": row["channel_id"],
        "window_start": row["payload"]["window_start"], "count": len(folded),
        "events": [f["payload"] for f in folded[:20]],
    }  # fmt: skip


async def send(rules: Rules, transports: Transports, row: dict[str, Any]) -> None:
    config: ChannelConfig = msgspec.convert(row["config"], ChannelConfig)
    document = await _digest(rules, row) if row["kind"] == "digest" else row["payload"]
    if row["kind"] == "digest":
        values = {"severity": "digest", "rule_name": f"{document['count']} alarm notifications", "device": "several",
                  "event": "digest", "status": "", "alarm_id": "", "rule_id": "", "tenant": row["tenant_id"],
                  "at": document["window_start"], "values": ""}  # fmt: skip
    else:
        values = fields(msgspec.convert(document, AlarmEvent))
    if isinstance(config, WebhookChannel):
        await transports.webhook(config, row["secret"], row["delivery_id"], document)
    elif isinstance(config, ChatChannel):
        await transports.chat(config, row["delivery_id"], values)
    elif isinstance(config, EmailChannel):
        await transports.email(config, row["delivery_id"], values)


async def attempt(rules: Rules, transports: Transports, row: dict[str, Any]) -> None:
    settings = rules.settings
    try:
        try:
            await send(rules, transports, row)
        except (ValueError, TypeError, KeyError, msgspec.ValidationError) as exc:  # a document it cannot render
            raise Failed("unrenderable", type(exc).__name__) from exc
    except Failed as failure:
        backoff = Backoff(settings.delivery_backoff_s, settings.delivery_backoff_cap_s)
        delay = after_failure(row["attempts"], failure.reason, max_attempts=settings.delivery_attempts, backoff=backoff)
        outcome = "dead" if delay is None else "retry"
        rules.counted("delivery", outcome)
        log.warning("notification not delivered", extra={"delivery": row["delivery_id"], "channel": row["channel_id"],
                                                         "reason": str(failure), "outcome": outcome})  # fmt: skip
        async with rules.pool.connection() as conn:
            await conn.execute(
                "UPDATE deliveries SET status = %s, last_error = %s,"
                " next_attempt_at = now() + make_interval(secs => %s) WHERE delivery_id = %s AND status = 'pending'",
                ("dead" if delay is None else "pending", str(failure)[:500], delay or 0, row["delivery_id"]),
            )
        return
    rules.counted("delivery", "delivered")
    async with rules.pool.connection() as conn:
        await conn.execute(
            "UPDATE deliveries SET status = 'delivered', delivered_at = now(), last_error = NULL"
            " WHERE delivery_id = %s AND status = 'pending'",
            (row["delivery_id"],),
        )


async def deliveries_loop(rules: Rules) -> None:
    transports = Transports(rules.settings)
    in_flight: set[asyncio.Task[None]] = set()

    async def one(row: dict[str, Any]) -> None:
        try:
            await attempt(rules, transports, row)
        except Exception:
            log.exception("delivery attempt failed", extra={"delivery": row["delivery_id"]})

    try:
        while True:
            rules.deliveries_wake.clear()
            free = rules.settings.delivery_concurrency - len(in_flight)
            if free <= 0:  # every slot busy: wait for one to end (never spin: the slots' tasks need the loop)
                await asyncio.wait(set(in_flight), timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                rows = await claim(rules, free)
            except (psycopg.Error, OSError):
                log.warning("could not claim deliveries; retrying", exc_info=True)
                rows = []
            for row in rows:
                task = asyncio.create_task(one(row), name=f"delivery-{row['delivery_id']}")
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            if len(rows) < free:  # nothing more due now
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(rules.deliveries_wake.wait(), 0.5)
    finally:
        for task in in_flight:
            task.cancel()
        await transports.close()
