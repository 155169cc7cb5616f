"""Shadows between devices and the database: reported state in (many devices per transaction), desired state and
its delta out (an outbox of retained messages), and a decommissioned device's retained topics emptied."""

from __future__ import annotations

from psycopg.types.json import Jsonb

from devicesvc import decide
from devicesvc.ports import Twin
from kestrel.store import shadows
from kestrel.store.rows import fetch_all
from kestrel_core.errors import InvalidInput
from kestrel_core.messages.twin import ShadowEvent
from kestrel_core.topics import desired_topic, status_topic


async def store_reports(twin: Twin, reports: list[decide.Report]) -> list[InvalidInput | None]:
    """Apply reported-state patches in one transaction (in order per device); per report, None when stored or the
    refusal (unknown device, too large, too deep). A database error raises: nothing was stored."""
    outcome: list[InvalidInput | None] = [None] * len(reports)
    async with twin.pool.connection() as conn, conn.transaction():
        rows = await fetch_all(
            conn,
            "SELECT device_id, tenant_id FROM devices WHERE device_id = ANY(%s) AND status <> 'decommissioned'",
            (list({r.device for r in reports}),),
        )
        owners = {row["device_id"]: row["tenant_id"] for row in rows}
        known = []
        for index, r in enumerate(reports):
            if owners.get(r.device) == r.tenant:
                known.append(index)
            else:
                outcome[index] = InvalidInput("unknown_device", "no such device")
        if not known:
            return outcome
        patches = [
            shadows.Patch(r.tenant, r.device, r.name, "reported", r.state, r.ts_ms, f"device:{r.device}")
            for r in (reports[i] for i in known)
        ]
        for index, result in zip(known, await shadows.apply_patches(conn, patches), strict=True):
            if isinstance(result, InvalidInput):
                outcome[index] = result
        await conn.execute(
            "UPDATE device_presence SET last_seen = now() WHERE device_id = ANY(%s)",
            (list({reports[i].device for i in known}),),
        )
    return outcome


async def publish_outbox(twin: Twin) -> int:
    """Publish desired state and delta (retained) of shadows that changed since last published, then their events."""
    if not twin.devices.connected:
        return 0
    async with twin.pool.connection() as conn, conn.transaction():
        rows = await fetch_all(
            conn,
            "SELECT tenant_id, device_id, name, version, desired, reported, published, updated_at FROM device_shadows"
            " WHERE version > published_version ORDER BY updated_at LIMIT 500 FOR UPDATE SKIP LOCKED",
        )
        documents = [decide.desired_document(r) for r in rows]
        for row, document in zip(rows, documents, strict=True):
            if document != row["published"]:  # a reported change that leaves the delta alone: nothing to send
                twin.devices.publish(
                    desired_topic(row["tenant_id"], row["device_id"], row["name"]),
                    decide.desired_message(row["version"], document, shadows.now_ms()),
                    retain=True,
                    content_type=decide.CONTENT_TYPE,
                    payload_format_id=1,
                )
                twin.metrics.published.labels("desired").inc()
        async with conn.cursor() as write:
            await write.executemany(
                "UPDATE device_shadows SET published_version = %s, published = %s WHERE device_id = %s AND name = %s",
                [(r["version"], Jsonb(d), r["device_id"], r["name"]) for r, d in zip(rows, documents, strict=True)],
            )
    for row, document in zip(rows, documents, strict=True):
        event = ShadowEvent(
            tenant=row["tenant_id"], device=row["device_id"], name=row["name"], version=row["version"],
            reported=row["reported"], at=decide.ms(row["updated_at"]) or 0, **document,
        )  # fmt: skip
        await twin.events.publish(event, f"shadow:{row['device_id']}:{row['name']}:{row['version']}")
    return len(rows)


async def clear_retained(twin: Twin) -> int:
    """Empty the retained topics of decommissioned devices (the broker drops a retained empty payload), from the
    queue their decommissioning filled (migration 0015), so a clear requested while devicesvc was down still happens.
    A row leaves the queue in the transaction that published its clears."""
    if not twin.devices.connected:
        return 0
    async with twin.pool.connection() as conn, conn.transaction():
        rows = await fetch_all(
            conn,
            "SELECT q.device_id, q.tenant_id, coalesce(array_agg(s.name) FILTER (WHERE s.name IS NOT NULL), '{}')"
            " AS shadows FROM (SELECT device_id, tenant_id FROM retained_clears ORDER BY requested_at LIMIT 200"
            " FOR UPDATE SKIP LOCKED) q LEFT JOIN device_shadows s ON s.device_id = q.device_id"
            " GROUP BY q.device_id, q.tenant_id",
        )
        for row in rows:
            for name in row["shadows"]:
                twin.devices.publish(desired_topic(row["tenant_id"], row["device_id"], name), b"", retain=True)
            twin.devices.publish(status_topic(row["tenant_id"], row["device_id"]), b"", retain=True)
            twin.metrics.published.labels("retained_clear").inc()
        if rows:
            await conn.execute(
                "DELETE FROM retained_clears WHERE device_id = ANY(%s)", ([r["device_id"] for r in rows],)
            )
    return len(rows)
