"""devicesvc: presence, shadows and commands between devices (MQTT) and the registry (PostgreSQL), ADR-0013.

Everything a device sends is handled in one database transaction and acknowledged to the broker (PUBACK) only
after that transaction committed, on a persistent session: a crash loses nothing, it redelivers (``intake``).
Work queued by the API (desired state, commands) is found by a ``LISTEN`` wake-up and by a periodic scan, with
``FOR UPDATE SKIP LOCKED`` so that replicas share it. The composition: each concern is a module (``presence``,
``shadows``, ``commands``, ``retention``) over the ``Twin`` context, its decisions in ``decide``; the tasks run
named in one TaskGroup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Final

import psycopg
from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry

from devicesvc import commands, journals, presence, retention, shadows
from devicesvc.events import NatsEvents, ensure_events_stream
from devicesvc.intake import Intake
from devicesvc.ports import Metrics, Twin
from devicesvc.settings import DeviceSettings
from devicesvc.transport import GmqttLink
from kestrel.runtime.tracing import Tracing
from kestrel.store.pool import checked_pool
from kestrel_core.retry import Backoff

log = logging.getLogger("kestrel.devicesvc")
NOTIFY_CHANNEL: Final = "kestrel_twin"
RECONNECT: Final = Backoff(base_s=0.5, cap_s=10.0)
#: How long queued device messages get to be handled at shutdown.
DRAIN_S: Final = 10.0


async def listen(twin: Twin, database_url: str) -> None:
    """Wake the scan loop on the API's notifications (a lost one only delays work until the next scan)."""
    failures = 0
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
                await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                failures = 0
                twin.wake.set()
                async for _note in conn.notifies():  # devices (decommissioned), shadows, commands: all in the scan
                    twin.wake.set()
        except (psycopg.Error, OSError) as exc:
            log.warning("devicesvc lost its notification connection", extra={"error": str(exc)})
            failures += 1
            await asyncio.sleep(RECONNECT.delay(failures))


async def scan(twin: Twin, periodic: bool, next_prune: list[float]) -> None:
    """Notifications (desired state, commands, connects) need the outbox and the dispatcher; retained topics of
    decommissioned devices, deadlines, presence grace, command events and retention run on the scan interval."""
    await shadows.publish_outbox(twin)
    await commands.dispatch(twin)
    if not periodic:
        return
    await shadows.clear_retained(twin)  # decommissioning is rare: the scan interval is soon enough
    await commands.expire(twin)
    await presence.sweep(twin)
    for journal in journals.JOURNALS:
        await journals.publish(twin, journal)
    if time.monotonic() >= next_prune[0]:
        next_prune[0] = time.monotonic() + twin.settings.prune_interval_s
        await retention.prune(twin)


async def scan_loop(twin: Twin) -> None:
    next_periodic = 0.0
    next_prune = [0.0]
    while True:
        twin.wake.clear()
        periodic = time.monotonic() >= next_periodic
        if periodic:
            next_periodic = time.monotonic() + twin.settings.scan_interval_s
        try:
            await scan(twin, periodic, next_prune)
        except (psycopg.Error, OSError):
            log.exception("devicesvc scan failed; retrying")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(twin.wake.wait(), max(0.0, next_periodic - time.monotonic()))


async def run_devicesvc(
    settings: DeviceSettings,
    database_url: str,
    stop: asyncio.Event,
    nc: NATS,
    registry: CollectorRegistry,
    ready: asyncio.Event | None = None,
    tracing: Tracing | None = None,
) -> None:
    await ensure_events_stream(nc)
    metrics = Metrics(registry)
    async with checked_pool(database_url, min_size=2, max_size=settings.workers + 4) as pool:
        intake: Intake | None = None
        link = GmqttLink(settings, lambda *message: intake.on_message(*message) if intake else None)
        twin = Twin(settings, pool, link, NatsEvents(nc, metrics), metrics, tracing=tracing)
        intake = Intake(twin)
        link.on_connected = twin.wake.set
        # One TaskGroup: a task that fails ends the others and the service (the supervisor restarts it); at shutdown
        # the loops are cancelled once the queued messages were handled.
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(intake.worker(queue), name=f"devicesvc-worker-{number}")
                for number, queue in enumerate(intake.queues)
            ]
            tasks.append(group.create_task(listen(twin, database_url), name="devicesvc-listen"))
            await link.connect()
            tasks.append(group.create_task(scan_loop(twin), name="devicesvc-scan"))
            if ready is not None:
                ready.set()
            await stop.wait()
            deadline = time.monotonic() + DRAIN_S
            while intake.pending() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            with contextlib.suppress(TimeoutError):  # a broker that is gone gets no goodbye
                await asyncio.wait_for(link.disconnect(), 5)
            for task in tasks:
                task.cancel()
        log.info("devicesvc stopped", extra={"handled": intake.handled})
