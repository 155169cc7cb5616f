"""Devices: register (one, many, from CSV; quota, groups and JWT keys in the same transaction), read, change,
decommission. One write path for the API and the CLI, each change audited in the caller's transaction."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import psycopg
from psycopg import AsyncConnection

from kestrel.store import audit, jwt_keys
from kestrel.store.rows import fetch_all, fetch_one
from kestrel.store.session import Actor
from kestrel_core.errors import Conflict, InvalidInput, PreconditionFailed
from kestrel_core.topics import require_id

COLUMNS: Final = "device_id, name, status, tags, version, created_at, updated_at"
ONE: Final = f"SELECT {COLUMNS} FROM devices WHERE device_id = %s AND tenant_id = %s"
PAGE: Final = f"""
SELECT {COLUMNS} FROM devices d
WHERE d.tenant_id = %(tenant)s
  AND (%(status)s::text IS NULL OR d.status = %(status)s)
  AND (%(tag)s::text IS NULL OR %(tag)s = ANY (d.tags))
  AND (%(group)s::text IS NULL OR EXISTS (SELECT 1 FROM device_group_members m
       WHERE m.tenant_id = d.tenant_id AND m.device_id = d.device_id AND m.group_id = %(group)s))
  AND (%(after)s::text IS NULL OR d.device_id > %(after)s)
ORDER BY d.device_id LIMIT %(limit)s
"""
MAX_TAGS: Final = 64


@dataclass(frozen=True)
class NewDevice:
    device_id: str
    name: str = ""
    tags: Sequence[str] = ()
    groups: Sequence[str] = field(default=())


def parse_csv(text: str) -> list[NewDevice]:
    """Rows of CSV with the header ``device_id[,name][,tags][,groups]`` (tags and groups separated by ``;``)."""
    try:
        rows = list(csv.DictReader(io.StringIO(text)))
    except csv.Error as exc:
        raise InvalidInput("bad_csv", f"not CSV: {exc}") from exc
    if not rows or "device_id" not in rows[0] or set(rows[0]) - {"device_id", "name", "tags", "groups"}:
        raise InvalidInput("bad_csv", "CSV needs a header with device_id (and optionally name, tags, groups) and a row")
    return [
        NewDevice(r["device_id"] or "", r.get("name") or "", _split(r.get("tags")), _split(r.get("groups")))
        for r in rows
    ]


def _split(cell: str | None) -> list[str]:
    return [t for t in (cell or "").split(";") if t]


def _check(devices: Sequence[NewDevice]) -> None:
    for d in devices:
        require_id("device", d.device_id)
        for group in d.groups:
            require_id("group", group)
        if len(d.tags) > MAX_TAGS:
            raise InvalidInput("bad_tags", f"device {d.device_id} has more than {MAX_TAGS} tags")
    if (twice := first_repeat(d.device_id for d in devices)) is not None:
        raise InvalidInput("bad_csv", f"device id {twice} appears twice")


def first_repeat(ids: Iterable[str]) -> str | None:
    """The first id seen a second time, or None."""
    seen: set[str] = set()
    for device_id in ids:
        if device_id in seen:
            return device_id
        seen.add(device_id)
    return None


async def page(
    conn: AsyncConnection[Any],
    tenant: str,
    *,
    status: str | None = None,
    tag: str | None = None,
    group: str | None = None,
    after: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """A page of the tenant's devices by id, after ``after`` (``limit`` None: all of them)."""
    params = {"tenant": tenant, "status": status, "tag": tag, "group": group, "after": after, "limit": limit}
    return await fetch_all(conn, PAGE, params)


async def get(conn: AsyncConnection[Any], tenant: str, device: str, *, lock: bool = False) -> dict[str, Any]:
    """The device (locked with ``lock``); ``NotFound`` when the tenant has none by that id."""
    return await fetch_one(conn, ONE + (" FOR UPDATE" if lock else ""), (device, tenant), f"device {device} not found")


async def tenant_of(conn: AsyncConnection[Any], device: str) -> str:
    """The tenant a device belongs to (the operator addresses devices by id alone)."""
    row = await fetch_one(
        conn, "SELECT tenant_id FROM devices WHERE device_id = %s", (device,), f"device {device} does not exist"
    )
    return str(row["tenant_id"])


async def _check_quota(conn: AsyncConnection[Any], tenant: str, adding: int) -> None:
    row = await fetch_one(
        conn,
        "SELECT t.max_devices, (SELECT count(*) FROM devices d WHERE d.tenant_id = t.tenant_id) AS devices"
        " FROM tenants t WHERE t.tenant_id = %s",
        (tenant,),
        f"tenant {tenant} does not exist",
    )
    if row["max_devices"] is not None and row["devices"] + adding > row["max_devices"]:
        raise Conflict(f"the tenant's device quota ({row['max_devices']}) would be exceeded")


async def _skip_registered(conn: AsyncConnection[Any], tenant: str, devices: list[NewDevice]) -> list[NewDevice]:
    """``exist_ok``: leave out devices already registered in ``tenant``; one registered elsewhere is a conflict."""
    taken = await fetch_all(
        conn, "SELECT device_id, tenant_id FROM devices WHERE device_id = ANY(%s)", ([d.device_id for d in devices],)
    )
    if foreign := [r["device_id"] for r in taken if r["tenant_id"] != tenant]:
        raise Conflict(f"device id already registered: {foreign[0]}")
    mine = {r["device_id"] for r in taken}
    return [d for d in devices if d.device_id not in mine]


