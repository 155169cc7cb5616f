"""The control plane's REST routes (ADR-0012): tenants (platform administrator), devices, groups, users,
tokens, cross-device telemetry and the audit log, each tenant route inside its tenant's RLS transaction.

Other tenants' objects answer 404, never 403: a tenant cannot even learn they exist. Writes take ``If-Match``
(the ``ETag`` of the object's version) and creates take ``Idempotency-Key``. Every change writes the audit log
in its own transaction.
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import msgspec
import psycopg
from litestar import Request, Response, delete, get, patch, post, put
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema
from litestar.params import JSONBody, PathParameter, QueryParameter, RawBody
from psycopg import AsyncConnection, sql
from psycopg.rows import dict_row

from api import queries
from api.auth import CallerPrincipal, Principal, audit, platform_pool, request_id, tenant_transaction
from api.bounds import BULK_BODY_LIMIT
from api.preconditions import IdempotencyKey, IfMatch, etag, expected_version, remember, replay
from kestrel.store import registry
from kestrel_core.errors import Conflict, Forbidden, InvalidInput, NotFound, PreconditionFailed
from kestrel_core.jsondoc import PRINTABLE_PATTERN
from kestrel_core.tokens import SCOPES, Scope, new_token
from kestrel_core.topics import ID_PATTERN

Id = Annotated[str, PathParameter(pattern=f"^{ID_PATTERN}$")]
TokenId = Annotated[str, PathParameter(pattern="^[0-9a-f]{16}$")]
UserId = Annotated[str, PathParameter(pattern="^u[0-9a-f]{16}$")]
Limit = Annotated[int, QueryParameter(ge=1, le=1000, description="Page size")]
DeviceStatus = Literal["registered", "provisioned", "active", "suspended", "decommissioned"]
_STRICT = {"forbid_unknown_fields": True, "frozen": True, "kw_only": True}

# ------------------------------------------------------------------------------------------------ schemas


#: A display name or label: up to 200 characters, none of them a control character (text cannot hold U+0000).
Label = Annotated[str, msgspec.Meta(max_length=200, pattern=PRINTABLE_PATTERN)]
Limit32 = Annotated[int, msgspec.Meta(ge=1, le=2_000_000_000)]  # PostgreSQL integer columns


class Tenant(msgspec.Struct, frozen=True, kw_only=True):
    tenant_id: str
    name: str
    status: str
    max_devices: int | None
    api_requests_per_s: int | None
    ingest_messages_per_s: int | None
    version: int
    created_at: datetime


class TenantCreate(msgspec.Struct, **_STRICT):
    tenant_id: Annotated[str, msgspec.Meta(pattern=f"^{ID_PATTERN}$")]
    name: Label = ""
    max_devices: Limit32 | None = None
    api_requests_per_s: Limit32 | None = None
    ingest_messages_per_s: Limit32 | None = None


class TenantPatch(msgspec.Struct, **_STRICT):
    name: Label | None = None
    status: Literal["active", "suspended"] | None = None
    max_devices: Limit32 | None = None
    api_requests_per_s: Limit32 | None = None
    ingest_messages_per_s: Limit32 | None = None


Tag = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:=-]{1,64}$")]


class ControlDevice(msgspec.Struct, frozen=True, kw_only=True):
    device_id: str
    name: str
    status: str
    tags: list[str]
    version: int
    created_at: datetime
    updated_at: datetime


class ControlDevicePage(msgspec.Struct, frozen=True, kw_only=True):
    items: list[ControlDevice]
    next_cursor: str | None = None


class DeviceCreate(msgspec.Struct, **_STRICT):
    device_id: Annotated[str, msgspec.Meta(pattern=f"^{ID_PATTERN}$")]
    name: Label = ""
    tags: Annotated[list[Tag], msgspec.Meta(max_length=64)] = msgspec.field(default_factory=list)
    #: Existing groups of the tenant to put the device in.
    groups: Annotated[list[Annotated[str, msgspec.Meta(pattern=f"^{ID_PATTERN}$")]], msgspec.Meta(max_length=64)] = (
        msgspec.field(default_factory=list)
    )


class DevicePatch(msgspec.Struct, **_STRICT):
    name: Label | None = None
    tags: Annotated[list[Tag], msgspec.Meta(max_length=64)] | None = None
    status: Literal["active", "suspended"] | None = None


class BulkResult(msgspec.Struct, frozen=True, kw_only=True):
    created: int


class Group(msgspec.Struct, frozen=True, kw_only=True):
    group_id: str
    name: str
    devices: int
    version: int
    created_at: datetime


class GroupCreate(msgspec.Struct, **_STRICT):
    group_id: Annotated[str, msgspec.Meta(pattern=f"^{ID_PATTERN}$")]
    name: Label = ""


class User(msgspec.Struct, frozen=True, kw_only=True):
    user_id: str
    email: str
    role: str
    status: str
    version: int
    created_at: datetime


class UserCreate(msgspec.Struct, **_STRICT):
    email: Annotated[str, msgspec.Meta(pattern=r"^[^@\s\x00-\x1f\x7f]{1,64}@[^@\s\x00-\x1f\x7f]{1,255}$")]
    role: Literal["admin", "operator", "viewer"]


class UserPatch(msgspec.Struct, **_STRICT):
    role: Literal["admin", "operator", "viewer"] | None = None
    status: Literal["active", "disabled"] | None = None


class Token(msgspec.Struct, frozen=True, kw_only=True):
    token_id: str
    name: str
    user_id: str | None
    scopes: list[str]
    expires_at: datetime
    revoked_at: datetime | None
    created_at: datetime


class TokenCreate(msgspec.Struct, **_STRICT):
    scopes: Annotated[list[Scope], msgspec.Meta(min_length=1, max_length=len(SCOPES))]
    name: Label = ""
    user_id: Annotated[str, msgspec.Meta(pattern="^u[0-9a-f]{16}$")] | None = None
    expires_in_days: Annotated[int, msgspec.Meta(ge=1, le=365)] = 90


class TokenCreated(msgspec.Struct, frozen=True, kw_only=True):
    token: str  # shown once
    token_id: str
    scopes: list[str]
    expires_at: datetime


class LatestValue(msgspec.Struct, frozen=True, kw_only=True):
    device_id: str
    ts: datetime
    value: Any


class LatestPage(msgspec.Struct, frozen=True, kw_only=True):
    metric: str | None
    items: list[LatestValue]


class AuditEntry(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    before: Any
    after: Any
    request_id: str


class AuditPage(msgspec.Struct, frozen=True, kw_only=True):
    items: list[AuditEntry]
    next_cursor: int | None = None


# ------------------------------------------------------------------------------------------------ helpers


async def _fetch(conn: AsyncConnection[Any], query: str, params: Any) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=dict_row)
    return await (await cur.execute(query, params)).fetchall()


async def _one(conn: AsyncConnection[Any], query: str, params: Any, missing: str) -> dict[str, Any]:
    rows = await _fetch(conn, query, params)
    if not rows:
        raise NotFound(missing)
    return rows[0]


async def _lock_current(
    conn: AsyncConnection[Any], query: str, object_id: str, if_match: str | None, kind: str
) -> dict[str, Any]:
    """The row to update, locked; 404 when the tenant has none, 412 when ``If-Match`` names an older version."""
    row = await _one(conn, query, (object_id,), f"{kind} {object_id} not found")
    expected = expected_version(if_match)
    if expected is not None and expected != row["version"]:
        raise PreconditionFailed(f"{kind} {object_id} changed since it was read")
    return row


# ------------------------------------------------------------------------------------------------ tenants

TENANT_COLUMNS = "tenant_id, name, status, max_devices, api_requests_per_s, ingest_messages_per_s, version, created_at"


@get("/tenants", summary="List tenants (platform administrator)", tags=["tenants"])
async def list_tenants(request: Request[Any, Any, Any], principal: CallerPrincipal) -> list[Tenant]:
    principal.need_platform()
    async with platform_pool(request).connection() as conn:
        rows = await _fetch(conn, f"SELECT {TENANT_COLUMNS} FROM kestrel_platform_tenants()", ())
    return [Tenant(**r) for r in rows]


@post("/tenants", summary="Create a tenant (platform administrator)", tags=["tenants"])
async def create_tenant(
    request: Request[Any, Any, Any], principal: CallerPrincipal, data: JSONBody[TenantCreate]
) -> Tenant:
    principal.need_platform()
    try:
        async with platform_pool(request).connection() as conn:
            rows = await _fetch(
                conn,
                f"SELECT {TENANT_COLUMNS} FROM kestrel_platform_create_tenant(%s, %s, %s, %s, %s, %s, %s)",
                (
                    data.tenant_id,
                    data.name,
                    data.max_devices,
                    data.api_requests_per_s,
                    data.ingest_messages_per_s,
                    principal.actor,
                    request_id(request),
                ),
            )
    except psycopg.errors.UniqueViolation as exc:
        raise Conflict(f"tenant {data.tenant_id} already exists") from exc
    return Tenant(**rows[0])


@get("/tenants/{tenant_id:str}", summary="Get a tenant", tags=["tenants"])
async def get_tenant(request: Request[Any, Any, Any], principal: CallerPrincipal, tenant_id: Id) -> Response[Tenant]:
    if principal.platform:
        async with platform_pool(request).connection() as conn:
            rows = await _fetch(
                conn, f"SELECT {TENANT_COLUMNS} FROM kestrel_platform_tenants() WHERE tenant_id = %s", (tenant_id,)
            )
    else:
        async with tenant_transaction(request, principal.tenant or "") as conn:
            rows = await _fetch(conn, f"SELECT {TENANT_COLUMNS} FROM tenants WHERE tenant_id = %s", (tenant_id,))
    if not rows:
        raise NotFound(f"tenant {tenant_id} not found")
    return Response(Tenant(**rows[0]), headers={"ETag": etag(rows[0]["version"])})


@patch("/tenants/{tenant_id:str}", summary="Change a tenant (platform administrator)", tags=["tenants"])
async def patch_tenant(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    tenant_id: Id,
    data: JSONBody[TenantPatch],
    if_match: IfMatch = None,
) -> Response[Tenant]:
    principal.need_platform()
    changes = {k: v for k, v in msgspec.structs.asdict(data).items() if v is not None}
    try:
        async with platform_pool(request).connection() as conn:
            rows = await _fetch(
                conn,
                f"SELECT {TENANT_COLUMNS} FROM kestrel_platform_update_tenant(%s, %s, %s, %s, %s)",
                (
                    tenant_id,
                    expected_version(if_match),
                    msgspec.json.encode(changes).decode(),
                    principal.actor,
                    request_id(request),
                ),
            )
    except psycopg.Error as exc:
        if exc.sqlstate == "P0412":  # raised by kestrel_platform_update_tenant on a stale If-Match
            raise PreconditionFailed("the tenant changed since it was read") from exc
        raise
    if not rows:
        raise NotFound(f"tenant {tenant_id} not found")
    return Response(Tenant(**rows[0]), headers={"ETag": etag(rows[0]["version"])})


# ------------------------------------------------------------------------------------------------ devices

DEVICE_COLUMNS = "device_id, name, status, tags, version, created_at, updated_at"
DEVICE = f"SELECT {DEVICE_COLUMNS} FROM devices WHERE device_id = %s"
DEVICES_PAGE = f"""
SELECT {DEVICE_COLUMNS} FROM devices d
WHERE d.tenant_id = %(tenant)s
  AND (%(status)s::text IS NULL OR d.status = %(status)s)
  AND (%(tag)s::text IS NULL OR %(tag)s = ANY (d.tags))
  AND (%(group)s::text IS NULL OR EXISTS (SELECT 1 FROM device_group_members m
       WHERE m.tenant_id = d.tenant_id AND m.device_id = d.device_id AND m.group_id = %(group)s))
  AND (%(after)s::text IS NULL OR d.device_id > %(after)s)
