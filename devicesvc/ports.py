"""What devicesvc's concerns need from the outside, as Protocols (the transport adapters implement them), and the
context each concern is handed."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from psycopg_pool import AsyncConnectionPool

from devicesvc.settings import DeviceSettings
from kestrel.runtime.tracing import Tracing
from kestrel_core.errors import InvalidInput
from kestrel_core.messages.twin import TwinEvent


class DeviceLink(Protocol):
    """The MQTT connection to the devices (through the broker)."""

    @property
    def connected(self) -> bool: ...

    #: The broker's limit for one packet: its CONNACK's Maximum Packet Size, else the setting.
    @property
    def max_packet_bytes(self) -> int: ...

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, **properties: Any) -> None:
        """QoS 1; MQTT 5 properties by gmqtt's names (response_topic, correlation_data, ...)."""


class EventSink(Protocol):
    """Where the twin's events and refused messages go (NATS JetStream)."""

    async def publish(self, event: TwinEvent, msg_id: str) -> None:
        """After the commit; the database row is the record, so a failure is logged, not raised."""

    async def deadletter(self, topic: str, payload: bytes, refusal: InvalidInput) -> bool:
        """Keep a refused device message with its reason; False when it could not be kept."""


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter("kestrel_devicesvc_messages", "Device messages handled", ["kind"], registry=registry)
        self.rejected = Counter(
            "kestrel_devicesvc_rejected", "Device messages dead-lettered, by reason", ["reason"], registry=registry
        )
        self.commands = Counter(
            "kestrel_devicesvc_command_transitions", "Command transitions made", ["status"], registry=registry
        )
        self.published = Counter(
            "kestrel_devicesvc_published", "Messages published to devices", ["kind"], registry=registry
        )
        self.retries = Counter(
            "kestrel_devicesvc_retries", "Device messages tried again after a passing failure", registry=registry
        )
        self.handle_seconds = Histogram(
            "kestrel_devicesvc_handle_seconds",
            "Time to handle what one worker took at once",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=registry,
        )


@dataclass
class Twin:
    """What every concern works with: settings, the database, the devices, the events, the metrics, the wake-up of
    the scan loop (work queued for devices), and the tracer when traces are exported (ADR-0028)."""

    settings: DeviceSettings
    pool: AsyncConnectionPool[Any]
    devices: DeviceLink
    events: EventSink
    metrics: Metrics
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    tracing: Tracing | None = None
