"""SQL for the API, beside the code that runs it. One query text serves native partitions and
TimescaleDB hypertables (``date_bin`` exists in both; ADR-0006)."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

import msgspec
from psycopg import AsyncConnection, sql
from psycopg.rows import dict_row

from kestrel_core.errors import InvalidInput, NotFound

Agg = Literal["avg", "min", "max", "sum", "count", "first", "last"]
ORIGIN: Final = datetime(2000, 1, 1, tzinfo=UTC)
MAX_BUCKETS: Final = 10_000
_BUCKET = re.compile(r"\A([1-9][0-9]{0,5})(s|m|h|d)\Z")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

DEVICE: Final = "SELECT device_id, tenant_id, name, status, created_at FROM devices WHERE device_id = %s"
DEVICES: Final = """
SELECT device_id, tenant_id, name, status, created_at FROM devices
WHERE (%(tenant)s::text IS NULL OR tenant_id = %(tenant)s)
  AND (%(status)s::text IS NULL OR status = %(status)s)
  AND (%(after)s::text IS NULL OR device_id > %(after)s)
ORDER BY device_id LIMIT %(limit)s
"""
RAW: Final = """
SELECT ts, seq, stream, {value} AS value FROM telemetry
WHERE tenant_id = %(tenant)s AND device_id = %(device)s AND ts >= %(from)s AND ts < %(to)s {has_metric}
  AND (%(after_ts)s::timestamptz IS NULL OR (ts, seq, stream) > (%(after_ts)s, %(after_seq)s, %(after_stream)s))
ORDER BY ts, seq, stream LIMIT %(limit)s
"""
BUCKETS: Final = """
SELECT date_bin(%(bucket)s, ts, %(origin)s) AS bucket, {agg} AS value, count(*) AS samples{devices}
FROM telemetry
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


class Cursor(msgspec.Struct, array_like=True, frozen=True):
    ts_us: int
    seq: int
    stream: str


_cursor_decoder: Final = msgspec.json.Decoder(Cursor)


def encode_cursor(ts: datetime, seq: int, stream: str) -> str:
    ts_us = (ts - ORIGIN) // timedelta(microseconds=1)
    return base64.urlsafe_b64encode(msgspec.json.encode(Cursor(ts_us, seq, stream))).decode().rstrip("=")


def decode_cursor(value: str) -> Cursor:
    try:
        return _cursor_decoder.decode(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    except (ValueError, msgspec.MsgspecError) as exc:
        raise InvalidInput("bad_cursor", "cursor is not one this API issued") from exc


def parse_bucket(value: str) -> timedelta:
    """``30s``, ``5m``, ``1h``, ``1d`` -> timedelta."""
    match = _BUCKET.match(value)
    if not match:
        raise InvalidInput("bad_bucket", "bucket must look like 30s, 5m, 1h or 1d")
    return timedelta(seconds=int(match[1]) * _UNITS[match[2]])


async def get_device(conn: AsyncConnection[Any], device_id: str) -> dict[str, Any]:
    cur = conn.cursor(row_factory=dict_row)
    row = await (await cur.execute(DEVICE, (device_id,))).fetchone()
    if row is None:
        raise NotFound(f"device {device_id} not found")
    return row


async def list_devices(
    conn: AsyncConnection[Any], *, tenant: str | None, status: str | None, after: str | None, limit: int
) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=dict_row)
    params = {"tenant": tenant, "status": status, "after": after, "limit": limit}
    return await (await cur.execute(DEVICES, params)).fetchall()


async def raw_points(
    conn: AsyncConnection[Any],
    *,
    tenant: str,
    device: str,
    metric: str | None,
    start: datetime,
    end: datetime,
    after: Cursor | None,
    limit: int,
) -> list[dict[str, Any]]:
    query = sql.SQL(RAW).format(
        value=sql.SQL("metrics -> %(metric)s" if metric else "metrics"),
        has_metric=sql.SQL("AND metrics ? %(metric)s" if metric else ""),
    )
    params = {
        "tenant": tenant,
        "device": device,
        "metric": metric,
        "from": start,
        "to": end,
        "limit": limit,
        "after_ts": ORIGIN + timedelta(microseconds=after.ts_us) if after else None,
        "after_seq": after.seq if after else None,
        "after_stream": after.stream if after else None,
    }
    cur = conn.cursor(row_factory=dict_row)
    return await (await cur.execute(query, params)).fetchall()


def window(start: datetime | None, end: datetime | None) -> tuple[datetime, datetime]:
    """A query's time range: ``to`` defaults to now, ``from`` to a day before; both need a zone, in order."""
    end = end or datetime.now(UTC)
    start = start or end - timedelta(days=1)
    if start.tzinfo is None or end.tzinfo is None:
        raise InvalidInput("bad_time", "from and to need a time zone (e.g. 2026-11-27T12:00:00Z)")
    if start >= end:
        raise InvalidInput("bad_time", "from must be before to")
    return start, end


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
    if (end - start) / bucket > MAX_BUCKETS:
        raise InvalidInput("too_many_buckets", f"the range holds more than {MAX_BUCKETS} buckets; widen the bucket")
    params = {
        "tenant": tenant,
        "device": device,
        "group": group,
        "metric": metric,
        "bucket": bucket,
        "origin": ORIGIN,
        "from": start,
        "to": end,
    }
    cur = conn.cursor(row_factory=dict_row)
    return await (await cur.execute(bucket_sql(agg, group=group is not None), params)).fetchall()