ORDER BY d.device_id LIMIT %(limit)s
"""


@get("/devices", summary="List devices", tags=["devices"])
async def list_devices(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    status: Annotated[DeviceStatus | None, QueryParameter(description="Lifecycle state")] = None,
    group: Annotated[str | None, QueryParameter(pattern=f"^{ID_PATTERN}$", description="Only this group")] = None,
    tag: Annotated[str | None, QueryParameter(pattern=r"^[A-Za-z0-9_.:=-]{1,64}$", description="Only this tag")] = None,
    limit: Limit = 100,
    cursor: Annotated[str | None, QueryParameter(pattern=f"^{ID_PATTERN}$", description="next_cursor")] = None,
) -> ControlDevicePage:
    tenant = principal.need("devices:read")
    params = {"tenant": tenant, "status": status, "tag": tag, "group": group, "after": cursor, "limit": limit + 1}
    async with tenant_transaction(request, tenant) as conn:
        rows = await _fetch(conn, DEVICES_PAGE, params)
    items = [ControlDevice(**r) for r in rows[:limit]]
    return ControlDevicePage(items=items, next_cursor=items[-1].device_id if len(rows) > limit else None)


@get("/devices/{device_id:str}", summary="Get a device", tags=["devices"])
async def get_device(
    request: Request[Any, Any, Any], principal: CallerPrincipal, device_id: Id
) -> Response[ControlDevice]:
    tenant = principal.need("devices:read")
    async with tenant_transaction(request, tenant) as conn:
        row = await _one(
            conn,
            DEVICE,
            (device_id,),
            f"device {device_id} not found",
        )
    return Response(ControlDevice(**row), headers={"ETag": etag(row["version"])})


async def _check_quota(conn: AsyncConnection[Any], tenant: str, adding: int) -> None:
    row = await _one(
        conn,
        "SELECT t.max_devices, (SELECT count(*) FROM devices d WHERE d.tenant_id = t.tenant_id) AS devices"
        " FROM tenants t WHERE t.tenant_id = %s",
        (tenant,),
        "tenant not found",
    )
    if row["max_devices"] is not None and row["devices"] + adding > row["max_devices"]:
        raise Conflict(f"the tenant's device quota ({row['max_devices']}) would be exceeded")


async def _insert_devices(conn: AsyncConnection[Any], tenant: str, devices: list[DeviceCreate]) -> None:
    await _check_quota(conn, tenant, len(devices))
    try:
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO devices (device_id, tenant_id, name, tags) VALUES (%s, %s, %s, %s)",
                [(d.device_id, tenant, d.name, d.tags) for d in devices],
            )
            await cur.executemany(
                "INSERT INTO device_group_members (tenant_id, group_id, device_id) VALUES (%s, %s, %s)",
                [(tenant, g, d.device_id) for d in devices for g in set(d.groups)],
            )
    except psycopg.errors.UniqueViolation as exc:
        raise Conflict("a device id in the request is already registered") from exc
    except psycopg.errors.ForeignKeyViolation as exc:
        raise InvalidInput("unknown_group", "a group in the request does not exist in this tenant") from exc


@post("/devices", summary="Register a device", tags=["devices"])
async def create_device(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    data: JSONBody[DeviceCreate],
    idempotency_key: IdempotencyKey = None,
) -> ControlDevice:
    tenant = principal.need("devices:write")
    async with tenant_transaction(request, tenant) as conn:
        if (stored := await replay(conn, tenant, idempotency_key, "device", data)) is not None:
            return msgspec.convert(stored, ControlDevice)
        await _insert_devices(conn, tenant, [data])
        row = await _one(conn, DEVICE, (data.device_id,), "")
        created = ControlDevice(**row)
        await audit(conn, request, principal, "device.create", f"device:{data.device_id}", after=created)
        await remember(conn, tenant, idempotency_key, "device", data, created)
    return created


MAX_BULK = 10_000


def _parse_csv(raw: bytes) -> list[DeviceCreate]:
    """CSV as ``kestrel device import`` reads it, validated like a JSON bulk body."""
    try:
        rows = registry.parse_device_csv(raw.decode())
        return msgspec.convert(
            [{"device_id": d, "name": n, "tags": t, "groups": g} for d, n, t, g in rows], list[DeviceCreate]
        )
    except UnicodeDecodeError as exc:
        raise InvalidInput("bad_csv", "not UTF-8 CSV") from exc
    except msgspec.ValidationError as exc:
        raise InvalidInput("bad_csv", str(exc)) from exc


async def _bulk(request: Request[Any, Any, Any], principal: Principal, devices: list[DeviceCreate]) -> BulkResult:
    tenant = principal.need("devices:write")
    if not 1 <= len(devices) <= MAX_BULK:
        raise InvalidInput("bad_body", f"send 1 to {MAX_BULK} devices")
    # A bulk request is a set: an identical repeat is the same device.
    devices = list({msgspec.json.encode(d): d for d in devices}.values())
    if len({d.device_id for d in devices}) != len(devices):
        raise InvalidInput("bad_body", "a device id appears twice with different fields")
    async with tenant_transaction(request, tenant) as conn:
        await _insert_devices(conn, tenant, devices)
        await audit(
            conn,
            request,
            principal,
            "device.bulk_create",
            f"devices:{len(devices)}",
            after=[d.device_id for d in devices],
        )
    return BulkResult(created=len(devices))


@post(
    "/devices/bulk",
    summary="Register many devices (JSON array), all or none",
    tags=["devices"],
    request_max_body_size=BULK_BODY_LIMIT,
)
async def bulk_create_devices(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    data: JSONBody[
        Annotated[
            list[DeviceCreate],
            msgspec.Meta(min_length=1, max_length=MAX_BULK),
        ]
    ],
) -> BulkResult:
    return await _bulk(request, principal, data)


def _csv_pattern() -> str:
    """The CSV grammar as one regular expression (columns in the documented order)."""
    id_, tag = ID_PATTERN, r"[A-Za-z0-9_.:=-]{1,64}"
    cells = {
        "name": r"[^,;\"\x00-\x1f\x7f]{0,200}",
        "tags": rf"({tag}(;{tag}){{0,63}})?",
        "groups": rf"({id_}(;{id_}){{0,63}})?",
    }
    forms = []
    for size in range(4):
        for columns in itertools.combinations(cells, size):
            header = ",".join(("device_id", *columns))
            row = ",".join((id_, *(cells[c] for c in columns)))
            forms.append(rf"{header}\r?\n({row}\r?\n)*{row}(\r?\n)?")
    return "^(" + "|".join(forms) + ")$"


CSV_PATTERN = _csv_pattern()


@dataclass
class _CsvBody(Operation):
    """Documents the raw CSV body (Litestar reads it as ``body: bytes`` and would not describe it)."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            content={"text/csv": OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING, pattern=CSV_PATTERN))},
            required=True,
            description="UTF-8 CSV: a header device_id[,name][,tags][,groups] and 1 to 10,000 rows; tags and groups"
            " separated by ; (the groups must exist); device ids unique and not yet registered",
        )


