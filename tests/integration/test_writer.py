"""The writer against real NATS JetStream and PostgreSQL, run in-process."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import msgspec
import nats
import psycopg
import pytest
import pytest_asyncio
from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry

from ingest.jetstream import JetStreamPublisher, ensure_streams
from ingest.writer import WriterSettings, run_writer
from kestrel.devtools.servers import NatsServer
from kestrel_core import streams
from kestrel_core.messages.telemetry import Point, TelemetryEnvelope, TelemetryLimits, encode, normalize
from kestrel_core.topics import telemetry_topic
from tests.conftest import Tenant, wait_until
from tests.jetstream_helpers import deadletters

pytestmark = [pytest.mark.integration]


@dataclass
class Harness:
    nc: NATS
    publisher: JetStreamPublisher
    registry: CollectorRegistry
    nats_url: str

    async def send(self, subject: str, payload: bytes, msg_id: str | None = None) -> None:
        await self.publisher.publish(subject, payload, {streams.HDR_MSG_ID: msg_id or uuid.uuid4().hex})

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@pytest_asyncio.fixture
async def harness(fresh_nats: NatsServer, database_url: str) -> AsyncIterator[Harness]:
    nc = await nats.connect(fresh_nats.url)
    await ensure_streams(nc)
    publisher = JetStreamPublisher(nc)
    await publisher.start()
    registry = CollectorRegistry()
    stop = asyncio.Event()
    writer_nc = await nats.connect(fresh_nats.url)
    task = asyncio.create_task(
        run_writer(WriterSettings(batch_size=500, flush_interval_s=0.05), database_url, stop, writer_nc, registry)
    )
    yield Harness(nc, publisher, registry, fresh_nats.url)
    stop.set()
    await asyncio.wait_for(task, 30)
    await writer_nc.close()
    await publisher.close()
    await nc.close()


def reading(tenant: str, device: str, seq: int, **metrics: object) -> tuple[str, bytes, str]:
    payload = msgspec.json.encode({"ts": int(time.time() * 1000), "seq": seq, "metrics": metrics or {"t": seq}})
    out = normalize(telemetry_topic(tenant, device), payload, int(time.time() * 1e6), TelemetryLimits())
    return out.subject, out.payload, out.msg_id


def rows(database_url: str, tenant: str) -> list[tuple[str, int, object, str]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            "SELECT device_id, seq, metrics, jsonb_typeof(metrics) FROM telemetry"
            " WHERE tenant_id = %s ORDER BY device_id, seq",
            (tenant,),
        ).fetchall()


async def eventually(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    return await asyncio.to_thread(wait_until, predicate, timeout)


@pytest.mark.asyncio
async def test_stores_each_reading_once_as_a_json_object(
    harness: Harness, make_tenant: Callable[[int], Tenant], database_url: str
) -> None:
    tenant = make_tenant(2)
    sent = [reading(tenant.id, d, s, temp=20.5 + s, ok=True, mode="eco") for d in tenant.devices for s in range(50)]
    for subject, payload, msg_id in sent:
        await harness.send(subject, payload, msg_id)
    # The same messages again under new message ids: JetStream cannot dedup, the storage key must.
    for subject, payload, _ in sent[:30]:
        await harness.send(subject, payload)
    assert await eventually(lambda: harness.metric("kestrel_writer_rows_total", outcome="duplicate") >= 30)
    stored = rows(database_url, tenant.id)
    assert len(stored) == 100
    assert len({(d, s) for d, s, _, _ in stored}) == 100
    assert all(kind == "object" for *_, kind in stored)
    assert stored[0][2] == {"temp": 20.5, "ok": True, "mode": "eco"}


@pytest.mark.asyncio
async def test_unknown_device_is_dead_lettered_and_good_traffic_continues(
    harness: Harness, make_tenant: Callable[[int], Tenant], database_url: str
) -> None:
    tenant = make_tenant(1)
    stranger = f"ghost-{uuid.uuid4().hex[:8]}"
    for seq in range(5):
        await harness.send(*reading(tenant.id, stranger, seq))
        await harness.send(*reading(tenant.id, tenant.devices[0], seq))
    assert await eventually(lambda: len(rows(database_url, tenant.id)) == 5)
    dead = await deadletters(harness.nats_url, topic_contains=stranger, expect=5)
    assert len(dead) == 5
    assert {d[streams.HDR_REASON] for d in dead} == {"unknown_device"}


@pytest.mark.asyncio
async def test_device_of_another_tenant_is_not_stored_under_this_one(
    harness: Harness, make_tenant: Callable[[int], Tenant], database_url: str
) -> None:
    """A topic naming tenant A with tenant B's device id must not land anywhere."""
    a, b = make_tenant(1), make_tenant(1)
    await harness.send(*reading(a.id, b.devices[0], 1))
    dead = await deadletters(harness.nats_url, topic_contains=f"{a.id}.d.{b.devices[0]}", expect=1)
    assert [d[streams.HDR_REASON] for d in dead] == ["unknown_device"]
    assert rows(database_url, a.id) == []
    assert rows(database_url, b.id) == []


