"""The rule workers' reads and writes of their own state in PostgreSQL (as the owner; every query names the tenant
or the partition): the catalog of enabled rules, the devices' states per (rule, device), the deadlines."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from psycopg import AsyncConnection

from kestrel.store.rows import fetch_all
from kestrel_core.errors import InvalidInput
from kestrel_core.rules.evaluate import DeviceState
from kestrel_core.rules.model import parse_rule
from rules.decide import Catalog, Key, LoadedRule, Member, reads_shadow

log = logging.getLogger("kestrel.rules")
_state = msgspec.json.Decoder(DeviceState)
_encode = msgspec.json.Encoder()


async def load_catalog(conn: AsyncConnection[Any]) -> Catalog:
    """Every enabled rule (a stored definition that no longer parses is skipped and logged, never fatal), and the
    groups and tags of the devices of tenants whose rules select by group or tag."""
    catalog = Catalog()
    scoped: set[str] = set()
    for row in await fetch_all(conn, "SELECT rule_id, tenant_id, version, definition FROM rules WHERE enabled"):
        try:
            rule = parse_rule(row["definition"])
        except InvalidInput as exc:
            detail = {"rule": row["rule_id"], "error": exc.detail}
            log.error("stored rule does not parse", extra=detail)  # noqa: TRY400 - the detail says it all
            continue
        loaded = LoadedRule(row["rule_id"], row["tenant_id"], row["version"], rule, reads_shadow(rule))
        catalog.rules.setdefault(loaded.tenant, []).append(loaded)
        catalog.by_id[loaded.rule_id] = loaded
        if rule.scope.groups or rule.scope.tags:
            scoped.add(loaded.tenant)
    if scoped:
        rows = await fetch_all(
            conn,
            "SELECT d.device_id, d.tags, coalesce(array_agg(m.group_id) FILTER (WHERE m.group_id IS NOT NULL), '{}')"
            " AS groups FROM devices d LEFT JOIN device_group_members m ON m.device_id = d.device_id"
            " AND m.tenant_id = d.tenant_id WHERE d.tenant_id = ANY(%s) GROUP BY d.device_id, d.tags",
            (sorted(scoped),),
        )
        catalog.members = {r["device_id"]: Member(frozenset(r["groups"]), frozenset(r["tags"])) for r in rows}
    return catalog


async def load_states(conn: AsyncConnection[Any], keys: list[Key]) -> dict[Key, DeviceState]:
    if not keys:
        return {}
    rows = await fetch_all(
        conn,
        "SELECT s.rule_id, s.device_id, s.state::text AS state FROM rule_state s"
        " JOIN unnest(%s::text[], %s::text[]) AS k(rule_id, device_id) USING (rule_id, device_id)",
        ([k[0] for k in keys], [k[1] for k in keys]),
    )
    return {(r["rule_id"], r["device_id"]): _state.decode(r["state"]) for r in rows}


async def load_deadlines(conn: AsyncConnection[Any], partition: int) -> list[tuple[Key, int]]:
    rows = await fetch_all(
        conn,
        "SELECT rule_id, device_id, deadline_ms FROM rule_state WHERE partition = %s AND deadline_ms IS NOT NULL",
        (partition,),
    )
    return [((r["rule_id"], r["device_id"]), r["deadline_ms"]) for r in rows]


async def save_states(
    conn: AsyncConnection[Any],
    partition: int,
    changed: dict[Key, tuple[LoadedRule, DeviceState, int | None]],
) -> None:
    """Upsert the states a batch changed (in the batch's transaction), in one statement; a state whose rule was
    deleted meanwhile, or whose device is not the rule's tenant's, is dropped by the joins (it never resurrects)."""
    if not changed:
        return
    columns: tuple[list[Any], ...] = ([], [], [], [], [])
    for (rule_id, device), (loaded, state, deadline) in changed.items():
        for column, value in zip(columns, (rule_id, device, loaded.version, _encode.encode(state).decode(), deadline),
                                 strict=True):  # fmt: skip
            column.append(value)
    await conn.execute(
        "INSERT INTO rule_state (rule_id, device_id, tenant_id, partition, rule_version, state, deadline_ms)"
        " SELECT r.rule_id, d.device_id, r.tenant_id, %s, v.version, v.state::jsonb, v.deadline"
        " FROM unnest(%s::text[], %s::text[], %s::int[], %s::text[], %s::bigint[])"
        "   AS v(rule_id, device_id, version, state, deadline)"
        " JOIN rules r ON r.rule_id = v.rule_id"
        " JOIN devices d ON d.device_id = v.device_id AND d.tenant_id = r.tenant_id"
        " ON CONFLICT (rule_id, device_id) DO UPDATE SET state = excluded.state,"
        " deadline_ms = excluded.deadline_ms, rule_version = excluded.rule_version,"
        " partition = excluded.partition, updated_at = now()",
        (partition, *columns),
    )


async def load_position(conn: AsyncConnection[Any], partition: int) -> int:
    rows = await fetch_all(conn, "SELECT stream_seq FROM rule_partitions WHERE partition = %s", (partition,))
    return int(rows[0]["stream_seq"]) if rows else 0


async def save_position(conn: AsyncConnection[Any], partition: int, stream_seq: int) -> None:
    await conn.execute(
        "INSERT INTO rule_partitions (partition, stream_seq) VALUES (%s, %s) ON CONFLICT (partition)"
        " DO UPDATE SET stream_seq = excluded.stream_seq, updated_at = now()",
        (partition, stream_seq),
    )


async def spend_actions(conn: AsyncConnection[Any], wants: dict[str, int]) -> dict[str, int]:
    """Reserve up to ``wants[tenant]`` actions of each tenant's current second, across every worker (migration 0020);
    how many each got. ``conn`` is in autocommit: each reservation is a transaction of its own, so the tenant's row is
    locked only for that moment, and tenants are taken in one order."""
    granted: dict[str, int] = {}
    for tenant in sorted(wants):
        rows = await fetch_all(conn, "SELECT kestrel_spend_rule_actions(%s, %s) AS n", (tenant, wants[tenant]))
        granted[tenant] = int(rows[0]["n"])
    return granted