@post(
    "/devices/import",
    summary="Register many devices from CSV, all or none",
    tags=["devices"],
    operation_class=_CsvBody,
    request_max_body_size=BULK_BODY_LIMIT,
    opt={"accepts": ("text/csv",)},
)
async def import_devices(request: Request[Any, Any, Any], principal: CallerPrincipal, body: RawBody) -> BulkResult:
    return await _bulk(request, principal, _parse_csv(body))


@patch("/devices/{device_id:str}", summary="Change a device", tags=["devices"])
async def patch_device(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    device_id: Id,
    data: JSONBody[DevicePatch],
    if_match: IfMatch = None,
) -> Response[ControlDevice]:
    tenant = principal.need("devices:write")
    async with tenant_transaction(request, tenant) as conn:
        before = ControlDevice(
            **await _lock_current(
                conn,
                DEVICE + " FOR UPDATE",
                device_id,
                if_match,
                "device",
            )
        )
        if data.status is not None and before.status == "decommissioned":
            raise Conflict(f"device {device_id} is decommissioned")
        try:
            row = await _one(
                conn,
                f"UPDATE devices SET name = coalesce(%s, name), tags = coalesce(%s, tags),"
                f" status = coalesce(%s, status), version = version + 1, updated_at = now()"
                f" WHERE device_id = %s RETURNING {DEVICE_COLUMNS}",
                (data.name, data.tags, data.status, device_id),
                f"device {device_id} not found",
            )
        except psycopg.errors.CheckViolation as exc:
            if exc.diag.message_hint == "kestrel_lifecycle":  # the lifecycle trigger (ADR-0013)
                raise Conflict(str(exc.diag.message_primary)) from exc
            raise
        after = ControlDevice(**row)
        await audit(conn, request, principal, "device.update", f"device:{device_id}", before=before, after=after)
    return Response(after, headers={"ETag": etag(after.version)})


