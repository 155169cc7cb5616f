"""The NATS side: twin events on ``DEVICE_EVENTS`` (deduplicated by ``Nats-Msg-Id``) and the dead-letter stream."""

from __future__ import annotations

import logging
from typing import Final

import msgspec
from nats.aio.client import Client as NATS
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from devicesvc.ports import Metrics
from kestrel.runtime.nats import deadletter_config
from kestrel_core import streams
from kestrel_core.errors import InvalidInput
from kestrel_core.messages.twin import CommandEvent, PresenceEvent, ShadowEvent, TwinEvent
from kestrel_core.topics import twin_event_subject

log = logging.getLogger("kestrel.devicesvc")
EVENTS_STREAM: Final = "DEVICE_EVENTS"
EVENTS_SUBJECTS: Final = ("v1.*.d.*.presence", "v1.*.d.*.shadow", "v1.*.d.*.command")
_KINDS: Final = {PresenceEvent: "presence", ShadowEvent: "shadow", CommandEvent: "command"}


async def ensure_events_stream(nc: NATS) -> None:
    js = nc.jetstream()
    config = StreamConfig(
        name=EVENTS_STREAM,
        subjects=list(EVENTS_SUBJECTS),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=7 * 86400,
        discard=DiscardPolicy.OLD,
        duplicate_window=streams.DUPLICATE_WINDOW_S,
        num_replicas=1,
    )
    for stream in (config, deadletter_config()):
        try:
            await js.add_stream(stream)
        except BadRequestError:
            await js.update_stream(stream)


class NatsEvents:
    """``EventSink`` on JetStream."""

    def __init__(self, nc: NATS, metrics: Metrics) -> None:
        self.js = nc.jetstream()
        self.metrics = metrics

    async def publish(self, event: TwinEvent, msg_id: str) -> None:
        kind = _KINDS[type(event)]
        try:
            await self.js.publish(
                twin_event_subject(event.tenant, event.device, kind),
                msgspec.json.encode(event),
                headers={streams.HDR_MSG_ID: msg_id},
                timeout=5,
            )
        except Exception:  # noqa: BLE001 - NATS errors of every kind
            log.warning("could not publish a %s event", kind, extra={"device": event.device})

    async def deadletter(self, topic: str, payload: bytes, refusal: InvalidInput) -> bool:
        self.metrics.rejected.labels(refusal.reason).inc()
        log.info("rejected device message", extra={"reason": refusal.reason, "topic": topic[:200]})
        headers = {
            streams.HDR_REASON: refusal.reason,
            streams.HDR_DETAIL: streams.header_safe(refusal.detail),
            streams.HDR_TOPIC: streams.header_safe(topic),
            streams.HDR_STAGE: "devicesvc",
        }
        try:
            await self.js.publish(
                streams.deadletter_subject("twin", refusal.reason), payload, headers=headers, timeout=5
            )
        except Exception:
            log.exception("could not dead-letter a device message")
            return False
        return True
