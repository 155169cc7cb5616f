"""Devices: register one or many (JSON or CSV, all or none), list, read, change, decommission (ADR-0012, 0013).

Other tenants' devices answer 404, never 403: a tenant cannot even learn they exist.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, Response, get, patch, post
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema
from litestar.params import JSONBody, QueryParameter, RawBody

from api.auth import CallerPrincipal, Principal
from api.bounds import BULK_BODY_LIMIT
from api.context import tenant_transaction
from api.params import STRICT, TAG_PATTERN, Id, IdCursor, IdField, Label, Limit, Tags
from api.preconditions import IdempotencyKey, IfMatch, etag, expected_version, remember, replay
from kestrel.store import devices
from kestrel_core.errors import InvalidInput
from kestrel_core.topics import ID_PATTERN

DeviceStatus = Literal["registered", "provisioned", "active", "suspended", "decommissioned"]
MAX_BULK = 10_000


class Device(msgspec.Struct, frozen=True, kw_only=True):
    device_id: str
    name: str
    status: str
    tags: list[str]
    version: int
    created_at: datetime
    updated_at: datetime


class DevicePage(msgspec.Struct, frozen=True, kw_only=True):
    items: list[Device]
    next_cursor: str | None = None


class DeviceCreate(msgspec.Struct, **STRICT):
    device_id: IdField
    name: Label = ""
    tags: Tags = msgspec.field(default_factory=list)
    #: Existing groups of the tenant to put the device in.
    groups: Annotated[list[IdField], msgspec.Meta(max_length=64)] = msgspec.field(default_factory=list)

    def new(self) -> devices.NewDevice:
        return devices.NewDevice(self.device_id, self.name, self.tags, self.groups)


class DevicePatch(msgspec.Struct, **STRICT):
    name: Label | None = None
    tags: Tags | None = None
    status: Literal["active", "suspended"] | None = None


class BulkResult(msgspec.Struct, frozen=True, kw_only=True):
    created: int


@get("/devices", operation_id="listDevices", summary="List devices", tags=["devices"])
async def list_devices(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    status: Annotated[DeviceStatus | None, QueryParameter(description="Lifecycle state")] = None,
    group: Annotated[str | None, QueryParameter(pattern=f"^{ID_PATTERN}$", description="Only this group")] = None,
    tag: Annotated[str | None, QueryParameter(pattern=TAG_PATTERN, description="Only this tag")] = None,
    limit: Limit = 100,
    cursor: IdCursor = None,
) -> DevicePage:
    tenant = principal.need("devices:read")
    async with tenant_transaction(request, tenant) as conn:
        rows = await devices.page(conn, tenant, status=status, tag=tag, group=group, after=cursor, limit=limit + 1)
    items = [Device(**r) for r in rows[:limit]]
    return DevicePage(items=items, next_cursor=items[-1].device_id if len(rows) > limit else None)


@get("/devices/{device_id:str}", operation_id="getDevice", summary="Get a device", tags=["devices"])
async def get_device(request: Request[Any, Any, Any], principal: CallerPrincipal, device_id: Id) -> Response[Device]:
    tenant = principal.need("devices:read")
    async with tenant_transaction(request, tenant) as conn:
        row = await devices.get(conn, tenant, device_id)
    return Response(Device(**row), headers={"ETag": etag(row["version"])})


@post("/devices", operation_id="createDevice", summary="Register a device", tags=["devices"])
async def create_device(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    data: JSONBody[DeviceCreate],
    idempotency_key: IdempotencyKey = None,
) -> Device:
    tenant = principal.need("devices:write")
    async with tenant_transaction(request, tenant) as conn:
        if (stored := await replay(conn, tenant, idempotency_key, "device", data)) is not None:
            return msgspec.convert(stored, Device)
        await devices.create(conn, principal.acting(request), tenant, [data.new()])
        created = Device(**await devices.get(conn, tenant, data.device_id))
        await remember(conn, tenant, idempotency_key, "device", data, created)
    return created


def _parse_csv(raw: bytes) -> list[DeviceCreate]:
    """CSV as ``kestrel device import`` reads it, validated like a JSON bulk body."""
    try:
        rows = devices.parse_csv(raw.decode())
        return msgspec.convert(
            [{"device_id": d.device_id, "name": d.name, "tags": d.tags, "groups": d.groups} for d in rows],
            list[DeviceCreate],
        )
    except UnicodeDecodeError as exc:
        raise InvalidInput("bad_csv", "not UTF-8 CSV") from exc
    except msgspec.ValidationError as exc:
        raise InvalidInput("bad_csv", str(exc)) from exc


async def _bulk(request: Request[Any, Any, Any], principal: Principal, items: list[DeviceCreate]) -> BulkResult:
    tenant = principal.need("devices:write")
    if not 1 <= len(items) <= MAX_BULK:
        raise InvalidInput("bad_body", f"send 1 to {MAX_BULK} devices")
    # A bulk request is a set: an identical repeat is the same device.
    items = list({msgspec.json.encode(d): d for d in items}.values())
    if (twice := devices.first_repeat(d.device_id for d in items)) is not None:
        raise InvalidInput("bad_body", f"device id {twice} appears twice with different fields")
    async with tenant_transaction(request, tenant) as conn:
        created = await devices.create(conn, principal.acting(request), tenant, [d.new() for d in items], bulk=True)
    return BulkResult(created=len(created))


@post(
    "/devices/bulk",
    operation_id="createDevices",
    summary="Register many devices (JSON array), all or none",
    tags=["devices"],
    request_max_body_size=BULK_BODY_LIMIT,
)
async def bulk_create_devices(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    data: JSONBody[Annotated[list[DeviceCreate], msgspec.Meta(min_length=1, max_length=MAX_BULK)]],
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
    operation_id="importDevices",
    summary="Register many devices from CSV, all or none",
    tags=["devices"],
    operation_class=_CsvBody,
    request_max_body_size=BULK_BODY_LIMIT,
    opt={"accepts": ("text/csv",)},
)
async def import_devices(request: Request[Any, Any, Any], principal: CallerPrincipal, body: RawBody) -> BulkResult:
    return await _bulk(request, principal, _parse_csv(body))


@patch("/devices/{device_id:str}", operation_id="updateDevice", summary="Change a device", tags=["devices"])
async def patch_device(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    device_id: Id,
    data: JSONBody[DevicePatch],
    if_match: IfMatch = None,
) -> Response[Device]:
    tenant = principal.need("devices:write")
    async with tenant_transaction(request, tenant) as conn:
        _, after = await devices.update(
            conn, principal.acting(request), tenant, device_id, name=data.name, tags=data.tags, status=data.status,
            expected_version=expected_version(if_match),
        )  # fmt: skip
    return Response(Device(**after), headers={"ETag": etag(after["version"])})


@post(
    "/devices/{device_id:str}/decommission",
    operation_id="decommissionDevice",
    summary="Decommission a device (idempotent): credentials revoked, session ended, history kept, id never reused",
    tags=["devices"],
    status_code=200,
)
async def decommission_device(
    request: Request[Any, Any, Any], principal: CallerPrincipal, device_id: Id, if_match: IfMatch = None
) -> Device:
    tenant = principal.need("devices:write")
    async with tenant_transaction(request, tenant) as conn:
        row, _ = await devices.decommission(
            conn, principal.acting(request), tenant, device_id, expected_version=expected_version(if_match)
        )
    return Device(**row)


ROUTES = [
    list_devices,
    get_device,
    create_device,
    bulk_create_devices,
    import_devices,
    patch_device,
    decommission_device,
]
