"""The NATS side: twin events on ``DEVICE_EVENTS`` (deduplicated by ``Nats-Msg-Id``) and the dead-letter stream."""

from __future__ import annotations

import logging
from typing import Final

import msgspec
from nats.aio.client import Client as NATS

from devicesvc.ports import Metrics
from kestrel.runtime.nats import deadletter_config, ensure_stream, events_config
from kestrel_core import streams
from kestrel_core.errors import InvalidInput
from kestrel_core.messages.twin import CommandEvent, LifecycleEvent, PresenceEvent, ShadowEvent, TwinEvent
from kestrel_core.topics import twin_event_subject

log = logging.getLogger("kestrel.devicesvc")
_KINDS: Final = {PresenceEvent: "presence", ShadowEvent: "shadow", CommandEvent: "command", LifecycleEvent: "lifecycle"}


async def ensure_events_stream(nc: NATS) -> None:
    for stream in (events_config(), deadletter_config()):
        await ensure_stream(nc, stream)


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
