"""Ingest bridge: MQTT v5 shared subscription -> validation -> JetStream (ADR-0004).

Chain of custody: the bridge's PUBACK to the broker is sent only after JetStream acknowledged the
message (gmqtt's ``optimistic_acknowledgement=False``: the PUBACK goes out when ``on_message``
returns). The session is persistent (clean start off, long session expiry), so messages that were
not acknowledged when a bridge died are redelivered. Several bridges share the load through
``$share/ingest/...``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import gmqtt
from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ingest.jetstream import JetStreamPublisher, PubAck, deadletter_message
from kestrel.runtime.mqtt import Ack, backend_client, connect
from kestrel.runtime.tracing import Span, Tracing
from kestrel_core import streams
from kestrel_core.errors import InvalidInput
from kestrel_core.messages.telemetry import Normalized, TelemetryLimits, normalize
from kestrel_core.settings import MqttSettings
from kestrel_core.topics import (
    INGEST_SHARE_GROUP,
    TELEMETRY_FILTERS,
    TelemetryTopic,
    parse_telemetry_topic,
    shared_filter,
)

log = logging.getLogger("kestrel.ingest.bridge")


class BridgeSettings(MqttSettings, frozen=True, kw_only=True):
    """``KESTREL_BRIDGE_*``."""

    #: With broker authentication the client id must be ``svc:{mqtt_username}:{instance}`` (ADR-0010).
    client_id: str = "kestrel-ingest-bridge-1"
    #: Shared subscription group: bridges in the same group split the telemetry.
    share_group: str = INGEST_SHARE_GROUP
    session_expiry_s: int = 7 * 86400
    #: Most unacknowledged messages the broker may send this bridge at once.
    receive_maximum: int = 1000
    #: NATS JetStream (the TELEMETRY and DEADLETTER streams).
    nats_url: str = "nats://127.0.0.1:4222"
    #: A JetStream publish not acknowledged within this is retried.
    ack_timeout_s: float = 5.0
    #: At shutdown, in-flight publishes get this long before the bridge disconnects (its session keeps the rest).
    drain_timeout_s: float = 15.0
    #: Prometheus metrics (/metrics) listen here; port 0 turns them off.
    metrics_host: str = "127.0.0.1"
    #: 0: no metrics endpoint.
    metrics_port: int = 9101
    #: Larger telemetry messages are dead-lettered (payload_too_large).
    max_payload_bytes: int = 64 * 1024
    #: Readings further ahead of the bridge's clock are dead-lettered.
    max_future_s: int = 300
    #: Readings older than this are dead-lettered.
    max_past_s: int = 30 * 86400


class BridgeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        messages = Counter(
            "kestrel_bridge_messages", "MQTT messages handled by the bridge", ["outcome"], registry=registry
        )
        self.forwarded = messages.labels("forwarded")
        self.deadlettered = messages.labels("deadlettered")
        self.rejected = Counter(
            "kestrel_bridge_rejected", "Messages dead-lettered at the edge, by reason", ["reason"], registry=registry
        )
        self.retries = Counter(
            "kestrel_bridge_publish_retries", "JetStream publish retries", ["reason"], registry=registry
        )
        self.in_flight = Gauge("kestrel_bridge_in_flight", "Messages awaiting a JetStream ack", registry=registry)
        self.ack_seconds = Histogram(
            "kestrel_bridge_jetstream_ack_seconds",
            "Receive to JetStream ack latency",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=registry,
        )


class MonotonicMicros:
    """Wall-clock microseconds that never repeat within one process (bare-form identity)."""

    def __init__(self) -> None:
        self._last = 0

    def __call__(self) -> int:
        now = time.time_ns() // 1000
        self._last = now if now > self._last else self._last + 1
        return self._last


class Bridge:
    """The message handler: validate, then hand to JetStream; acknowledge the broker when stored."""

    def __init__(
        self,
        settings: BridgeSettings,
        publisher: JetStreamPublisher,
        metrics: BridgeMetrics,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.tracing = tracing
        self.publisher = publisher
        self.metrics = metrics
        self.limits = TelemetryLimits(
            max_payload_bytes=settings.max_payload_bytes,
            max_future_s=settings.max_future_s,
            max_past_s=settings.max_past_s,
        )
        self.clock = MonotonicMicros()
        self.handled = 0

    def handle(self, topic: str, payload: bytes, ack: Ack, properties: Mapping[str, Any] | None = None) -> None:
        """Called once per MQTT message; ``ack`` sends the PUBACK and must run only once the message is stored."""
        received_us = self.clock()
        self.handled += 1
        try:
            parsed = parse_telemetry_topic(topic)
            normalized = normalize(parsed, payload, received_us, self.limits)
        except InvalidInput as exc:
            self.metrics.rejected.labels(exc.reason).inc()
            self.metrics.deadlettered.inc()
            log.info("rejected telemetry", extra={"reason": exc.reason, "topic": topic[:200]})
            subject, body, headers = deadletter_message(
                source="telemetry",
                reason=exc.reason,
                detail=exc.detail,
                payload=payload,
                msg_id=f"dlq.{self.settings.client_id}.{received_us}",
                extra={streams.HDR_TOPIC: topic, streams.HDR_RECEIVED: str(received_us)},
            )
            self.publisher.submit(subject, body, headers, lambda _: ack())
            return
        started = time.perf_counter()
        forwarded, observe = self.metrics.forwarded, self.metrics.ack_seconds.observe

        headers = {streams.HDR_MSG_ID: normalized.msg_id}
        if properties:
            headers |= streams.trace_headers(properties)
        span = self._span(parsed, normalized, headers) if self.tracing is not None else None
        # One grep follows a reading: its message id (the stored row's identity) and the device's trace context,
        # here, in JetStream, and at the writer's commit (KESTREL_LOG_LEVEL=DEBUG; free when off).
        traced = log.isEnabledFor(logging.DEBUG)
        trace = {"msg_id": normalized.msg_id, "traceparent": headers.get(streams.HDR_TRACEPARENT)} if traced else {}
        if traced:
            log.debug("telemetry received", extra={**trace, "topic": topic[:200]})

        def stored(puback: PubAck) -> None:
            observe(time.perf_counter() - started)
            forwarded.inc()
            ack()
            if span is not None:
                span.end()
            if traced:
                log.debug("telemetry in jetstream", extra={**trace, "stream_seq": puback.seq})

        self.publisher.submit(normalized.subject, normalized.payload, headers, stored)

    def _span(self, topic: TelemetryTopic, normalized: Normalized, headers: dict[str, str]) -> Span | None:
        """The bridge's span of a traced reading (ADR-0028); JetStream then carries the bridge's context instead of
        the device's, so that the writer's span is the bridge's child in the same trace."""
        assert self.tracing is not None
        attributes = {"kestrel.msg_id": normalized.msg_id, "kestrel.tenant": topic.tenant,
                      "kestrel.device": topic.device, "messaging.destination.name": normalized.subject}  # fmt: skip
        span = self.tracing.start("kestrel.bridge forward", headers.get(streams.HDR_TRACEPARENT), attributes, root=True)
        if span is not None and (context := self.tracing.traceparent(span)) is not None:
            headers[streams.HDR_TRACEPARENT] = context
        return span


