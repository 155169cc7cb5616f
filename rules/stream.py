"""The rule workers' JetStream side (ADR-0019, ADR-0020): the partitioned stream ``RULES_IN`` sourced from
``TELEMETRY``, ``DEVICE_EVENTS`` and ``RULE_TICKS`` with subject transforms that put the device's partition first
(``rules.{p}.t.{tenant}.{device}[.{stream}]`` for readings, ``rules.{p}.e.{tenant}.{device}.{kind}`` for twin events,
``rules.{p}.k.{tenant}.{device}`` for schedule ticks; NATS's own deterministic ``partition`` mapping over tenant and
device, so a device's readings, events and ticks meet in one partition), one durable consumer per partition, the
``ALARM_EVENTS`` stream and the alarm events' outbox publisher."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any, Final

import msgspec
from nats.aio.client import Client as NATS
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamSource,
    SubjectTransform,
)
from nats.js.errors import NotFoundError
from psycopg_pool import AsyncConnectionPool

from kestrel.runtime.nats import (
    deadletter_config,
    ensure_stream,
    event_stream_config,
    events_config,
    telemetry_retention_s,
)
from kestrel.store.rows import fetch_all
from kestrel_core import streams
from kestrel_core.messages.alarms import ALARM_STREAM, ALARM_SUBJECTS, alarm_subject
from rules.decide import event_document
from rules.effects import Outgoing
from rules.egress import MqttEgress

log = logging.getLogger("kestrel.rules")
RULES_STREAM: Final = "RULES_IN"
TICKS_STREAM: Final = "RULE_TICKS"


def tick_subject(tenant: str, device: str) -> str:
    return f"rules.tick.{tenant}.{device}"


def _w(n: int) -> str:
    return f"{{{{wildcard({n})}}}}"


def rules_config(partitions: int) -> StreamConfig:
    part = f"{{{{partition({partitions},1,2)}}}}"

    def source(name: str, *moves: tuple[str, str]) -> StreamSource:
        return StreamSource(name=name, subject_transforms=[SubjectTransform(src=a, dest=b) for a, b in moves])

    return StreamConfig(
        name=RULES_STREAM,
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=telemetry_retention_s(),  # RULES_IN holds a copy of the telemetry: the same retention
        discard=DiscardPolicy.OLD,
        sources=[
            source(streams.TELEMETRY_STREAM, ("v1.*.d.*.telemetry", f"rules.{part}.t.{_w(1)}.{_w(2)}"),
                   ("v1.*.d.*.telemetry.*", f"rules.{part}.t.{_w(1)}.{_w(2)}.{_w(3)}")),
            source(streams.EVENTS_STREAM, ("v1.*.d.*.*", f"rules.{part}.e.{_w(1)}.{_w(2)}.{_w(3)}")),
            source(TICKS_STREAM, ("rules.tick.*.*", f"rules.{part}.k.{_w(1)}.{_w(2)}")),
        ],
    )  # fmt: skip


def ticks_config() -> StreamConfig:
    return event_stream_config(TICKS_STREAM, ["rules.tick.*.*"], max_age_s=86400)


async def ensure_streams(nc: NATS, partitions: int) -> None:
    await ensure_stream(nc, events_config())
    await ensure_stream(nc, ticks_config())
    await ensure_stream(nc, rules_config(partitions))
    await ensure_stream(nc, deadletter_config())
    await ensure_stream(nc, event_stream_config(ALARM_STREAM, [*ALARM_SUBJECTS, "v1.*.out.>"]))


def consumer_name(partition: int) -> str:
    return f"rules-p{partition}"


async def take_consumer(nc: NATS, partition: int, after_seq: int) -> None:
    """The partition's consumer, made again by its owner (who holds the lock, so nobody else consumes it) to start
    right after the stream position committed with the partition's state (``after_seq``, 0: from the start). No acks:
    the committed position is the record. JetStream would redeliver a message whose delivery was lost only after
    ``ack_wait``, by which time newer readings would have been applied and the evaluator's (ts, seq) guard would drop
    the older one as stale; instead the owner notices the gap in the consumer sequence and starts again here."""
    js = nc.jetstream()
    name = consumer_name(partition)
    with contextlib.suppress(NotFoundError):
        await js.delete_consumer(RULES_STREAM, name)
    config = ConsumerConfig(
        durable_name=name,
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE if after_seq else DeliverPolicy.ALL,
        opt_start_seq=after_seq + 1 if after_seq else None,
        filter_subject=f"rules.{partition}.>",
    )
    await js.add_consumer(RULES_STREAM, config)


async def publish_outbox(pool: AsyncConnectionPool[Any], nc: NATS, limit: int = 500) -> int:
    """Publish the alarm events not yet published (any worker; rows are claimed with SKIP LOCKED), each with its id as
    ``Nats-Msg-Id``, so a publish repeated after a crash is dropped by the stream."""
    js = nc.jetstream()
    async with pool.connection() as conn, conn.transaction():
        rows = await fetch_all(
            conn,
            'SELECT e.id, e.event, e.actor, e.at, e."values", a.tenant_id, a.device_id, a.alarm_id, a.rule_id,'
            " a.rule_name, a.severity, a.status, a.acknowledged FROM alarm_events e JOIN alarms a USING (alarm_id)"
            " WHERE NOT e.published ORDER BY e.id LIMIT %s FOR UPDATE OF e SKIP LOCKED",
            (limit,),
        )
        for row in rows:
            at_ms = int(row["at"].timestamp() * 1000)
            document = event_document(row, row["event"], at_ms, row["actor"], row["values"])
            await js.publish(
                alarm_subject(document.tenant, document.device),
                msgspec.json.encode(document),
                headers={streams.HDR_MSG_ID: f"alarm-event-{row['id']}"},
                timeout=5,
            )
        if rows:
            await conn.execute(
                "UPDATE alarm_events SET published = true WHERE id = ANY(%s)", ([r["id"] for r in rows],)
            )
    return len(rows)


async def publish_after_commit(
    nc: NATS, items: list[Outgoing], mqtt: MqttEgress | None, counted: Callable[[str, str], None]
) -> None:
    """What the actions publish (republished transitions, derived metrics), after the commit: on NATS each
    deduplicated by its ``Nats-Msg-Id``, on MQTT at QoS 1. A publish that fails is logged, counted ``unsent`` and not
    retried (ADR-0020, ADR-0022: at most once past an outage)."""
    js = nc.jetstream()
    for item in items:
        if item.mqtt:
            if mqtt is None or not mqtt.publish(item.subject, item.data):
                counted(item.kind, "unsent")
                log.warning("could not publish an action's message on MQTT",
                            extra={"topic": item.subject, "configured": mqtt is not None})  # fmt: skip
            continue
        try:
            await js.publish(item.subject, item.data, headers={streams.HDR_MSG_ID: item.msg_id}, timeout=5)
        except Exception:  # noqa: BLE001 - NATS errors of every kind; the transition is recorded
            counted(item.kind, "unsent")
            log.warning("could not publish an action's message", extra={"subject": item.subject})
