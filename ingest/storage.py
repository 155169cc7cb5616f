"""The writer's storage: telemetry rows in, through a session staging table (binary COPY), idempotently.

``store_rows`` is the whole database side of a batch (and what the COPY ceiling in ``bench/run.py`` measures): COPY
into ``telemetry_stage``, ``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` joined to the registry (a reading of an
unknown device is not stored; its tenant and device are returned), commit.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple

import psycopg
from psycopg.adapt import Dumper
from psycopg.pq import Format
from psycopg.rows import dict_row

from kestrel_core.messages.telemetry import TelemetryEnvelope

EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

STAGE_DDL: Final = (
    "CREATE TEMP TABLE IF NOT EXISTS telemetry_stage ("
    " tenant_id text, device_id text, stream text, ts timestamptz, seq bigint, metrics jsonb,"
    " received_at timestamptz) ON COMMIT DELETE ROWS"
)
COPY_STAGE: Final = (
    "COPY telemetry_stage (tenant_id, device_id, stream, ts, seq, metrics, received_at) FROM STDIN (FORMAT BINARY)"
)
COPY_TYPES: Final = ["text", "text", "text", "timestamptz", "int8", "jsonb", "timestamptz"]
INSERT_FROM_STAGE: Final = """
WITH inserted AS (
    INSERT INTO telemetry (tenant_id, device_id, stream, ts, seq, metrics, received_at)
    SELECT s.tenant_id, s.device_id, s.stream, s.ts, s.seq, s.metrics, s.received_at
    FROM telemetry_stage s
    JOIN devices d ON d.device_id = s.device_id AND d.tenant_id = s.tenant_id
    ON CONFLICT DO NOTHING
    RETURNING 1)
SELECT count(*) AS inserted FROM inserted
"""
UNKNOWN_DEVICES: Final = """
SELECT DISTINCT s.tenant_id, s.device_id FROM telemetry_stage s
WHERE NOT EXISTS (SELECT 1 FROM devices d WHERE d.device_id = s.device_id AND d.tenant_id = s.tenant_id)
"""
#: "Last seen" is when the platform last heard from a device, telemetry included (issue 10): the receive time, never
#: moved back.
TOUCH_LAST_SEEN: Final = """
INSERT INTO device_presence (tenant_id, device_id, last_seen)
SELECT * FROM unnest(%s::text[], %s::text[], %s::timestamptz[])
ON CONFLICT (device_id) DO UPDATE SET last_seen = greatest(device_presence.last_seen, EXCLUDED.last_seen)
"""


class RawJson(bytes):
    """JSON text that is already valid; written to jsonb without re-encoding."""


class RawJsonbBinaryDumper(Dumper):
    """jsonb's binary format is a version byte (1) followed by the JSON text."""

    format = Format.BINARY

    def dump(self, obj: Any) -> bytes:
        return b"\x01" + bytes(obj)


class Row(NamedTuple):
    """One staging row (the COPY's columns, in order)."""

    tenant: str
    device: str
    stream: str
    ts: datetime
    seq: int
    metrics: RawJson
    received_at: datetime


StoreResult = tuple[int, int, set[tuple[str, str]]]  # rows staged, rows inserted, unknown (tenant, device)


def to_rows(envelope: TelemetryEnvelope) -> list[Row]:
    """The staging rows of one envelope (pure)."""
    received = EPOCH + timedelta(microseconds=envelope.received_us)
    return [
        Row(
            envelope.tenant,
            envelope.device,
            envelope.stream,
            EPOCH + timedelta(microseconds=p.ts_us),
            p.seq,
            RawJson(p.metrics),
            received,
        )
        for p in envelope.points
    ]


async def prepare_connection(conn: psycopg.AsyncConnection[Any]) -> None:
    """Raw-JSON jsonb dumping and the session's staging table; once per connection."""
    RawJsonbBinaryDumper.oid = conn.adapters.types["jsonb"].oid
    conn.adapters.register_dumper(RawJson, RawJsonbBinaryDumper)
    await conn.execute(STAGE_DDL)
    await conn.commit()


async def store_rows(conn: psycopg.AsyncConnection[Any], rows: list[Row]) -> StoreResult:
    """Binary COPY into staging, idempotent insert of known devices' rows, commit.

    Returns (rows staged, rows inserted, unknown devices). A missing daily partition is created and the
    batch retried once; content PostgreSQL refuses raises ``StorageRejected``.
    """
    for attempt in (1, 2):
        try:
            async with conn.cursor(row_factory=dict_row) as cur:
                async with cur.copy(COPY_STAGE) as copy:
                    copy.set_types(COPY_TYPES)
                    for row in rows:
                        await copy.write_row(row)
                inserted = await (await cur.execute(INSERT_FROM_STAGE)).fetchone()
                unknown = {
                    (r["tenant_id"], r["device_id"]) for r in await (await cur.execute(UNKNOWN_DEVICES)).fetchall()
                }
            await conn.commit()
            return len(rows), int(inserted["inserted"]) if inserted else 0, unknown
        except psycopg.errors.CheckViolation:
            # "no partition of relation found": create the days this batch needs, then retry once.
            await conn.rollback()
            if attempt == 2:
                raise StorageRejected("no partition for the batch") from None
            times = [row.ts for row in rows]
            await conn.execute("SELECT telemetry_ensure_partitions(%s, %s)", (min(times), max(times)))
            await conn.commit()
        except (psycopg.errors.DataError, psycopg.errors.IntegrityError) as exc:
            await conn.rollback()
            raise StorageRejected(str(exc).splitlines()[0]) from exc
    raise AssertionError("unreachable")


class StorageRejected(Exception):
    """The database refused a batch for its content (not a transient failure)."""


class LastSeen:
    """Which devices' "last seen" is due for a write: each at most once per ``interval_s`` (pure bookkeeping)."""

    def __init__(self, interval_s: float, max_devices: int = 1_000_000) -> None:
        self.interval_s = interval_s
        self.max_devices = max_devices
        self._next: dict[str, float] = {}

    def due(self, envelopes: list[TelemetryEnvelope], now: float) -> list[tuple[str, str, datetime]]:
        """(tenant, device, received at) of the newest message of each device that is due; marks them written."""
        newest: dict[str, TelemetryEnvelope] = {}
        for envelope in envelopes:
            if self._next.get(envelope.device, 0.0) <= now:
                current = newest.get(envelope.device)
                if current is None or envelope.received_us > current.received_us:
                    newest[envelope.device] = envelope
        if len(self._next) > self.max_devices:
            self._next.clear()  # bounded memory: forgetting only means one early write per device
        for device in newest:
            self._next[device] = now + self.interval_s
        return [(e.tenant, e.device, EPOCH + timedelta(microseconds=e.received_us)) for e in newest.values()]
