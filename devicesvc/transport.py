"""The MQTT side (gmqtt, MQTT 5, persistent session, manual PUBACK): the ``DeviceLink`` the concerns publish on."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import gmqtt

from devicesvc.settings import DeviceSettings
from kestrel.runtime.mqtt import Ack, backend_client, connect
from kestrel_core.topics import BROKER_EVENT_FILTERS, DEVICE_UPLINK_FILTERS, shared_filter

log = logging.getLogger("kestrel.devicesvc")


class GmqttLink:
    """``DeviceLink`` on a gmqtt client; learns the broker's packet limit from each CONNACK."""

    def __init__(self, settings: DeviceSettings, on_message: Callable[[str, bytes, Any, Ack], None]) -> None:
        self.settings = settings
        self.max_packet_bytes = settings.max_packet_bytes
        self.on_connected: Callable[[], None] = lambda: None
        client = backend_client("devicesvc", settings, on_message, self._subscriptions(), receive_maximum=1000)
        client.on_connect = self._on_connect
        self.client = client

    @property
    def connected(self) -> bool:
        return bool(self.client.is_connected)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, **properties: Any) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain, **properties)

    def _subscriptions(self) -> list[gmqtt.Subscription]:
        # Client events and start markers are not shared: Mosquitto 2.0 does not deliver $SYS topics to shared
        # subscriptions. Every replica handles every event; that is idempotent (connection rows are keyed by
        # connected_at, the count is recomputed, and the NATS event's Nats-Msg-Id is the same, so JetStream drops the
        # repeat; a start marker closes only connections still open).
        shared = [gmqtt.Subscription(shared_filter(self.settings.share_group, f), qos=1) for f in DEVICE_UPLINK_FILTERS]
        return shared + [gmqtt.Subscription(f, qos=1) for f in BROKER_EVENT_FILTERS]

    def _on_connect(self, c: Any, flags: Any, rc: Any, properties: Any) -> None:
        c.subscribe(self._subscriptions())  # what backend_client's own on_connect does, then learn the packet limit
        announced = (properties or {}).get("maximum_packet_size")
        announced = announced[0] if isinstance(announced, list) and announced else announced
        self.max_packet_bytes = int(announced) if announced else self.settings.max_packet_bytes
        self.on_connected()
        log.info("devicesvc connected", extra={"client_id": self.settings.client_id})

    async def connect(self) -> None:
        await connect(self.client, self.settings)

    async def disconnect(self) -> None:
        await self.client.disconnect()
