"""The rule workers' composition (``python -m rules``, ADR-0019): the partitions this worker owns (rebalanced so that
the live workers share them), the rules catalog reloaded on every change (``LISTEN kestrel_rules``) and periodically,
the alarm events' outbox and the notification deliveries. Named tasks in one TaskGroup: a loop that fails ends the
service and the supervisor restarts it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
from typing import Any, Final

import psycopg
from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry
from psycopg.rows import dict_row

from kestrel.store.alarms import NOTIFY as ALARMS_CHANNEL
from kestrel.store.pool import checked_pool
from kestrel_core.retry import Backoff
from rules.egress import MqttEgress
from rules.notify import deliveries_loop
from rules.partition import Partition, try_lock
from rules.ports import Metrics, Rules
from rules.schedule import schedule_loop
from rules.settings import RulesSettings
from rules.store import load_catalog
from rules.stream import ensure_streams, publish_outbox

log = logging.getLogger("kestrel.rules")
MEMBER_LOCK: Final = 0x4B51  # advisory lock class of the live workers (the second key is a random member id)
RECONNECT: Final = Backoff(base_s=0.5, cap_s=10.0)
MEMBERS: Final = (
    "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND objsubid = 2 AND granted"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


async def reload(rules: Rules) -> None:
    async with rules.pool.connection() as conn:
        rules.catalog = await load_catalog(conn)


async def catalog_loop(rules: Rules) -> None:
    while True:
        rules.reload_wake.clear()
        try:
            await reload(rules)
        except (psycopg.Error, OSError):
            log.exception("could not reload the rules; keeping the last ones")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(rules.reload_wake.wait(), rules.settings.reload_interval_s)


async def listen(rules: Rules) -> None:
    """Rule changes reload the catalog; people's alarm transitions wake the outbox."""
    failures = 0
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(rules.database_url, autocommit=True) as conn:
                await conn.execute("LISTEN kestrel_rules")
                await conn.execute(f"LISTEN {ALARMS_CHANNEL}")
                failures = 0
                rules.reload_wake.set()
                async for note in conn.notifies():
                    (rules.reload_wake if note.channel == "kestrel_rules" else rules.outbox_wake).set()
        except (psycopg.Error, OSError) as exc:
            log.warning("rules lost their notification connection", extra={"error": str(exc)})
            failures += 1
            await asyncio.sleep(RECONNECT.delay(failures))


async def outbox_loop(rules: Rules) -> None:
    while True:
        rules.outbox_wake.clear()
        try:
            while await publish_outbox(rules.pool, rules.nc) > 0:
                pass
        except Exception:
            log.warning("alarm events not published yet", exc_info=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(rules.outbox_wake.wait(), 1.0)


async def rebalance_loop(rules: Rules, group: asyncio.TaskGroup, stop: asyncio.Event) -> None:
    """Own ceil(partitions / live workers) partitions: take free ones, give back extras (each finishes its batch)."""
    settings = rules.settings
    owned: dict[int, tuple[Partition, asyncio.Task[None]]] = {}
    async with await psycopg.AsyncConnection.connect(
        rules.database_url, autocommit=True, row_factory=dict_row
    ) as member:
        await member.execute("SELECT pg_advisory_lock(%s, %s)", (MEMBER_LOCK, secrets.randbelow(2**31)))
        offset = secrets.randbelow(settings.partitions)
        while not stop.is_set():
            for number in [n for n, (_, task) in owned.items() if task.done()]:
                del owned[number]
            members = (await (await member.execute(MEMBERS, (MEMBER_LOCK,))).fetchone() or {"n": 1})["n"]
            target = math.ceil(settings.partitions / max(1, members))
            for number in sorted(owned, reverse=True)[: max(0, len(owned) - target)]:
                owned[number][0].release.set()
            for step in range(settings.partitions):
                number = (offset + step) % settings.partitions
                if len(owned) >= target:
                    break
                if number not in owned and (conn := await try_lock(rules.database_url, number)) is not None:
                    partition = Partition(rules, number, conn)
                    owned[number] = (partition, group.create_task(_guarded(partition), name=f"rules-p{number}"))
            rules.metrics.partitions.set(len(owned))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), settings.rebalance_interval_s)
        for partition, _ in owned.values():
            partition.release.set()
        await asyncio.gather(*(task for _, task in owned.values()), return_exceptions=True)


async def _guarded(partition: Partition) -> None:
    """A partition that fails (database or NATS trouble) is given up; the rebalancer takes it again later."""
    try:
        await partition.run()
    except Exception:
        log.exception("partition failed; releasing it", extra={"partition": partition.number})


async def run_rules(
    settings: RulesSettings,
    database_url: str,
    stop: asyncio.Event,
    nc: NATS,
    registry: CollectorRegistry,
    ready: asyncio.Event | None = None,
) -> None:
    await ensure_streams(nc, settings.partitions)
    async with checked_pool(database_url, min_size=1, max_size=settings.delivery_concurrency // 4 + 4) as pool:
        egress = MqttEgress(settings) if settings.mqtt_username else None
        rules = Rules(settings, database_url, pool, nc, Metrics(registry), mqtt=egress)
        await reload(rules)
        async with asyncio.TaskGroup() as group:
            loops: list[asyncio.Task[Any]] = [
                *([group.create_task(egress.run(), name="rules-mqtt")] if egress else []),
                group.create_task(listen(rules), name="rules-listen"),
                group.create_task(catalog_loop(rules), name="rules-catalog"),
                group.create_task(outbox_loop(rules), name="rules-outbox"),
                group.create_task(deliveries_loop(rules), name="rules-deliveries"),
                group.create_task(schedule_loop(rules), name="rules-schedule"),
            ]
            balancer = group.create_task(rebalance_loop(rules, group, stop), name="rules-rebalance")
            if ready is not None:
                ready.set()
            await stop.wait()
            await balancer
            for task in loops:
                task.cancel()
        if egress is not None:
            with contextlib.suppress(Exception):  # a broker that is gone gets no goodbye
                await egress.close()
        log.info("rule worker stopped", extra={"worker": settings.worker})
