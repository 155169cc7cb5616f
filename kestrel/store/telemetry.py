"""Telemetry reads: raw points of a device (keyset pages), aggregates per time bucket of a device or a group, and
the latest reading of many devices. One query text serves native partitions and TimescaleDB hypertables
(``date_bin`` exists in both; ADR-0006). The writer (ingest) is the only writer.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, NamedTuple

from psycopg import AsyncConnection, sql

from kestrel.store.rows import fetch_all
from kestrel_core.errors import InvalidInput

Agg = Literal["avg", "min", "max", "sum", "count", "first", "last"]
ORIGIN: Final = datetime(2000, 1, 1, tzinfo=UTC)
MAX_BUCKETS: Final = 10_000
_BUCKET = re.compile(r"\A([1-9][0-9]{0,5})(s|m|h|d)\Z")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

RAW: Final = """
SELECT ts, seq, stream, {value} AS value FROM tenant_telemetry
WHERE tenant_id = %(tenant)s AND device_id = %(device)s AND ts >= %(from)s AND ts < %(to)s {has_metric}
  AND (%(after_ts)s::timestamptz IS NULL OR (ts, seq, stream) > (%(after_ts)s, %(after_seq)s, %(after_stream)s))
ORDER BY ts, seq, stream LIMIT %(limit)s
"""
BUCKETS: Final = """
SELECT date_bin(%(bucket)s, ts, %(origin)s) AS bucket, {agg} AS value, count(*) AS samples{devices}
FROM tenant_telemetry
WHERE tenant_id = %(tenant)s AND {scope} AND ts >= %(from)s AND ts < %(to)s AND metrics ? %(metric)s
GROUP BY 1 ORDER BY 1
"""
_ONE_DEVICE: Final = "device_id = %(device)s"
_GROUP_MEMBERS: Final = (
    "device_id IN (SELECT device_id FROM device_group_members WHERE tenant_id = %(tenant)s AND group_id = %(group)s)"
)
_NUMBER = "FILTER (WHERE jsonb_typeof(metrics -> %(metric)s) = 'number')"
AGGREGATES: Final[dict[str, str]] = {
    "avg": f"to_jsonb(avg((metrics ->> %(metric)s)::float8) {_NUMBER})",
    "min": f"to_jsonb(min((metrics ->> %(metric)s)::float8) {_NUMBER})",
    "max": f"to_jsonb(max((metrics ->> %(metric)s)::float8) {_NUMBER})",
    "sum": f"to_jsonb(sum((metrics ->> %(metric)s)::float8) {_NUMBER})",
    "count": "to_jsonb(count(*))",
    "first": "(array_agg(metrics -> %(metric)s ORDER BY ts, seq, stream))[1]",
    "last": "(array_agg(metrics -> %(metric)s ORDER BY ts DESC, seq DESC, stream DESC))[1]",
}
LATEST: Final = """
SELECT DISTINCT ON (t.device_id) t.device_id, t.ts, {value} AS value
FROM tenant_telemetry t JOIN devices d ON d.tenant_id = t.tenant_id AND d.device_id = t.device_id
WHERE t.tenant_id = %(tenant)s AND t.ts >= %(since)s {has_metric}
  AND (%(tag)s::text IS NULL OR %(tag)s = ANY (d.tags))
  AND (%(group)s::text IS NULL OR EXISTS (SELECT 1 FROM device_group_members m
       WHERE m.tenant_id = d.tenant_id AND m.device_id = d.device_id AND m.group_id = %(group)s))
ORDER BY t.device_id, t.ts DESC
LIMIT %(limit)s
"""


class Position(NamedTuple):
    """Where a page of raw points ended: the last point's key."""

    ts: datetime
    seq: int
    stream: str


def parse_bucket(value: str) -> timedelta:
    """``30s``, ``5m``, ``1h``, ``1d`` -> timedelta."""
    match = _BUCKET.match(value)
    if not match:
        raise InvalidInput("bad_bucket", "bucket must look like 30s, 5m, 1h or 1d")
    return timedelta(seconds=int(match[1]) * _UNITS[match[2]])


def window(start: datetime | None, end: datetime | None) -> tuple[datetime, datetime]:
    """A query's time range: ``to`` defaults to now, ``from`` to a day before; both need a zone, in order."""
    end = end or datetime.now(UTC)
    start = start or end - timedelta(days=1)
    if start.tzinfo is None or end.tzinfo is None:
        raise InvalidInput("bad_time", "from and to need a time zone (e.g. 2026-11-27T12:00:00Z)")
    if start >= end:
        raise InvalidInput("bad_time", "from must be before to")
    return start, end


def _metric_parts(metric: str | None, prefix: str = "") -> dict[str, sql.Composable]:
    return {
        "value": sql.SQL(f"{prefix}metrics -> %(metric)s" if metric else f"{prefix}metrics"),
        "has_metric": sql.SQL(f"AND {prefix}metrics ? %(metric)s" if metric else ""),
    }


async def raw_points(
    conn: AsyncConnection[Any],
    *,
    tenant: str,
    device: str,
    metric: str | None,
    start: datetime,
    end: datetime,
    after: Position | None,
    limit: int,
) -> list[dict[str, Any]]:
    """Points in [start, end) after ``after``, in key order: the chosen metric's value, or every metric."""
    params = {
        "tenant": tenant, "device": device, "metric": metric, "from": start, "to": end, "limit": limit,
        "after_ts": after.ts if after else None, "after_seq": after.seq if after else None,
        "after_stream": after.stream if after else None,
    }  # fmt: skip
    return await fetch_all(conn, sql.SQL(RAW).format(**_metric_parts(metric)), params)


def bucket_sql(agg: str, *, group: bool = False) -> sql.Composed:
    """The bucket query for one device, or (``group``) over a group's devices, counting them per bucket."""
    return sql.SQL(BUCKETS).format(
        agg=sql.SQL(AGGREGATES[agg]),  # agg is from a closed set
        devices=sql.SQL(", count(DISTINCT device_id) AS devices" if group else ""),
        scope=sql.SQL(_GROUP_MEMBERS if group else _ONE_DEVICE),
    )


async def buckets(
    conn: AsyncConnection[Any],
    *,
    tenant: str,
    metric: str,
    agg: str,
    bucket: timedelta,
    start: datetime,
    end: datetime,
    device: str | None = None,
    group: str | None = None,
) -> list[dict[str, Any]]:
    """Aggregates per bucket of one device, or of every device in ``group`` (rows then carry ``devices``)."""
    if agg not in AGGREGATES:
        raise InvalidInput("bad_aggregation", f"agg must be one of {', '.join(AGGREGATES)}")
    if (end - start) / bucket > MAX_BUCKETS:
        raise InvalidInput("too_many_buckets", f"the range holds more than {MAX_BUCKETS} buckets; widen the bucket")
    params = {
        "tenant": tenant, "device": device, "group": group, "metric": metric, "bucket": bucket, "origin": ORIGIN,
        "from": start, "to": end,
    }  # fmt: skip
    return await fetch_all(conn, bucket_sql(agg, group=group is not None), params)


async def latest(
    conn: AsyncConnection[Any],
    tenant: str,
    *,
    metric: str | None,
    group: str | None,
    tag: str | None,
    since: datetime,
    limit: int,
) -> list[dict[str, Any]]:
    """The latest reading since ``since`` of each device (of a group, with a tag), by device id."""
    params = {"tenant": tenant, "metric": metric, "group": group, "tag": tag, "limit": limit, "since": since}
    return await fetch_all(conn, sql.SQL(LATEST).format(**_metric_parts(metric, "t.")), params)
