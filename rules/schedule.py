"""Schedule triggers (ADR-0020): every ``every_s`` seconds, each device in a schedule rule's scope gets a tick in its
own partition (stream ``RULE_TICKS``, sourced into ``RULES_IN`` like readings), carrying its presence; the partition's
owner evaluates it as it does a reading, so a schedule rule's state, durations and alarms follow the same rules.

One worker at a time runs a round (a transaction-scoped advisory lock); the slot each rule reached is committed in
``rule_schedules`` after its ticks are published, and a tick's ``Nats-Msg-Id`` names (rule, device, slot), so a round
repeated after a crash adds no tick. Ticks are at the slot's start (``slot * every_s``), the same instant for every
device of the rule."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Final

import msgspec

from kestrel.store.rows import fetch_all, fetch_maybe
from kestrel_core import streams
from kestrel_core.rules.events import Tick
from kestrel_core.rules.model import OnSchedule
from rules.decide import LoadedRule
from rules.ports import Rules
from rules.stream import tick_subject

log = logging.getLogger("kestrel.rules")
SCHEDULE_LOCK: Final = 0x4B53
#: Devices one rule ticks per round; a larger scope is ticked in part and logged (the bound of one round's work).
MAX_DEVICES: Final = 100_000
DEVICES: Final = (
    "SELECT d.device_id, coalesce(p.online, false) AS online, p.last_seen FROM devices d"
    " LEFT JOIN device_presence p ON p.device_id = d.device_id"
    " WHERE d.tenant_id = %(tenant)s AND d.status <> 'decommissioned' AND (%(whole)s OR d.device_id = ANY(%(devices)s)"
    " OR (cardinality(%(tags)s::text[]) > 0 AND d.tags @> %(tags)s::text[])"
    " OR EXISTS (SELECT 1 FROM device_group_members m WHERE m.tenant_id = d.tenant_id"
    "   AND m.device_id = d.device_id AND m.group_id = ANY(%(groups)s)))"
    " ORDER BY d.device_id LIMIT %(limit)s"
)


def slot_of(loaded: LoadedRule, now_ms: int) -> int:
    assert isinstance(loaded.rule.trigger, OnSchedule)
    return now_ms // (loaded.rule.trigger.every_s * 1000)


async def _tick(rules: Rules, conn: Any, loaded: LoadedRule, slot: int) -> int:
    assert isinstance(loaded.rule.trigger, OnSchedule)
    at = slot * loaded.rule.trigger.every_s * 1000
    scope = loaded.rule.scope
    devices = await fetch_all(conn, DEVICES, {
        "tenant": loaded.tenant, "whole": scope.whole_tenant, "devices": list(scope.devices),
        "tags": list(scope.tags), "groups": list(scope.groups), "limit": MAX_DEVICES,
    })  # fmt: skip
    if len(devices) == MAX_DEVICES:
        log.warning("schedule rule's scope ticked in part", extra={"rule": loaded.rule_id, "devices": MAX_DEVICES})
    js = rules.nc.jetstream()
    for row in devices:
        last_seen = int(row["last_seen"].timestamp() * 1000) if row["last_seen"] is not None else None
        tick = Tick(tenant=loaded.tenant, device=row["device_id"], rule_id=loaded.rule_id, at=at,
                    online=row["online"], last_seen=last_seen)  # fmt: skip
        msg_id = f"tick-{loaded.rule_id}-{row['device_id']}-{slot}"
        subject = tick_subject(loaded.tenant, row["device_id"])
        await js.publish(subject, msgspec.json.encode(tick), headers={streams.HDR_MSG_ID: msg_id}, timeout=5)
    return len(devices)


async def schedule_round(rules: Rules, now_ms: int, reached: dict[str, int]) -> int:
    """Publish the ticks of every schedule rule whose slot has come (``reached``: the slots this worker knows were
    done, to skip the database when nothing is due); the ticks published."""
    scheduled = [lr for lr in rules.catalog.by_id.values() if isinstance(lr.rule.trigger, OnSchedule)]
    rules_due = [lr for lr in scheduled if reached.get(lr.rule_id, -1) < slot_of(lr, now_ms)]
    if not rules_due:
        return 0
    sent = 0
    async with rules.pool.connection() as conn, conn.transaction():
        got = await fetch_maybe(conn, "SELECT pg_try_advisory_xact_lock(%s, 0) AS got", (SCHEDULE_LOCK,))
        if not got or not got["got"]:
            return 0
        rows = await fetch_all(
            conn, "SELECT rule_id, slot FROM rule_schedules WHERE rule_id = ANY(%s)", ([r.rule_id for r in rules_due],)
        )
        done = {r["rule_id"]: r["slot"] for r in rows}
        for loaded in rules_due:
            slot = slot_of(loaded, now_ms)
            if done.get(loaded.rule_id, -1) < slot:
                sent += await _tick(rules, conn, loaded, slot)
                await conn.execute(
                    "INSERT INTO rule_schedules (rule_id, slot) VALUES (%s, %s) ON CONFLICT (rule_id)"
                    " DO UPDATE SET slot = excluded.slot, updated_at = now()",
                    (loaded.rule_id, slot),
                )
            reached[loaded.rule_id] = slot
    return sent


async def schedule_loop(rules: Rules) -> None:
    reached: dict[str, int] = {}
    while True:
        try:
            if sent := await schedule_round(rules, int(time.time() * 1000), reached):
                rules.counted("tick", "published")
                log.info("schedule ticks published", extra={"ticks": sent})
        except Exception:
            log.warning("schedule ticks not published yet", exc_info=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.sleep(1.0)
