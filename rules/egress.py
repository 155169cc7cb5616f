"""The rule workers' MQTT side: republish actions with ``to: mqtt`` publish the transition on the tenant's
``v1/{tenant}/out/...`` topic as the ``rules`` backend principal, whose ACL allows those topics only (authsvc's
``service_acl``). Publishing only: a clean session, no subscription. Like the NATS republish it happens after the
transition's commit, at most once past a broker outage (ADR-0022): while the broker is away the publish is counted
as ``unsent`` and the transition stays recorded."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import gmqtt

from kestrel_core.retry import Backoff
from rules.settings import RulesSettings

log = logging.getLogger("kestrel.rules")
RECONNECT = Backoff(base_s=0.5, cap_s=10.0)


class MqttEgress:
    def __init__(self, settings: RulesSettings) -> None:
        self.settings = settings
        self.client = gmqtt.Client(settings.client_id, clean_session=True)
        self.client.set_config({"reconnect_retries": -1, "reconnect_delay": 1})
        self.client.set_auth_credentials(settings.mqtt_username, settings.mqtt_password.reveal() or None)
        self.client.on_connect = self._on_connect

    def _on_connect(self, c: Any, flags: Any, rc: Any, properties: Any) -> None:
        log.info("rules connected to the broker", extra={"client_id": self.settings.client_id})

    @property
    def connected(self) -> bool:
        return bool(self.client.is_connected)

    async def run(self) -> None:
        """Connect, trying again with backoff until the broker answers (gmqtt reconnects by itself after that)."""
        failures = 0
        while not self.connected:
            try:
                await self.client.connect(self.settings.mqtt_host, self.settings.mqtt_port, keepalive=30,
                                          version=gmqtt.constants.MQTTv50)  # fmt: skip
            except (OSError, TimeoutError, gmqtt.MQTTConnectError) as exc:
                failures += 1
                log.warning("rules could not reach the broker; trying again", extra={"error": str(exc)[:200]})
                await asyncio.sleep(RECONNECT.delay(failures))

    def publish(self, topic: str, payload: bytes) -> bool:
        """QoS 1; False when not connected (nothing is queued)."""
        if not self.connected:
            return False
        self.client.publish(topic, payload, qos=1, content_type="application/json", payload_format_id=1)
        return True

    async def close(self) -> None:
        if self.connected:
            await asyncio.wait_for(self.client.disconnect(), 5)