@pytest.mark.asyncio
async def test_malformed_envelope_is_terminated_and_dead_lettered(
    harness: Harness, make_tenant: Callable[[int], Tenant], database_url: str
) -> None:
    tenant = make_tenant(1)
    device = tenant.devices[0]
    subject = telemetry_topic(tenant.id, device).subject
    await harness.send(subject, b"this is not an envelope")
    for seq in range(3):
        await harness.send(*reading(tenant.id, device, seq))
    assert await eventually(lambda: len(rows(database_url, tenant.id)) == 3)
    dead = await deadletters(harness.nats_url, topic_contains=subject, expect=1)
    assert [d[streams.HDR_REASON] for d in dead] == ["bad_envelope"]
    assert dead[0]["payload"] == "this is not an envelope"


@pytest.mark.asyncio
async def test_poison_row_does_not_block_its_batch(
    harness: Harness, make_tenant: Callable[[int], Tenant], database_url: str
) -> None:
    """A message PostgreSQL refuses (jsonb cannot hold U+0000) is dead-lettered; its batch-mates are stored."""
    tenant = make_tenant(1)
    device = tenant.devices[0]
    poison = TelemetryEnvelope(
        tenant=tenant.id,
        device=device,
        received_us=int(time.time() * 1e6),
        identity="device",
        points=[Point(int(time.time() * 1e6), 999, msgspec.Raw(b'{"s": "a\\u0000b"}'))],
    )
    await harness.send(telemetry_topic(tenant.id, device).subject, encode(poison))
    for seq in range(20):
        await harness.send(*reading(tenant.id, device, seq))
    assert await eventually(lambda: len(rows(database_url, tenant.id)) == 20)
    dead = await deadletters(harness.nats_url, topic_contains=telemetry_topic(tenant.id, device).subject, expect=1)
    assert [d[streams.HDR_REASON] for d in dead] == ["storage_rejected"]


@pytest.mark.asyncio
async def test_messages_that_exhaust_max_deliver_end_in_the_dead_letter_stream(
    fresh_nats: NatsServer, make_tenant: Callable[[int], Tenant]
) -> None:
    """With the database unreachable for good, messages are nak'd until MaxDeliver; the advisory then
    copies each into DEADLETTER (reason max_deliveries), so nothing accepted is silently dropped."""
    tenant = make_tenant(1)
    nc = await nats.connect(fresh_nats.url)
    await ensure_streams(nc)
    publisher = JetStreamPublisher(nc)
    await publisher.start()
    stop = asyncio.Event()
    writer_nc = await nats.connect(fresh_nats.url)
    settings = WriterSettings(
        batch_size=10, flush_interval_s=0.05, max_deliver=2, max_nak_delay_s=0.2, durable="writer-maxdeliver"
    )
    unreachable = "postgresql://kestrel:wrong@127.0.0.1:1/kestrel?connect_timeout=1"
    task = asyncio.create_task(run_writer(settings, unreachable, stop, writer_nc, CollectorRegistry()))
    try:
        subject = telemetry_topic(tenant.id, tenant.devices[0]).subject
        for seq in range(3):
            await publisher.publish(*reading(tenant.id, tenant.devices[0], seq)[:2], {streams.HDR_MSG_ID: f"m{seq}"})
        dead = await deadletters(fresh_nats.url, topic_contains=subject, expect=3, timeout=30)
        assert sorted(d[streams.HDR_REASON] for d in dead) == ["max_deliveries"] * 3
        assert all(json.loads(d["payload"])["device"] == tenant.devices[0] for d in dead)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await writer_nc.close()
        await publisher.close()
        await nc.close()


@pytest.mark.asyncio
async def test_a_tenant_over_its_ingest_quota_is_dead_lettered_and_others_are_not(
    harness: Harness, make_tenant: Callable[[int], Tenant], database_url: str
) -> None:
    """A burst of 60 messages against a quota of 5 messages/s: about 5 stored (a one-second bucket), the rest
    dead-lettered with a counted reason; a tenant without a quota in the same batches keeps everything."""
    noisy, quiet = make_tenant(1), make_tenant(1)
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE tenants SET ingest_messages_per_s = 5 WHERE tenant_id = %s", (noisy.id,))
    for seq in range(60):
        await harness.send(*reading(noisy.id, noisy.devices[0], seq))
        await harness.send(*reading(quiet.id, quiet.devices[0], seq))
    assert await eventually(lambda: len(rows(database_url, quiet.id)) == 60)
    assert await eventually(
        lambda: (
            harness.metric("kestrel_writer_deadlettered_total", reason="tenant_rate_limited")
            + len(rows(database_url, noisy.id))
            == 60
        )
    )
    stored = len(rows(database_url, noisy.id))
    assert 1 <= stored <= 40, stored  # one second's burst plus what refilled while sending (a slow CI box)
    dead = await deadletters(harness.nats_url, topic_contains=noisy.devices[0], expect=60 - stored)
    assert {d[streams.HDR_REASON] for d in dead} == {"tenant_rate_limited"}