# ------------------------------------------------------------------------------------------------ groups

GROUPS = """
SELECT g.group_id, g.name, g.version, g.created_at,
       (SELECT count(*) FROM device_group_members m WHERE m.tenant_id = g.tenant_id AND m.group_id = g.group_id)
         AS devices
FROM device_groups g WHERE g.tenant_id = %(tenant)s AND (%(group)s::text IS NULL OR g.group_id = %(group)s)
ORDER BY g.group_id
"""


@get("/groups", summary="List device groups", tags=["groups"])
async def list_groups(request: Request[Any, Any, Any], principal: CallerPrincipal) -> list[Group]:
    tenant = principal.need("groups:read")
    async with tenant_transaction(request, tenant) as conn:
        return [Group(**r) for r in await _fetch(conn, GROUPS, {"tenant": tenant, "group": None})]


@post("/groups", summary="Create a device group", tags=["groups"])
async def create_group(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    data: JSONBody[GroupCreate],
    idempotency_key: IdempotencyKey = None,
) -> Group:
    tenant = principal.need("groups:write")
    async with tenant_transaction(request, tenant) as conn:
        if (stored := await replay(conn, tenant, idempotency_key, "group", data)) is not None:
            return msgspec.convert(stored, Group)
        try:
            await conn.execute(
                "INSERT INTO device_groups (tenant_id, group_id, name) VALUES (%s, %s, %s)",
                (tenant, data.group_id, data.name),
            )
        except psycopg.errors.UniqueViolation as exc:
            raise Conflict(f"group {data.group_id} already exists") from exc
        group = Group(**(await _fetch(conn, GROUPS, {"tenant": tenant, "group": data.group_id}))[0])
        await audit(conn, request, principal, "group.create", f"group:{data.group_id}", after=group)
        await remember(conn, tenant, idempotency_key, "group", data, group)
    return group


