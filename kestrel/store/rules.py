"""Alarm rules per tenant (issue 13): versioned (every version kept), audited, limited by the tenant's ``max_rules``.
A rule's targets (devices and groups in its scope, channels it notifies) must be the tenant's own: they are looked
up in the caller's tenant context, so another tenant's device is as unknown as one that does not exist."""

from __future__ import annotations

import secrets
from typing import Any, Final

import msgspec
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from kestrel.store import audit
from kestrel.store.rows import fetch_all, fetch_one
from kestrel.store.session import Actor
from kestrel_core.errors import Conflict, InvalidInput, PreconditionFailed
from kestrel_core.jsondoc import check_document
from kestrel_core.rules.model import Rule

COLUMNS: Final = "rule_id, name, enabled, version, definition, created_by, created_at, updated_at"


def new_rule_id() -> str:
    return "r" + secrets.token_hex(12)


#: A stored rule document: nesting (conditions, action payloads) and size.
MAX_DEPTH: Final = 32
MAX_BYTES: Final = 64 * 1024


def _document(rule: Rule) -> dict[str, Any]:
    """The rule as stored; refused (400) when jsonb cannot store a string of it, or it is too deep or too large."""
    document: dict[str, Any] = msgspec.to_builtins(rule)
    check_document(document, what="the rule", max_depth=MAX_DEPTH, max_bytes=MAX_BYTES)
    return document


async def _missing(conn: AsyncConnection[Any], tenant: str, table: str, column: str, ids: list[str]) -> list[str]:
    if not ids:
        return []
    rows = await fetch_all(
        conn, f"SELECT {column} AS id FROM {table} WHERE tenant_id = %s AND {column} = ANY(%s)", (tenant, ids)
    )
    return sorted(set(ids) - {r["id"] for r in rows})


async def check_targets(conn: AsyncConnection[Any], tenant: str, rule: Rule) -> None:
    """Refuse a rule naming devices, groups or channels the tenant does not have (422, naming the field)."""
    for field, table, column, ids in (
        ("scope.devices", "devices", "device_id", rule.scope.devices),
        ("scope.groups", "device_groups", "group_id", rule.scope.groups),
        ("notify", "channels", "channel_id", rule.notify),
    ):
        missing = await _missing(conn, tenant, table, column, list(ids))
        if missing:
            kind = column.removesuffix("_id")
            raise InvalidInput(f"unknown_{kind}", f"`$.{field}`: the tenant has no {kind} {', '.join(missing[:5])}")


async def list_all(conn: AsyncConnection[Any], tenant: str) -> list[dict[str, Any]]:
    return await fetch_all(conn, f"SELECT {COLUMNS} FROM rules WHERE tenant_id = %s ORDER BY rule_id", (tenant,))


async def get(conn: AsyncConnection[Any], tenant: str, rule_id: str, *, lock: bool = False) -> dict[str, Any]:
    return await fetch_one(
        conn,
        f"SELECT {COLUMNS} FROM rules WHERE tenant_id = %s AND rule_id = %s" + (" FOR UPDATE" if lock else ""),
        (tenant, rule_id),
        f"rule {rule_id} not found",
    )


async def versions(conn: AsyncConnection[Any], tenant: str, rule_id: str) -> list[dict[str, Any]]:
    await get(conn, tenant, rule_id)
    return await fetch_all(
        conn,
        "SELECT version, enabled, definition, changed_by, changed_at FROM rule_versions"
        " WHERE tenant_id = %s AND rule_id = %s ORDER BY version DESC",
        (tenant, rule_id),
    )


async def _version(conn: AsyncConnection[Any], actor: Actor, tenant: str, row: dict[str, Any]) -> None:
    await conn.execute(
        "INSERT INTO rule_versions (rule_id, version, tenant_id, enabled, definition, changed_by)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        (row["rule_id"], row["version"], tenant, row["enabled"], Jsonb(row["definition"]), actor.name),
    )


async def create(
    conn: AsyncConnection[Any], actor: Actor, tenant: str, rule: Rule, *, enabled: bool = True
) -> dict[str, Any]:
    document = _document(rule)
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('kestrel.rules'), hashtext(%s))", (tenant,))
    quota = await fetch_one(
        conn,
        "SELECT t.max_rules, (SELECT count(*) FROM rules r WHERE r.tenant_id = t.tenant_id) AS used"
        " FROM tenants t WHERE t.tenant_id = %s",
        (tenant,),
        f"tenant {tenant} not found",
    )
    if quota["used"] >= quota["max_rules"]:
        raise Conflict(f"the tenant has {quota['used']} rules, its limit (max_rules) is {quota['max_rules']}")
    await check_targets(conn, tenant, rule)
    row = await fetch_one(
        conn,
        f"INSERT INTO rules (rule_id, tenant_id, name, enabled, definition, created_by)"
        f" VALUES (%s, %s, %s, %s, %s, %s) RETURNING {COLUMNS}",
        (new_rule_id(), tenant, rule.name, enabled, Jsonb(document), actor.name),
        "rule not created",
    )
    await _version(conn, actor, tenant, row)
    await audit.record(conn, actor, tenant, "rule.create", f"rule:{row['rule_id']}", after=row["definition"])
    return row


async def update(
    conn: AsyncConnection[Any],
    actor: Actor,
    tenant: str,
    rule_id: str,
    *,
    rule: Rule | None = None,
    enabled: bool | None = None,
    if_match: int | None = None,
) -> dict[str, Any]:
    """A new version with a new definition and/or enabled flag; ``if_match``: the version the caller last read."""
    before = await get(conn, tenant, rule_id, lock=True)
    if if_match is not None and if_match != before["version"]:
        raise PreconditionFailed(f"rule {rule_id} is at version {before['version']}, not {if_match}")
    if rule is not None:
        await check_targets(conn, tenant, rule)
    definition = _document(rule) if rule is not None else before["definition"]
    row = await fetch_one(
        conn,
        f"UPDATE rules SET name = %s, enabled = %s, definition = %s, version = version + 1, updated_at = now()"
        f" WHERE tenant_id = %s AND rule_id = %s RETURNING {COLUMNS}",
        (definition["name"], before["enabled"] if enabled is None else enabled, Jsonb(definition), tenant, rule_id),
        f"rule {rule_id} not found",
    )
    await _version(conn, actor, tenant, row)
    changes = {"enabled": row["enabled"], "definition": definition, "version": row["version"]}
    await audit.record(
        conn, actor, tenant, "rule.update", f"rule:{rule_id}", before=before["definition"], after=changes
    )
    return row


async def delete(conn: AsyncConnection[Any], actor: Actor, tenant: str, rule_id: str) -> None:
    """Delete a rule (its alarms stay, with its name)."""
    before = await get(conn, tenant, rule_id, lock=True)
    await conn.execute("DELETE FROM rules WHERE tenant_id = %s AND rule_id = %s", (tenant, rule_id))
    await audit.record(conn, actor, tenant, "rule.delete", f"rule:{rule_id}", before=before["definition"])