async def run_bridge(
    settings: BridgeSettings,
    stop: asyncio.Event,
    nc: NATS,
    registry: CollectorRegistry,
    ready: asyncio.Event | None = None,
    tracing: Tracing | None = None,
) -> None:
    """Run until ``stop`` is set, then drain: finish in-flight publishes, disconnect, keep the session."""
    metrics = BridgeMetrics(registry)
    publisher = JetStreamPublisher(
        nc, ack_timeout_s=settings.ack_timeout_s, on_retry=lambda reason: metrics.retries.labels(reason).inc()
    )
    metrics.in_flight.set_function(lambda: publisher.in_flight)
    await publisher.start()
    bridge = Bridge(settings, publisher, metrics, tracing)
    subscriptions = [gmqtt.Subscription(shared_filter(settings.share_group, f), qos=1) for f in TELEMETRY_FILTERS]

    client = backend_client(
        "bridge",
        settings,
        lambda topic, payload, properties, ack: bridge.handle(topic, payload, ack, properties),
        subscriptions,
        receive_maximum=settings.receive_maximum,
    )
    await connect(client, settings)
    if ready is not None:
        ready.set()
    await stop.wait()

    deadline = time.monotonic() + settings.drain_timeout_s
    while publisher.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await client.disconnect()
    await publisher.close()
    log.info("bridge stopped", extra={"handled": bridge.handled, "left_in_flight": publisher.in_flight})