@get("/groups/{group_id:str}", summary="Get a device group", tags=["groups"])
async def get_group(request: Request[Any, Any, Any], principal: CallerPrincipal, group_id: Id) -> Group:
    tenant = principal.need("groups:read")
    async with tenant_transaction(request, tenant) as conn:
        return Group(**await _one(conn, GROUPS, {"tenant": tenant, "group": group_id}, f"group {group_id} not found"))


@delete("/groups/{group_id:str}", summary="Delete a device group (not its devices)", tags=["groups"], status_code=204)
async def delete_group(request: Request[Any, Any, Any], principal: CallerPrincipal, group_id: Id) -> None:
    tenant = principal.need("groups:write")
    async with tenant_transaction(request, tenant) as conn:
        before = await _one(conn, GROUPS, {"tenant": tenant, "group": group_id}, f"group {group_id} not found")
        await conn.execute("DELETE FROM device_groups WHERE tenant_id = %s AND group_id = %s", (tenant, group_id))
        await audit(conn, request, principal, "group.delete", f"group:{group_id}", before=before)


@put(
    "/groups/{group_id:str}/devices/{device_id:str}",
    summary="Add a device to a group",
    tags=["groups"],
    status_code=204,
)
async def add_group_member(
    request: Request[Any, Any, Any], principal: CallerPrincipal, group_id: Id, device_id: Id
) -> None:
    tenant = principal.need("groups:write")
    async with tenant_transaction(request, tenant) as conn:
        await _one(conn, GROUPS, {"tenant": tenant, "group": group_id}, f"group {group_id} not found")
        await _one(
            conn, "SELECT 1 AS x FROM devices WHERE device_id = %s", (device_id,), f"device {device_id} not found"
        )
        await conn.execute(
            "INSERT INTO device_group_members (tenant_id, group_id, device_id) VALUES (%s, %s, %s)"
            " ON CONFLICT DO NOTHING",
            (tenant, group_id, device_id),
        )
        await audit(conn, request, principal, "group.add_device", f"group:{group_id}", after={"device_id": device_id})


