"""The dry run of an alarm rule over stored telemetry (issue 13, ADR-0018): the tenant's readings of a time range
through the same evaluator the rule workers run, with no side effect. Reads the tenant's telemetry view only, so a
rule sees its own tenant's data whatever devices it names; conditions on the shadow see each device's current
reported state (the shadow's history is not replayed).
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
from kestrel_core.rules.model import Rule

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
    shadows = {
        r["device_id"]: r["reported"]
        for r in await fetch_all(
            conn,
            "SELECT device_id, reported FROM device_shadows WHERE tenant_id = %s AND name = '' AND device_id = ANY(%s)",
            (tenant, sorted({row["device_id"] for row in rows})),
        )
    }
    per_device: dict[str, list[Reading]] = defaultdict(list)
    for row in rows:
        per_device[row["device_id"]].append(Reading(_ms(row["ts"]), row["seq"], row["metrics"]))
    outcomes = []
    for device, readings in per_device.items():
        _, transitions, errors = replay(rule, readings, until_ms=_ms(end), shadow=shadows.get(device, {}))
        outcomes.append(DeviceOutcome(device, len(readings), transitions, dict(Counter(e.reason for e in errors))))
    return DryRun(len(rows), outcomes)


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
