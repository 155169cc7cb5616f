"""The dry run of an alarm rule over stored telemetry and events (issue 13, ADR-0018, ADR-0020): the tenant's readings
(or command and lifecycle events, for a rule triggered by them) of a time range through the same evaluator the rule
workers run, with no side effect. Reads the tenant's rows only, so a rule sees its own tenant's data whatever devices
it names; conditions on the shadow see each device's current reported state (the shadow's history is not replayed).
Presence, shadow and schedule triggers are not replayed: their history is not kept in the form they are evaluated in.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime
from typing import Any, Final

import msgspec
from psycopg import AsyncConnection

from kestrel.store.rows import fetch_all
from kestrel_core.errors import ContentTooLarge, InvalidInput
from kestrel_core.rules.actions import Scope
from kestrel_core.rules.evaluate import Reading, Transition, replay
from kestrel_core.rules.events import STORED_KINDS, stored_reading
from kestrel_core.rules.model import OnEvents, OnTelemetry, Rule

#: Readings one dry run may read; past it the caller narrows the range or the devices.
MAX_READINGS: Final = 1_000_000
MAX_RANGE_S: Final = 31 * 86_400


class DeviceOutcome(msgspec.Struct, frozen=True):
    device_id: str
    readings: int
    transitions: list[Transition]
    errors: dict[str, int]


class DryRun(msgspec.Struct, frozen=True):
    readings: int
    devices: list[DeviceOutcome]


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


async def dry_run(
    conn: AsyncConnection[Any],
    tenant: str,
    rule: Rule,
    *,
    start: datetime,
    end: datetime,
    devices: list[str] | None = None,
    max_readings: int = MAX_READINGS,
) -> DryRun:
    """What ``rule`` would have raised and cleared for the tenant's devices between ``start`` and ``end``. ``conn``
    is in the tenant's context (``tenant_scope``)."""
    if not start < end or (end - start).total_seconds() > MAX_RANGE_S:
        raise InvalidInput("bad_range", f"the range must end after it starts and span at most {MAX_RANGE_S} s")
    if not isinstance(rule.trigger, OnTelemetry):
        return await _events(conn, tenant, rule, start=start, end=end, devices=devices, max_readings=max_readings)
    rows = await fetch_all(
        conn,
        "SELECT device_id, ts, seq, metrics FROM tenant_telemetry WHERE tenant_id = %(tenant)s"
        " AND ts >= %(start)s AND ts < %(end)s"
        " AND (%(devices)s::text[] IS NULL OR device_id = ANY(%(devices)s))"
        " AND (%(metrics)s::text[] IS NULL OR metrics ?| %(metrics)s)"
        " ORDER BY device_id, ts, seq LIMIT %(limit)s",
        {"tenant": tenant, "start": start, "end": end, "devices": devices, "metrics": rule.metrics or None,
         "limit": max_readings + 1},
    )  # fmt: skip
    if len(rows) > max_readings:
        raise ContentTooLarge("too_many_readings", f"more than {max_readings} readings: narrow the range or devices")
    per_device: dict[str, list[Reading]] = defaultdict(list)
    for row in rows:
        per_device[row["device_id"]].append(Reading(_ms(row["ts"]), row["seq"], row["metrics"]))
    return await _replay(conn, tenant, rule, per_device, end)


EVENT_JOURNALS: Final = {
    "command": "SELECT e.id, c.device_id, e.command_id, e.event, e.at FROM command_events e JOIN commands c"
    " USING (command_id) WHERE e.tenant_id = %(tenant)s AND e.at >= %(start)s AND e.at < %(end)s"
    " AND (%(devices)s::text[] IS NULL OR c.device_id = ANY(%(devices)s)) ORDER BY e.id LIMIT %(limit)s",
    "lifecycle": "SELECT id, device_id, status, previous, at FROM lifecycle_events WHERE tenant_id = %(tenant)s"
    " AND at >= %(start)s AND at < %(end)s AND (%(devices)s::text[] IS NULL OR device_id = ANY(%(devices)s))"
    " ORDER BY id LIMIT %(limit)s",
}


async def _events(
    conn: AsyncConnection[Any], tenant: str, rule: Rule, *, start: datetime, end: datetime,
    devices: list[str] | None, max_readings: int,
) -> DryRun:  # fmt: skip
    trigger = rule.trigger
    kinds = set(trigger.events) if isinstance(trigger, OnEvents) else {"schedule"}
    if not kinds <= STORED_KINDS:
        raise InvalidInput("not_replayable", "a dry run replays telemetry, command and lifecycle events; presence,"
                           " shadow and schedule triggers are evaluated live only (at $.trigger)")  # fmt: skip
    per_device: dict[str, list[Reading]] = defaultdict(list)
    count = 0
    for kind in sorted(kinds):
        args = {"tenant": tenant, "start": start, "end": end, "devices": devices, "limit": max_readings + 1}
        for row in await fetch_all(conn, EVENT_JOURNALS[kind], args):
            per_device[row["device_id"]].append(stored_reading(kind, row, _ms(row["at"])))
            count += 1
    if count > max_readings:
        raise ContentTooLarge("too_many_readings", f"more than {max_readings} events: narrow the range or devices")
    return await _replay(conn, tenant, rule, per_device, end)


async def _replay(
    conn: AsyncConnection[Any], tenant: str, rule: Rule, per_device: dict[str, list[Reading]], end: datetime
) -> DryRun:
    shadows = {
        r["device_id"]: r["reported"]
        for r in await fetch_all(
            conn,
            "SELECT device_id, reported FROM device_shadows WHERE tenant_id = %s AND name = '' AND device_id = ANY(%s)",
            (tenant, sorted(per_device)),
        )
    }
    outcomes = []
    for device, readings in per_device.items():
        _, transitions, errors = replay(rule, readings, until_ms=_ms(end), shadow=shadows.get(device, {}))
        outcomes.append(DeviceOutcome(device, len(readings), transitions, dict(Counter(e.reason for e in errors))))
    return DryRun(sum(len(r) for r in per_device.values()), outcomes)


async def scoped_devices(conn: AsyncConnection[Any], tenant: str, scope: Scope) -> list[str] | None:
    """The tenant's devices a scope selects (None: the whole tenant), as the workers decide it (``in_scope``)."""
    if scope.whole_tenant:
        return None
    rows = await fetch_all(
        conn,
        "SELECT d.device_id FROM devices d WHERE d.tenant_id = %(tenant)s AND (d.device_id = ANY(%(devices)s)"
        " OR (cardinality(%(tags)s::text[]) > 0 AND d.tags @> %(tags)s::text[])"
        " OR EXISTS (SELECT 1 FROM device_group_members m WHERE m.tenant_id = d.tenant_id"
        "   AND m.device_id = d.device_id AND m.group_id = ANY(%(groups)s)))",
        {"tenant": tenant, "devices": list(scope.devices), "tags": list(scope.tags), "groups": list(scope.groups)},
    )
    return [r["device_id"] for r in rows]