@delete(
    "/groups/{group_id:str}/devices/{device_id:str}",
    summary="Remove a device from a group",
    tags=["groups"],
    status_code=204,
)
async def remove_group_member(
    request: Request[Any, Any, Any], principal: CallerPrincipal, group_id: Id, device_id: Id
) -> None:
    tenant = principal.need("groups:write")
    async with tenant_transaction(request, tenant) as conn:
        cur = await conn.execute(
            "DELETE FROM device_group_members WHERE tenant_id = %s AND group_id = %s AND device_id = %s",
            (tenant, group_id, device_id),
        )
        if cur.rowcount == 0:
            raise NotFound(f"device {device_id} is not in group {group_id}")
        await audit(
            conn, request, principal, "group.remove_device", f"group:{group_id}", before={"device_id": device_id}
        )


# ------------------------------------------------------------------------------------------------ telemetry

LATEST = """
SELECT DISTINCT ON (t.device_id) t.device_id, t.ts, {value} AS value
FROM telemetry t JOIN devices d ON d.tenant_id = t.tenant_id AND d.device_id = t.device_id
WHERE t.tenant_id = %(tenant)s AND t.ts >= %(since)s {has_metric}
  AND (%(tag)s::text IS NULL OR %(tag)s = ANY (d.tags))
  AND (%(group)s::text IS NULL OR EXISTS (SELECT 1 FROM device_group_members m
       WHERE m.tenant_id = d.tenant_id AND m.device_id = d.device_id AND m.group_id = %(group)s))
ORDER BY t.device_id, t.ts DESC
LIMIT %(limit)s
"""


