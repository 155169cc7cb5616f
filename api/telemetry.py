"""Telemetry reads: one device's points or aggregates, the latest value of many devices, a group's aggregates."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final

import msgspec
from litestar import Request, get
from litestar.params import QueryParameter

from api.auth import CallerPrincipal
from api.context import tenant_transaction
from api.params import METRIC_PATTERN, TAG_PATTERN, Id, Limit
from kestrel.store import devices, groups, telemetry
from kestrel.store.telemetry import ORIGIN, Agg, Position
from kestrel_core.errors import InvalidInput
from kestrel_core.messages.telemetry import NO_SEQ, MetricValue
from kestrel_core.topics import ID_PATTERN

Metric = Annotated[str, QueryParameter(pattern=METRIC_PATTERN)]
BUCKET_PATTERN: Final = r"^[1-9][0-9]{0,5}[smhd]$"
From = Annotated[datetime | None, QueryParameter(name="from", description="Inclusive start (RFC 3339)")]
To = Annotated[datetime | None, QueryParameter(name="to", description="Exclusive end (RFC 3339)")]


class TelemetryPoint(msgspec.Struct, frozen=True, kw_only=True):
    """One stored reading: the chosen metric's value, or every metric when no ``metric`` was asked for."""

    ts: datetime
    seq: int | None
    stream: str
    value: MetricValue | dict[str, MetricValue] | None


class TelemetryBucket(msgspec.Struct, frozen=True, kw_only=True):
    bucket: datetime
    value: MetricValue | None
    samples: int


class Telemetry(msgspec.Struct, frozen=True, kw_only=True):
    """Raw points (no ``bucket``/``agg``) or aggregated buckets (both given)."""

    device_id: str
    metric: str | None
    start: datetime = msgspec.field(name="from")
    end: datetime = msgspec.field(name="to")
    bucket: str | None = None
    agg: Agg | None = None
    points: list[TelemetryPoint] = msgspec.field(default_factory=list)
    buckets: list[TelemetryBucket] = msgspec.field(default_factory=list)
    next_cursor: str | None = None


class LatestValue(msgspec.Struct, frozen=True, kw_only=True):
    device_id: str
    ts: datetime
    value: Any


class LatestPage(msgspec.Struct, frozen=True, kw_only=True):
    metric: str | None
    items: list[LatestValue]


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


class _Cursor(msgspec.Struct, array_like=True, frozen=True):
    ts_us: int
    seq: int
    stream: str


_cursor_decoder: Final = msgspec.json.Decoder(_Cursor)


def encode_cursor(ts: datetime, seq: int, stream: str) -> str:
    ts_us = (ts - ORIGIN) // timedelta(microseconds=1)
    return base64.urlsafe_b64encode(msgspec.json.encode(_Cursor(ts_us, seq, stream))).decode().rstrip("=")


