"""Presence: who is online, from the broker's client events, the devices' own status, and a grace period for
those that vanished without a word (ADR-0013)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from psycopg import AsyncConnection

from devicesvc import decide
from devicesvc.ports import Twin
from kestrel.store.rows import fetch_all, fetch_maybe, fetch_one
from kestrel.store.shadows import now_ms
from kestrel_core.messages.twin import BrokerStarted, PresenceEvent
from kestrel_core.topics import Uplink

log = logging.getLogger("kestrel.devicesvc")


async def locked(conn: AsyncConnection[Any], tenant: str, device: str) -> dict[str, Any]:
    """The device's presence row (created when missing), locked for this transaction."""
    await conn.execute(
        "INSERT INTO device_presence (tenant_id, device_id) VALUES (%s, %s) ON CONFLICT DO NOTHING", (tenant, device)
    )
    return await fetch_one(conn, "SELECT * FROM device_presence WHERE device_id = %s FOR UPDATE", (device,), device)


async def owned(conn: AsyncConnection[Any], uplink: Uplink) -> bool:
    """The topic's device belongs to the topic's tenant (the broker ACL already bound the sender to it)."""
    row = await fetch_maybe(
        conn,
        "SELECT 1 AS owned FROM devices WHERE device_id = %s AND tenant_id = %s AND status <> 'decommissioned'",
        (uplink.device, uplink.tenant),
    )
    return row is not None


async def _record_connection(conn: AsyncConnection[Any], tenant: str, change: decide.Connection) -> None:
    event = change.event
    if change.connected:
        await conn.execute(
            "INSERT INTO device_connections (tenant_id, device_id, node, connected_ms, connected_at, peer,"
            " protocol) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (tenant, change.device, change.node, event.connected_at, change.at, change.peer, event.proto_ver),
        )
        await conn.execute(
            "UPDATE devices SET status = 'active', version = version + 1, updated_at = now()"
            " WHERE device_id = %s AND status IN ('registered', 'provisioned')",
            (change.device,),
        )
    else:
        await conn.execute(
            "INSERT INTO device_connections (tenant_id, device_id, node, connected_ms, connected_at,"
            " disconnected_at, reason) VALUES (%s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (device_id, node, connected_ms) DO UPDATE"
            " SET disconnected_at = EXCLUDED.disconnected_at, reason = EXCLUDED.reason",
            (tenant, change.device, change.node, event.connected_at, change.connected_at, change.at, change.reason),
        )


async def client_event(twin: Twin, change: decide.Connection) -> None:
    """A connection began or ended: the connection history, the device's first activation, its presence."""
    async with twin.pool.connection() as conn, conn.transaction():
        device = await fetch_maybe(conn, "SELECT tenant_id FROM devices WHERE device_id = %s", (change.device,))
        if device is None:
            return
        tenant = device["tenant_id"]
        before = await locked(conn, tenant, change.device)
        await _record_connection(conn, tenant, change)
        live = await fetch_one(
            conn,
            "SELECT count(*) AS live FROM device_connections WHERE device_id = %s AND disconnected_at IS NULL",
            (change.device,),
            change.device,
        )
        connections = int(live["live"])
        online = decide.online_after(before, change, connections)
        at = change.at
        await conn.execute(
            "UPDATE device_presence SET online = %s, connections = %s, last_seen = greatest(last_seen, %s),"
            " connected_at = CASE WHEN %s THEN %s ELSE connected_at END,"
            " disconnected_at = CASE WHEN %s THEN %s ELSE disconnected_at END,"
            " disconnect_reason = CASE WHEN %s THEN %s ELSE disconnect_reason END,"
            " protocol = coalesce(%s, protocol), changed_at = CASE WHEN online <> %s THEN now() ELSE changed_at END"
            " WHERE device_id = %s",
            (online, connections, at, change.connected, at, not change.connected, at, not change.connected,
             change.reason, change.event.proto_ver if change.connected else None, online, change.device),
        )  # fmt: skip
        if change.connected:  # answers in flight on an earlier connection may be lost: ask for them again
            await conn.execute(
                "UPDATE commands SET answer_wanted = true WHERE device_id = %s AND status = 'delivered'",
                (change.device,),
            )
    if change.connected:
        twin.wake.set()  # queued commands may go now
    event = PresenceEvent(
        tenant=tenant, device=change.device, event=change.name, online=online, connections=connections,
        node=change.node, at=decide.ms(at) or 0,
    )  # fmt: skip
    await twin.events.publish(
        event, f"presence:{change.device}:{change.node}:{change.event.connected_at}:{change.name}"
    )