@get("/telemetry/latest", summary="Latest reading of many devices (by group or tag)", tags=["telemetry"])
async def latest_telemetry(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    metric: Annotated[str | None, QueryParameter(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}$")] = None,
    group: Annotated[str | None, QueryParameter(pattern=f"^{ID_PATTERN}$")] = None,
    tag: Annotated[str | None, QueryParameter(pattern=r"^[A-Za-z0-9_.:=-]{1,64}$")] = None,
    within_hours: Annotated[int, QueryParameter(ge=1, le=24 * 31, description="Look back this far")] = 24,
    limit: Limit = 1000,
) -> LatestPage:
    tenant = principal.need("telemetry:read")
    query = sql.SQL(LATEST).format(
        value=sql.SQL("t.metrics -> %(metric)s" if metric else "t.metrics"),
        has_metric=sql.SQL("AND t.metrics ? %(metric)s" if metric else ""),
    )
    params = {
        "tenant": tenant,
        "metric": metric,
        "group": group,
        "tag": tag,
        "limit": limit,
        "since": datetime.now(UTC) - timedelta(hours=within_hours),
    }
    async with tenant_transaction(request, tenant) as conn:
        cur = conn.cursor(row_factory=dict_row)
        rows = await (await cur.execute(query, params)).fetchall()
    return LatestPage(metric=metric, items=[LatestValue(**r) for r in rows])


class GroupBucket(msgspec.Struct, frozen=True, kw_only=True):
    bucket: datetime
    value: Any
    samples: int
    devices: int


class GroupTelemetry(msgspec.Struct, frozen=True, kw_only=True):
    group_id: str
    metric: str
    agg: str
    bucket: str
    buckets: list[GroupBucket]


@get("/groups/{group_id:str}/telemetry", summary="Aggregate a metric over every device of a group", tags=["telemetry"])
async def group_telemetry(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    group_id: Id,
    metric: Annotated[str, QueryParameter(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}$")],
    agg: Annotated[queries.Agg, QueryParameter(description="Aggregate per bucket, over all the group's devices")],
    bucket: Annotated[str, QueryParameter(pattern=r"^[1-9][0-9]{0,5}[smhd]$", description="e.g. 5m")] = "1h",
    start: Annotated[datetime | None, QueryParameter(name="from", description="Inclusive start (RFC 3339)")] = None,
    end: Annotated[datetime | None, QueryParameter(name="to", description="Exclusive end (RFC 3339)")] = None,
) -> GroupTelemetry:
    tenant = principal.need("telemetry:read")
    start, end = queries.window(start, end)
    async with tenant_transaction(request, tenant) as conn:
        await _one(conn, GROUPS, {"tenant": tenant, "group": group_id}, f"group {group_id} not found")
        rows = await queries.buckets(
            conn,
            tenant=tenant,
            group=group_id,
            metric=metric,
            agg=agg,
            bucket=queries.parse_bucket(bucket),
            start=start,
            end=end,
        )
    return GroupTelemetry(
        group_id=group_id, metric=metric, agg=agg, bucket=bucket, buckets=[GroupBucket(**r) for r in rows]
    )


# ------------------------------------------------------------------------------------------------ users

USER_COLUMNS = "user_id, email, role, status, version, created_at"


@get("/users", summary="List users", tags=["users"])
async def list_users(request: Request[Any, Any, Any], principal: CallerPrincipal) -> list[User]:
    tenant = principal.need("users:read")
    async with tenant_transaction(request, tenant) as conn:
        return [User(**r) for r in await _fetch(conn, f"SELECT {USER_COLUMNS} FROM users ORDER BY email", ())]


@post("/users", summary="Create a user", tags=["users"])
async def create_user(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    data: JSONBody[UserCreate],
    idempotency_key: IdempotencyKey = None,
) -> User:
    tenant = principal.need("users:write")
    async with tenant_transaction(request, tenant) as conn:
        if (stored := await replay(conn, tenant, idempotency_key, "user", data)) is not None:
            return msgspec.convert(stored, User)
        try:
            row = await _one(
                conn,
                f"INSERT INTO users (user_id, tenant_id, email, role) VALUES (%s, %s, %s, %s) RETURNING {USER_COLUMNS}",
                ("u" + secrets.token_hex(8), tenant, data.email.lower(), data.role),
                "",
            )
        except psycopg.errors.UniqueViolation as exc:
            raise Conflict(f"a user with email {data.email} exists") from exc
        user = User(**row)
        await audit(conn, request, principal, "user.create", f"user:{user.user_id}", after=user)
        await remember(conn, tenant, idempotency_key, "user", data, user)
    return user


@patch("/users/{user_id:str}", summary="Change a user's role or status", tags=["users"])
async def patch_user(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    user_id: UserId,
    data: JSONBody[UserPatch],
    if_match: IfMatch = None,
) -> Response[User]:
    tenant = principal.need("users:write")
    async with tenant_transaction(request, tenant) as conn:
        before = User(
            **await _lock_current(
                conn, f"SELECT {USER_COLUMNS} FROM users WHERE user_id = %s FOR UPDATE", user_id, if_match, "user"
            )
        )
        row = await _one(
            conn,
            f"UPDATE users SET role = coalesce(%s, role), status = coalesce(%s, status), version = version + 1"
            f" WHERE user_id = %s RETURNING {USER_COLUMNS}",
            (data.role, data.status, user_id),
            "",
        )
        after = User(**row)
        await audit(conn, request, principal, "user.update", f"user:{user_id}", before=before, after=after)
    return Response(after, headers={"ETag": etag(after.version)})


# ------------------------------------------------------------------------------------------------ tokens

TOKEN_COLUMNS = "token_id, name, user_id, scopes, expires_at, revoked_at, created_at"  # noqa: S105 - columns


@get("/tokens", summary="List API tokens (never their secrets)", tags=["tokens"])
async def list_tokens(request: Request[Any, Any, Any], principal: CallerPrincipal) -> list[Token]:
    tenant = principal.need("tokens:read")
    async with tenant_transaction(request, tenant) as conn:
        return [
            Token(**r) for r in await _fetch(conn, f"SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY created_at", ())
        ]


@post("/tokens", summary="Create an API token (its secret is shown once)", tags=["tokens"])
async def create_token(
    request: Request[Any, Any, Any], principal: CallerPrincipal, data: JSONBody[TokenCreate]
) -> TokenCreated:
    tenant = principal.need("tokens:write")
    if not set(data.scopes) <= principal.scopes:
        raise Forbidden("a token cannot grant scopes its creator does not have")
    token_id, token, digest = new_token()
    expires_at = datetime.now(UTC) + timedelta(days=data.expires_in_days)
    async with tenant_transaction(request, tenant) as conn:
        if data.user_id is not None:
            await _one(
                conn, "SELECT 1 AS x FROM users WHERE user_id = %s", (data.user_id,), f"user {data.user_id} not found"
            )
        await conn.execute(
            "INSERT INTO api_tokens (token_id, tenant_id, user_id, name, scopes, secret_sha256, expires_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (token_id, tenant, data.user_id, data.name, sorted(set(data.scopes)), digest, expires_at),
        )
        summary = {"scopes": sorted(set(data.scopes)), "user_id": data.user_id, "expires_at": expires_at}
        await audit(conn, request, principal, "token.create", f"token:{token_id}", after=summary)
    return TokenCreated(token=token, token_id=token_id, scopes=sorted(set(data.scopes)), expires_at=expires_at)


_REVOCABLE = {"token": ("api_tokens", "token_id"), "oauth_client": ("oauth_clients", "client_id")}


async def revoke_credential(request: Request[Any, Any, Any], principal: Principal, kind: str, key: str) -> None:
    """Revoke an API token or OAuth client of the caller's tenant (404 if it has none by that id), audited once;
    revoking a revoked one again succeeds and changes nothing."""
    tenant = principal.need("tokens:write")
    table, column = _REVOCABLE[kind]  # constants, never input
    async with tenant_transaction(request, tenant) as conn:
        row = await (
            await conn.execute(
                f"UPDATE {table} SET revoked_at = coalesce(revoked_at, now()) WHERE {column} = %s"
                " RETURNING revoked_at = now()",
                (key,),
            )
        ).fetchone()
        if row is None:
            raise NotFound(f"no {kind.replace('_', ' ')} {key}")
        if row[0]:  # revoked by this request; revoking again changes nothing (DELETE is idempotent)
            await audit(conn, request, principal, f"{kind}.revoke", f"{kind}:{key}")


@delete("/tokens/{token_id:str}", summary="Revoke an API token", tags=["tokens"], status_code=204)
async def revoke_token(request: Request[Any, Any, Any], principal: CallerPrincipal, token_id: TokenId) -> None:
    await revoke_credential(request, principal, "token", token_id)


# ------------------------------------------------------------------------------------------------ audit


@get("/audit", summary="The tenant's audit log, newest first", tags=["audit"])
async def list_audit(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    limit: Limit = 100,
    cursor: Annotated[int | None, QueryParameter(ge=1, le=2**63 - 1, description="next_cursor")] = None,
) -> AuditPage:
    tenant = principal.need("audit:read")
    async with tenant_transaction(request, tenant) as conn:
        rows = await _fetch(
            conn,
            "SELECT id, at, actor, action, target, before, after, request_id FROM audit_log"
            " WHERE tenant_id = %s AND (%s::bigint IS NULL OR id < %s) ORDER BY id DESC LIMIT %s",
            (tenant, cursor, cursor, limit + 1),
        )
    items = [AuditEntry(**r) for r in rows[:limit]]
    return AuditPage(items=items, next_cursor=items[-1].id if len(rows) > limit else None)


ROUTES = [
    list_tenants,
    create_tenant,
    get_tenant,
    patch_tenant,
    list_devices,
    get_device,
    create_device,
    bulk_create_devices,
    import_devices,
    patch_device,
    list_groups,
    create_group,
    get_group,
    delete_group,
    add_group_member,
    remove_group_member,
    latest_telemetry,
    group_telemetry,
    list_users,
    create_user,
    patch_user,
    list_tokens,
    create_token,
    revoke_token,
    list_audit,
]