def decode_cursor(value: str) -> Position:
    try:
        cursor = _cursor_decoder.decode(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    except (ValueError, msgspec.MsgspecError) as exc:
        raise InvalidInput("bad_cursor", "cursor is not one this API issued") from exc
    return Position(ORIGIN + timedelta(microseconds=cursor.ts_us), cursor.seq, cursor.stream)


@get(
    "/devices/{device_id:str}/telemetry",
    operation_id="getDeviceTelemetry",
    summary="Query a device's telemetry",
    tags=["telemetry"],
)
async def get_telemetry(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    device_id: Id,
    metric: Annotated[
        str | None, QueryParameter(pattern=METRIC_PATTERN, description="Metric name; required with agg")
    ] = None,
    start: From = None,
    end: To = None,
    bucket: Annotated[str | None, QueryParameter(pattern=BUCKET_PATTERN, description="e.g. 5m")] = None,
    agg: Annotated[Agg | None, QueryParameter(description="Aggregate per bucket")] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=10_000, description="Page size")] = 1000,
    cursor: Annotated[str | None, QueryParameter(description="next_cursor of the previous page")] = None,
) -> Telemetry:
    start, end = telemetry.window(start, end)
    if (bucket is None) != (agg is None):
        raise InvalidInput("bad_aggregation", "bucket and agg go together")
    if agg is not None and metric is None:
        raise InvalidInput("bad_aggregation", "an aggregate needs a metric")
    tenant = principal.need("telemetry:read")
    async with tenant_transaction(request, tenant) as conn:
        await devices.get(conn, tenant, device_id)
        if agg is not None and bucket is not None and metric is not None:
            rows = await telemetry.buckets(
                conn, tenant=tenant, device=device_id, metric=metric, agg=agg,
                bucket=telemetry.parse_bucket(bucket), start=start, end=end,
            )  # fmt: skip
            return Telemetry(
                device_id=device_id, metric=metric, start=start, end=end, bucket=bucket, agg=agg,
                buckets=[TelemetryBucket(**row) for row in rows],
            )  # fmt: skip
        rows = await telemetry.raw_points(
            conn, tenant=tenant, device=device_id, metric=metric, start=start, end=end,
            after=decode_cursor(cursor) if cursor else None, limit=limit + 1,
        )  # fmt: skip
    page = rows[:limit]
    points = [
        TelemetryPoint(ts=r["ts"], seq=None if r["seq"] == NO_SEQ else r["seq"], stream=r["stream"], value=r["value"])
        for r in page
    ]
    next_cursor = None
    if len(rows) > limit:
        last = page[-1]
        next_cursor = encode_cursor(last["ts"], last["seq"], last["stream"])
    return Telemetry(device_id=device_id, metric=metric, start=start, end=end, points=points, next_cursor=next_cursor)


@get(
    "/telemetry/latest",
    operation_id="getLatestTelemetry",
    summary="Latest reading of many devices (by group or tag)",
    tags=["telemetry"],
)
async def latest_telemetry(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    metric: Annotated[str | None, QueryParameter(pattern=METRIC_PATTERN)] = None,
    group: Annotated[str | None, QueryParameter(pattern=f"^{ID_PATTERN}$")] = None,
    tag: Annotated[str | None, QueryParameter(pattern=TAG_PATTERN)] = None,
    within_hours: Annotated[int, QueryParameter(ge=1, le=24 * 31, description="Look back this far")] = 24,
    limit: Limit = 1000,
) -> LatestPage:
    tenant = principal.need("telemetry:read")
    since = datetime.now(UTC) - timedelta(hours=within_hours)
    async with tenant_transaction(request, tenant) as conn:
        rows = await telemetry.latest(conn, tenant, metric=metric, group=group, tag=tag, since=since, limit=limit)
    return LatestPage(metric=metric, items=[LatestValue(**r) for r in rows])


@get(
    "/groups/{group_id:str}/telemetry",
    operation_id="getGroupTelemetry",
    summary="Aggregate a metric over every device of a group",
    tags=["telemetry"],
)
async def group_telemetry(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    group_id: Id,
    metric: Metric,
    agg: Annotated[Agg, QueryParameter(description="Aggregate per bucket, over all the group's devices")],
    bucket: Annotated[str, QueryParameter(pattern=BUCKET_PATTERN, description="e.g. 5m")] = "1h",
    start: From = None,
    end: To = None,
) -> GroupTelemetry:
    tenant = principal.need("telemetry:read")
    start, end = telemetry.window(start, end)
    async with tenant_transaction(request, tenant) as conn:
        await groups.get(conn, tenant, group_id)
        rows = await telemetry.buckets(
            conn, tenant=tenant, group=group_id, metric=metric, agg=agg, bucket=telemetry.parse_bucket(bucket),
            start=start, end=end,
        )  # fmt: skip
    return GroupTelemetry(
        group_id=group_id, metric=metric, agg=agg, bucket=bucket, buckets=[GroupBucket(**r) for r in rows]
    )


ROUTES = [get_telemetry, latest_telemetry, group_telemetry]
