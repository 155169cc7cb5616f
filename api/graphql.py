"""GraphQL at ``/api/v1/graphql`` (strawberry on Litestar), over the same tenant transactions, scopes and SQL
as the REST routes (ADR-0012). Read-only for now: devices, groups, latest values, aggregated telemetry, rules and
alarms.

Abuse limits: query depth, aliases and tokens are capped; introspection is off unless configured.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import strawberry
from litestar import Request
from litestar.enums import ScopeType
from litestar.types import Scope
from strawberry.exceptions import ConnectionRejectionError
from strawberry.extensions import DisableIntrospection, MaxAliasesLimiter, MaxTokensLimiter, QueryDepthLimiter
from strawberry.litestar import BaseContext, make_graphql_controller
from strawberry.scalars import JSON
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL
from strawberry.types import Info
from strawberry.types.unset import UNSET, UnsetType

from api.auth import Principal, provide_principal
from api.context import tenant_transaction
from api.streams import graphql as live
from api.streams.graphql import Subscription
from kestrel.store import alarms, commands, devices, groups, presence, rules, shadows, telemetry
from kestrel_core.errors import InvalidInput, KestrelError, NotFound
from kestrel_core.topics import is_valid_id

MAX_DEPTH = 6
MAX_ALIASES = 15
MAX_TOKENS = 2000
MAX_PAGE = 1000


@strawberry.type
class Bucket:
    bucket: datetime
    value: JSON | None
    samples: int


@strawberry.type
class Presence:
    online: bool
    connections: int
    last_seen: datetime | None
    reported_status: str | None
    changed_at: datetime | None


@strawberry.type
class Shadow:
    name: str
    version: int
    desired: JSON
    reported: JSON
    delta: JSON
    updated_at: datetime | None


@strawberry.type
class Command:
    command_id: str
    name: str
    params: JSON
    status: str
    result: JSON | None
    error: str | None
    attempts: int
    created_at: datetime
    completed_at: datetime | None


PRESENCE_FIELDS = ("online", "connections", "last_seen", "reported_status", "changed_at")
COMMAND_FIELDS = ("command_id", "name", "params", "status", "result", "error", "attempts", "created_at", "completed_at")


@strawberry.type
class Device:
    device_id: str
    name: str
    status: str
    tags: list[str]
    created_at: datetime

    @strawberry.field(description="Aggregates of one metric in time buckets (telemetry:read)")
    async def telemetry(
        self,
        info: Info[Any, Any],
        metric: str,
        agg: str = "avg",
        bucket: str = "1h",
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[Bucket]:
        ctx: Context = info.context
        tenant = ctx.principal.need("telemetry:read")
        start, end = telemetry.window(since, until)
        async with tenant_transaction(ctx.http, tenant) as conn:
            rows = await telemetry.buckets(
                conn, tenant=tenant, device=self.device_id, metric=metric, agg=agg,
                bucket=telemetry.parse_bucket(bucket), start=start, end=end,
            )  # fmt: skip
        return [Bucket(**r) for r in rows]

    @strawberry.field(description="Online or not, and when last seen (devices:read)")
    async def presence(self, info: Info[Any, Any]) -> Presence:
        ctx: Context = info.context
        tenant = ctx.principal.need("devices:read")
        async with tenant_transaction(ctx.http, tenant) as conn:
            row = await presence.get(conn, tenant, self.device_id)
        return Presence(**{field: row[field] for field in PRESENCE_FIELDS})

    @strawberry.field(description="The device's shadow, or null when it has none (devices:read)")
    async def shadow(self, info: Info[Any, Any], name: str = "") -> Shadow | None:
        ctx: Context = info.context
        tenant = ctx.principal.need("devices:read")
        if name and not is_valid_id(name):
            raise InvalidInput("bad_id", "shadow names match [A-Za-z0-9_-]{1,64}")
        async with tenant_transaction(ctx.http, tenant) as conn:
            found = await shadows.read_shadow(conn, self.device_id, name)
        if found is None:
            return None
        return Shadow(
            name=found.name, version=found.version, desired=JSON(found.desired), reported=JSON(found.reported),
            delta=JSON(found.delta), updated_at=found.updated_at,
        )  # fmt: skip

    @strawberry.field(description="The device's most recent commands, newest first (devices:read)")
    async def commands(self, info: Info[Any, Any], first: int = 20, status: str | None = None) -> list[Command]:
        ctx: Context = info.context
        tenant = ctx.principal.need("devices:read")
        if not 1 <= first <= MAX_PAGE:
            raise InvalidInput("bad_page", f"first must be 1 to {MAX_PAGE}")
        async with tenant_transaction(ctx.http, tenant) as conn:
            page = await commands.page(conn, tenant, self.device_id, status=status, limit=first)
        return [Command(**{field: getattr(c, field) for field in COMMAND_FIELDS}) for c in page]


@strawberry.type
class DevicePage:
    items: list[Device]
    next_cursor: str | None


@strawberry.type
class Group:
    group_id: str
    name: str
    devices: int


@strawberry.type
class Rule:
    rule_id: str
    name: str
    enabled: bool
    version: int
    definition: JSON
    updated_at: datetime


@strawberry.type
class Alarm:
    alarm_id: str
    rule_id: str
    rule_name: str
    device_id: str
    severity: str
    status: str
    acknowledged: bool
    raised_at: datetime
    raised_values: JSON
    retriggers: int
    acknowledged_by: str | None
    acknowledged_at: datetime | None
    cleared_by: str | None
    cleared_at: datetime | None


ALARM_FIELDS = tuple(Alarm.__annotations__)


#: A WebSocket's caller until ``connection_init`` authenticates it: allowed nothing.
NOBODY = Principal(actor="anonymous", tenant=None, scopes=frozenset())


class Context(BaseContext, kw_only=True):
    """Strawberry's Litestar context with the authenticated caller (strawberry fills in ``request``, or ``websocket``
    and ``connection_params`` for subscriptions)."""

    principal: Principal
    connection_params: dict[str, Any] | None = None

    @property
    def http(self) -> Request[Any, Any, Any]:
        assert self.request is not None  # always set for HTTP operations, the only ones served
        return self.request


def _device(row: dict[str, Any]) -> Device:
    return Device(
        device_id=row["device_id"], name=row["name"], status=row["status"], tags=row["tags"],
        created_at=row["created_at"],
    )  # fmt: skip


@strawberry.type
class Query:
    @strawberry.field(description="The tenant's devices, filtered and paged (devices:read)")
    async def devices(
        self,
        info: Info[Any, Any],
        status: str | None = None,
        group: str | None = None,
        tag: str | None = None,
        first: int = 100,
        after: str | None = None,
    ) -> DevicePage:
        ctx: Context = info.context
        tenant = ctx.principal.need("devices:read")
        if not 1 <= first <= MAX_PAGE:
            raise InvalidInput("bad_page", f"first must be 1 to {MAX_PAGE}")
        for value in (group, after):
            if value is not None and not is_valid_id(value):
                raise InvalidInput("bad_id", "ids match [A-Za-z0-9_-]{1,64}")
        async with tenant_transaction(ctx.http, tenant) as conn:
            rows = await devices.page(conn, tenant, status=status, tag=tag, group=group, after=after, limit=first + 1)
        items = [_device(r) for r in rows[:first]]
        return DevicePage(items=items, next_cursor=items[-1].device_id if len(rows) > first else None)

    @strawberry.field(description="One device, or null when the tenant has none by that id (devices:read)")
    async def device(self, info: Info[Any, Any], device_id: str) -> Device | None:
        ctx: Context = info.context
        tenant = ctx.principal.need("devices:read")
        if not is_valid_id(device_id):
            return None
        try:
            async with tenant_transaction(ctx.http, tenant) as conn:
                return _device(await devices.get(conn, tenant, device_id))
        except NotFound:
            return None

    @strawberry.field(description="The tenant's device groups (groups:read)")
    async def groups(self, info: Info[Any, Any]) -> list[Group]:
        ctx: Context = info.context
        tenant = ctx.principal.need("groups:read")
        async with tenant_transaction(ctx.http, tenant) as conn:
            rows = await groups.list_all(conn, tenant)
        return [Group(group_id=r["group_id"], name=r["name"], devices=r["devices"]) for r in rows]

    @strawberry.field(description="The tenant's alarm rules (rules:read)")
    async def rules(self, info: Info[Any, Any]) -> list[Rule]:
        ctx: Context = info.context
        tenant = ctx.principal.need("rules:read")
        async with tenant_transaction(ctx.http, tenant) as conn:
            rows = await rules.list_all(conn, tenant)
        return [Rule(**{f: r[f] for f in ("rule_id", "name", "enabled", "version", "definition", "updated_at")})
                for r in rows]  # fmt: skip

    @strawberry.field(description="The tenant's alarms, newest first, filtered (alarms:read)")
    async def alarms(
        self,
        info: Info[Any, Any],
        status: str | None = None,
        severity: str | None = None,
        device_id: str | None = None,
        first: int = 100,
    ) -> list[Alarm]:
        ctx: Context = info.context
        tenant = ctx.principal.need("alarms:read")
        if not 1 <= first <= MAX_PAGE:
            raise InvalidInput("bad_page", f"first must be 1 to {MAX_PAGE}")
        if device_id is not None and not is_valid_id(device_id):
            raise InvalidInput("bad_id", "ids match [A-Za-z0-9_-]{1,64}")
        async with tenant_transaction(ctx.http, tenant) as conn:
            rows = await alarms.page(conn, tenant, status=status, severity=severity, device=device_id, limit=first)
        return [Alarm(**{f: r[f] for f in ALARM_FIELDS}) for r in rows]


def build_schema(introspection: bool) -> strawberry.Schema:
    extensions: list[Any] = [  # factories: a fresh extension per request
        lambda: QueryDepthLimiter(max_depth=MAX_DEPTH),
        lambda: MaxAliasesLimiter(max_alias_count=MAX_ALIASES),
        lambda: MaxTokensLimiter(max_token_count=MAX_TOKENS),
    ]
    if not introspection:
        extensions.append(DisableIntrospection)
    return strawberry.Schema(query=Query, subscription=Subscription, extensions=extensions)


def graphql_controller(introspection: bool) -> type:
    """The GraphQL endpoint. Its contract is the committed SDL (``api/schema.graphql``), not the OpenAPI document."""
    schema = build_schema(introspection)

    async def context_getter(scope: Scope) -> Context:
        if scope["type"] == ScopeType.WEBSOCKET:
            return Context(principal=NOBODY)  # until connection_init authenticates it (on_ws_connect)
        return Context(principal=await provide_principal(Request(scope)))

    base = make_graphql_controller(
        schema, path="/graphql", graphql_ide=None, allow_queries_via_get=False, context_getter=context_getter,
        subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL,),
    )  # fmt: skip

    class Controller(base):  # type: ignore[misc,valid-type]
        async def on_ws_connect(self, context: Context) -> UnsetType | dict[str, object] | None:
            assert context.websocket is not None
            try:
                context.principal = await live.connect(context.websocket, context.connection_params or {})
            except KestrelError as exc:
                raise ConnectionRejectionError({"reason": exc.detail}) from exc
            unset: UnsetType = UNSET
            return unset

    Controller.include_in_schema = False
    Controller.opt = {"accepts": ("application/json",)}  # POST only (queries via GET are off): JSON or 415
    return Controller
