"""Ingest writer: JetStream pull consumer -> PostgreSQL, idempotent, ack after commit (ADR-0004).

Per batch: decode envelopes (malformed -> term + dead-letter), binary COPY the rows into a temporary
staging table, ``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` joined to the device registry
(unknown devices -> dead-letter), commit, then ack. Transient database errors nak the batch with a
backoff that grows with the delivery count. A batch the database rejects for its content is split
message by message so that one poison message cannot stall the consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import psycopg
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry, Counter, Histogram

from ingest.jetstream import (
    JetStreamPublisher,
    RawPuller,
    ensure_writer_consumer,
    forward_max_deliveries,
    publish_deadletter,
)
from ingest.storage import (
    TOUCH_LAST_SEEN,
    LastSeen,
    StorageRejected,
    StoreResult,
    prepare_connection,
    store_rows,
    to_rows,
)
from kestrel.runtime.tracing import Tracing
from kestrel_core import streams
from kestrel_core.errors import InvalidInput
from kestrel_core.messages.telemetry import TelemetryEnvelope, decode_envelope
from kestrel_core.ratelimit import TokenBuckets
from kestrel_core.retry import Backoff

log = logging.getLogger("kestrel.ingest.writer")


class WriterSettings(msgspec.Struct, frozen=True, kw_only=True):
    """``KESTREL_WRITER_*``; the database comes from ``KESTREL_DATABASE_URL``."""

    #: NATS JetStream (the TELEMETRY stream).
    nats_url: str = "nats://127.0.0.1:4222"
    #: The durable consumer's name: writers with the same name share the work.
    durable: str = streams.WRITER_DURABLE
    #: Most messages stored in one transaction.
    batch_size: int = 5000
    #: A partial batch is stored after this long.
    flush_interval_s: float = 0.05
    ack_wait_s: float = 30.0  # redelivery delay after a writer crash; far above the p99 batch time
    #: A message redelivered this often is dead-lettered.
    max_deliver: int = 200
    #: Most messages delivered and not yet acknowledged.
    max_ack_pending: int = 50_000
    #: Longest back-off before a batch the database refused is redelivered.
    max_nak_delay_s: float = 30.0
    #: How often tomorrow's partitions are created and quotas re-read.
    maintenance_interval_s: float = 3600.0
    #: A device's "last seen" is written at most this often (telemetry of one device costs no write per message).
    last_seen_interval_s: float = 10.0
    #: Prometheus metrics (/metrics) listen here; port 0 turns them off.
    metrics_host: str = "127.0.0.1"
    #: 0: no metrics endpoint.
    metrics_port: int = 9102


class WriterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter(
            "kestrel_writer_messages", "JetStream messages by outcome", ["outcome"], registry=registry
        )
        self.rows = Counter(
            "kestrel_writer_rows", "Readings by outcome (inserted, duplicate)", ["outcome"], registry=registry
        )
        self.deadlettered = Counter(
            "kestrel_writer_deadlettered", "Messages dead-lettered by reason", ["reason"], registry=registry
        )
        self.batch_seconds = Histogram(
            "kestrel_writer_batch_seconds",
            "Time to store and ack one batch",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=registry,
        )
        self.ingest_latency = Histogram(
            "kestrel_writer_ingest_latency_seconds",
            "From the bridge's receipt of a message to its readings committed (the ingest latency SLO)",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 120),
            registry=registry,
        )
        self.batch_size = Histogram(
            "kestrel_writer_batch_messages",
            "Messages per batch",
            buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000),
            registry=registry,
        )


@dataclass(frozen=True, slots=True)
class Decoded:
    msg: Msg
    envelope: TelemetryEnvelope


def delivery_count(msg: Msg) -> int:
    """Number of deliveries of ``msg`` from its ``$JS.ACK`` reply subject (1 when unknown)."""
    tokens = msg.reply.split(".")
    with contextlib.suppress(ValueError, IndexError):
        # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending> (and a domain form with 2 more)
        return int(tokens[4] if len(tokens) == 9 else tokens[6])
    return 1


QUOTA_REFRESH_S = 10.0
QUOTAS = "SELECT tenant_id, ingest_messages_per_s FROM tenants WHERE ingest_messages_per_s IS NOT NULL"


class Writer:
    """Stores batches; owns one database connection, reconnecting on failure."""

    def __init__(
        self,
        settings: WriterSettings,
        database_url: str,
        nc: NATS,
        publisher: JetStreamPublisher,
        metrics: WriterMetrics,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.tracing = tracing
        self.database_url = database_url
        self.nc = nc
        self.publisher = publisher
        self.metrics = metrics
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.quotas: dict[str, int] = {}  # tenant -> ingest messages/s (tenants.ingest_messages_per_s)
        self._quotas_at = -QUOTA_REFRESH_S
        self._buckets = TokenBuckets()
        self.last_seen = LastSeen(settings.last_seen_interval_s)

    async def connect(self) -> psycopg.AsyncConnection[Any]:
        if self.conn is None or self.conn.closed:
            conn = await psycopg.AsyncConnection.connect(self.database_url, autocommit=False)
            await prepare_connection(conn)
            self.conn = conn
        return self.conn

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()

    async def maintain(self) -> None:
        conn = await self.connect()
        await conn.execute("SELECT telemetry_maintain()")
        await conn.commit()

    async def _refresh_quotas(self) -> None:
        """Per-tenant ingest limits, re-read every QUOTA_REFRESH_S (a failed read keeps the last known)."""
        if time.monotonic() - self._quotas_at < QUOTA_REFRESH_S:
            return
        conn = await self.connect()
        rows = await (
            await conn.execute(
                "SELECT tenant_id, ingest_messages_per_s FROM tenants WHERE ingest_messages_per_s IS NOT NULL"
            )
        ).fetchall()
        await conn.commit()
        self.quotas = {tenant: int(rate) for tenant, rate in rows}
        self._quotas_at = time.monotonic()

    def _over_quota(self, decoded: list[Decoded]) -> tuple[list[Decoded], list[Decoded]]:
        """(admitted, over their tenant's messages/s): one tenant's flood never delays another's messages."""
        admitted, over = [], []
        for item in decoded:
            rate = self.quotas.get(item.envelope.tenant)
            if rate is not None and self._buckets.take(item.envelope.tenant, float(rate)) is not None:
                over.append(item)
            else:
                admitted.append(item)
        return admitted, over

    async def _store(self, decoded: list[Decoded]) -> StoreResult:
        return await store_rows(await self.connect(), [row for d in decoded for row in to_rows(d.envelope)])

    async def flush(self, msgs: list[Msg]) -> None:
        """Store ``msgs`` and settle every one of them: ack, nak or term (+ dead-letter)."""
        started = time.perf_counter()
        decoded: list[Decoded] = []
        malformed: list[tuple[Msg, InvalidInput]] = []
        for msg in msgs:
            try:
                decoded.append(Decoded(msg, decode_envelope(msg.data)))
            except InvalidInput as exc:
                malformed.append((msg, exc))
        await asyncio.gather(*(self._reject(msg, exc.reason, exc.detail, term=True) for msg, exc in malformed))
        if decoded:
            try:
                await self._refresh_quotas()
            except (psycopg.Error, OSError) as exc:
                log.warning("could not read ingest quotas; keeping the last known: %s", str(exc).splitlines()[0])
            decoded, over = self._over_quota(decoded)
            await asyncio.gather(
                *(
                    self._reject(
                        d.msg,
                        "tenant_rate_limited",
                        f"tenant {d.envelope.tenant} is over its ingest quota"
                        f" of {self.quotas.get(d.envelope.tenant)} messages/s",
                        term=False,
                    )
                    for d in over
                )
            )
        if decoded:
            try:
                await self._store_and_settle(decoded)
            except StorageRejected:
                for single in decoded:  # find the poison message(s); the rest are stored normally
                    try:
                        await self._store_and_settle([single])
                    except StorageRejected as exc:
                        await self._reject(single.msg, "storage_rejected", str(exc), term=True)
            except (psycopg.OperationalError, psycopg.errors.AdminShutdown, OSError) as exc:
                await self._nak_all(decoded, exc)
        self.metrics.batch_size.observe(len(msgs))
        self.metrics.batch_seconds.observe(time.perf_counter() - started)

    async def _touch_last_seen(self, envelopes: list[TelemetryEnvelope]) -> None:
        """Best effort, after the batch is acknowledged: presence is a convenience, the readings are the record."""
        due = self.last_seen.due(envelopes, time.monotonic())
        if not due:
            return
        conn = await self.connect()
        try:
            await conn.execute(TOUCH_LAST_SEEN, ([t for t, _, _ in due], [d for _, d, _ in due], [a for *_, a in due]))
            await conn.commit()
        except psycopg.Error as exc:
            with contextlib.suppress(psycopg.Error):
                await conn.rollback()
            log.warning("could not update last seen: %s", str(exc).splitlines()[0])

    async def _store_and_settle(self, decoded: list[Decoded]) -> None:
        started_ns = time.time_ns()
        staged, inserted, unknown = await self._store(decoded)
        strangers = [d for d in decoded if (d.envelope.tenant, d.envelope.device) in unknown]
        for item in decoded:
            if (item.envelope.tenant, item.envelope.device) not in unknown:
                await self.nc.publish(item.msg.reply, b"+ACK")
        await asyncio.gather(
            *(
                self._reject(
                    d.msg,
                    "unknown_device",
                    f"device {d.envelope.device} is not registered in tenant {d.envelope.tenant}",
                    term=False,
                )
                for d in strangers
            )
        )
        known_staged = staged - sum(len(d.envelope.points) for d in strangers)
        await self._touch_last_seen([d.envelope for d in decoded if d not in strangers])
        self.metrics.rows.labels("inserted").inc(inserted)
        self.metrics.rows.labels("duplicate").inc(max(known_staged - inserted, 0))
        self.metrics.messages.labels("stored").inc(len(decoded) - len(strangers))
        now_ns, unknown_ids = time.time_ns(), {id(d) for d in strangers}
        traced, tracing = log.isEnabledFor(logging.DEBUG), self.tracing
        for item in decoded:
            if id(item) not in unknown_ids:
                self.metrics.ingest_latency.observe(max(0, now_ns // 1000 - item.envelope.received_us) / 1_000_000)
                if not (traced or tracing):
                    continue
                headers = item.msg.headers or {}
                where = {"msg_id": headers.get(streams.HDR_MSG_ID), "traceparent": headers.get(streams.HDR_TRACEPARENT)}
                if traced:  # the bridge logged the same message id and trace context (KESTREL_LOG_LEVEL=DEBUG)
                    log.debug("telemetry stored", extra={**where, "rows": len(item.envelope.points)})
                if tracing and (span := tracing.start("kestrel.writer store", where["traceparent"], {
                    "kestrel.msg_id": where["msg_id"] or "", "kestrel.tenant": item.envelope.tenant,
                    "kestrel.device": item.envelope.device, "kestrel.rows": len(item.envelope.points),
                    "db.system.name": "postgresql"}, started_ns)):  # fmt: skip
                    span.end(now_ns)

    async def _reject(self, msg: Msg, reason: str, detail: str, *, term: bool) -> None:
        """Dead-letter first, then settle: the message is never dropped before it is in the DLQ."""
        meta = msg.reply.split(".")
        stream_seq = meta[5] if len(meta) == 9 else msg.reply
        await publish_deadletter(
            self.publisher,
            source="writer",
            reason=reason,
            detail=detail,
            payload=msg.data,
            msg_id=f"dlq.writer.{stream_seq}",
            extra={streams.HDR_TOPIC: msg.subject},
        )
        await self.nc.publish(msg.reply, b"+TERM" if term else b"+ACK")
        self.metrics.deadlettered.labels(reason).inc()
        self.metrics.messages.labels("deadlettered").inc()

    async def _nak_all(self, decoded: list[Decoded], exc: Exception) -> None:
        log.warning("database unavailable, batch will be redelivered: %s", str(exc).splitlines()[0])
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.close()
            self.conn = None
        for item in decoded:
            delay = Backoff(base_s=0.5, cap_s=self.settings.max_nak_delay_s).delay(delivery_count(item.msg))
            with contextlib.suppress(Exception):
                await self.nc.publish(item.msg.reply, b"-NAK " + json.dumps({"delay": int(delay * 1e9)}).encode())
        self.metrics.messages.labels("nak").inc(len(decoded))
        await asyncio.sleep(0.5)


async def run_writer(
    settings: WriterSettings,
    database_url: str,
    stop: asyncio.Event,
    nc: NATS,
    registry: CollectorRegistry,
    ready: asyncio.Event | None = None,
    tracing: Tracing | None = None,
) -> None:
    """Pull, store and ack until ``stop``; then finish the batches already pulled and return."""
    metrics = WriterMetrics(registry)
    await ensure_writer_consumer(
        nc,
        settings.durable,
        ack_wait_s=settings.ack_wait_s,
        max_deliver=settings.max_deliver,
        max_ack_pending=settings.max_ack_pending,
    )
    publisher = JetStreamPublisher(nc)
    await publisher.start()
    await forward_max_deliveries(nc, publisher, settings.durable)
    writer = Writer(settings, database_url, nc, publisher, metrics, tracing)
    try:
        await writer.maintain()
    except psycopg.Error as exc:  # the database may come later; batches nak until it does
        log.warning("database not reachable at start-up: %s", str(exc).splitlines()[0] if str(exc) else exc)
    puller = RawPuller(nc, streams.TELEMETRY_STREAM, settings.durable)
    await puller.start()
    batches: asyncio.Queue[list[Msg] | None] = asyncio.Queue(maxsize=2)

    async def pull() -> None:
        while not stop.is_set():
            msgs = await puller.fetch(settings.batch_size, settings.flush_interval_s)
            if msgs:
                await batches.put(msgs)
        await batches.put(None)

    async def store() -> None:
        last_maintenance = time.monotonic()
        while (msgs := await batches.get()) is not None:
            await writer.flush(msgs)
            if time.monotonic() - last_maintenance > settings.maintenance_interval_s:
                last_maintenance = time.monotonic()
                with contextlib.suppress(psycopg.Error):
                    await writer.maintain()

    if ready is not None:
        ready.set()
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(pull(), name="writer-pull")
        tasks.create_task(store(), name="writer-store")
    await nc.flush()
    await publisher.close()
    await writer.close()
    log.info("writer stopped")