async def device_status(twin: Twin, uplink: Uplink, value: str) -> None:
    """The device's own retained status (``online``/``offline``; the offline one is usually its will)."""
    async with twin.pool.connection() as conn, conn.transaction():
        if not await owned(conn, uplink):
            return
        before = await locked(conn, uplink.tenant, uplink.device)
        change = decide.status_change(before, value)
        await conn.execute(
            "UPDATE device_presence SET reported_status = %s, reported_status_at = now(),"
            " last_seen = CASE WHEN %s = 'online' THEN now() ELSE last_seen END,"
            " online = CASE WHEN %s THEN false WHEN %s THEN true ELSE online END,"
            " changed_at = CASE WHEN %s OR %s THEN now() ELSE changed_at END WHERE device_id = %s",
            (value, value, change.went_offline, change.came_online, change.went_offline, change.came_online,
             uplink.device),
        )  # fmt: skip
    if value == "online":
        twin.wake.set()  # it has subscribed by now: send what waits for it
    if change.went_offline or change.came_online:
        now = now_ms()
        event = PresenceEvent(
            tenant=uplink.tenant, device=uplink.device, event=f"status_{value}", online=change.came_online,
            connections=before["connections"], at=now,
        )  # fmt: skip
        await twin.events.publish(event, f"presence:{uplink.device}:will:{now}")


async def broker_started(twin: Twin, started: BrokerStarted) -> None:
    """A broker node (re)started: the connections it held before are gone, though a crash sent no disconnected event
    for them. They end at the start; a device that did not come back goes offline when its grace period has passed
    (the sweep), one that did keeps the connection it opened since."""
    at = datetime.fromtimestamp(started.started_at / 1000, UTC)
    async with twin.pool.connection() as conn, conn.transaction():
        stale = await fetch_all(  # presence rows first, in order: the lock order of client_event
            conn,
            "SELECT device_id FROM device_presence WHERE device_id IN (SELECT device_id FROM device_connections"
            " WHERE node = %s AND disconnected_at IS NULL AND connected_ms < %s) ORDER BY device_id FOR UPDATE",
            (started.node, started.started_at),
        )
        devices = [r["device_id"] for r in stale]
        if not devices:
            return
        await conn.execute(
            "UPDATE device_connections SET disconnected_at = %s, reason = 'broker_restarted'"
            " WHERE node = %s AND disconnected_at IS NULL AND connected_ms < %s AND device_id = ANY(%s)",
            (at, started.node, started.started_at, devices),
        )
        await conn.execute(
            "UPDATE device_presence p SET connections = (SELECT count(*) FROM device_connections c"
            " WHERE c.device_id = p.device_id AND c.disconnected_at IS NULL),"
            " disconnected_at = greatest(p.disconnected_at, %s) WHERE p.device_id = ANY(%s)",
            (at, devices),
        )
    log.info(
        "broker node restarted; its earlier connections closed", extra={"node": started.node, "devices": len(devices)}
    )


async def sweep(twin: Twin) -> None:
    """Devices gone without a clean goodbye are offline once the grace period has passed."""
    async with twin.pool.connection() as conn, conn.transaction():
        rows = await fetch_all(
            conn,
            "UPDATE device_presence SET online = false, changed_at = now() WHERE online AND connections = 0"
            " AND disconnected_at <= now() - make_interval(secs => %s) RETURNING tenant_id, device_id",
            (twin.settings.presence_grace_s,),
        )
    for row in rows:
        now = now_ms()
        event = PresenceEvent(
            tenant=row["tenant_id"], device=row["device_id"], event="grace_expired", online=False, connections=0,
            at=now,
        )  # fmt: skip
        await twin.events.publish(event, f"presence:{row['device_id']}:grace:{now}")