async def _insert(
    conn: AsyncConnection[Any],
    tenant: str,
    devices: list[NewDevice],
    keys: dict[str, jwt_keys.KeyRow],
    progress: Callable[[int], None] | None,
    chunk: int,
) -> None:
    try:
        async with conn.cursor() as cur:
            for start in range(0, len(devices), chunk):
                part = devices[start : start + chunk]
                await cur.executemany(
                    "INSERT INTO devices (device_id, tenant_id, name, tags) VALUES (%s, %s, %s, %s)",
                    [(d.device_id, tenant, d.name, list(d.tags)) for d in part],
                )
                await cur.executemany(
                    "INSERT INTO device_group_members (tenant_id, group_id, device_id) VALUES (%s, %s, %s)",
                    [(tenant, g, d.device_id) for d in part for g in sorted(set(d.groups))],
                )
                await jwt_keys.insert(
                    conn, tenant, [(d.device_id, keys[d.device_id]) for d in part if d.device_id in keys]
                )
                if progress:
                    progress(len(part))
    except psycopg.errors.UniqueViolation as exc:
        raise Conflict("a device id in the request is already registered") from exc
    except psycopg.errors.ForeignKeyViolation as exc:
        raise InvalidInput("unknown_group", "a group in the request does not exist in this tenant") from exc


async def create(
    conn: AsyncConnection[Any],
    actor: Actor,
    tenant: str,
    devices: Sequence[NewDevice],
    *,
    jwt_public_keys: dict[str, bytes] | None = None,
    progress: Callable[[int], None] | None = None,
    exist_ok: bool = False,
    bulk: bool | None = None,
    chunk: int = 500,
) -> list[str]:
    """Register devices, all or none, within the tenant's quota, each in its (existing) groups and, when
    ``jwt_public_keys`` has its PEM public key, with a device-bound JWT key. Returns the ids registered; with
    ``exist_ok`` devices the tenant already has are left out. One audit entry: ``device.create`` for one device,
    ``device.bulk_create`` for several (or whenever ``bulk``)."""
    require_id("tenant", tenant)
    _check(devices)
    keys = {d: jwt_keys.key_row(d, pem) for d, pem in (jwt_public_keys or {}).items()}
    todo = await _skip_registered(conn, tenant, list(devices)) if exist_ok else list(devices)
    await _check_quota(conn, tenant, len(todo))
    await _insert(conn, tenant, todo, keys, progress, chunk)
    ids = [d.device_id for d in todo]
    if todo and not (len(devices) > 1 if bulk is None else bulk):
        await audit.record(
            conn, actor, tenant, "device.create", f"device:{ids[0]}", after=await get(conn, tenant, ids[0])
        )
    elif todo:
        await audit.record(conn, actor, tenant, "device.bulk_create", f"devices:{len(ids)}", after=ids)
    return ids


async def update(
    conn: AsyncConnection[Any],
    actor: Actor,
    tenant: str,
    device: str,
    *,
    name: str | None = None,
    tags: Sequence[str] | None = None,
    status: str | None = None,
    expected_version: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Change a device's name, tags or status (active/suspended); (before, after). A suspension notifies authsvc,
    which disconnects the device's live session (migration 0006)."""
    before = await get(conn, tenant, device, lock=True)
    if expected_version is not None and expected_version != before["version"]:
        raise PreconditionFailed(f"device {device} changed since it was read")
    if status is not None and before["status"] == "decommissioned":
        raise Conflict(f"device {device} is decommissioned")
    try:
        after = await fetch_one(
            conn,
            "UPDATE devices SET name = coalesce(%s, name), tags = coalesce(%s, tags), status = coalesce(%s, status),"
            f" version = version + 1, updated_at = now() WHERE device_id = %s AND tenant_id = %s RETURNING {COLUMNS}",
            (name, None if tags is None else list(tags), status, device, tenant),
            f"device {device} not found",
        )
    except psycopg.errors.CheckViolation as exc:
        if exc.diag.message_hint == "kestrel_lifecycle":  # the lifecycle trigger (ADR-0013)
            raise Conflict(str(exc.diag.message_primary)) from exc
        raise
    await audit.record(conn, actor, tenant, "device.update", f"device:{device}", before=before, after=after)
    return before, after


async def decommission(
    conn: AsyncConnection[Any], actor: Actor, tenant: str, device: str, *, expected_version: int | None = None
) -> tuple[dict[str, Any], bool]:
    """Revoke the device's credentials, cancel its open commands, end its session and retire it for good
    (ADR-0013). Idempotent: (the device, False) when it was decommissioned already."""
    before = await get(conn, tenant, device, lock=True)
    if expected_version is not None and expected_version != before["version"]:
        raise PreconditionFailed(f"device {device} changed since it was read")
    if before["status"] == "decommissioned":
        return before, False
    await conn.execute("SELECT kestrel_decommission_device(%s)", (device,))
    after = await get(conn, tenant, device)
    await audit.record(conn, actor, tenant, "device.decommission", f"device:{device}", before=before, after=after)
    return after, True
