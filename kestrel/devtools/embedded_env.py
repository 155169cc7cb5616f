"""What the embedded default tells each of its processes (``KESTREL_*``): the database, NATS, the broker's ports, the
backend principals' secrets and the metrics ports (devicesvc's and the provisioner's only with Prometheus)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from kestrel.devtools.servers import NatsServer, PostgresServer, PrometheusServer


class Stack(Protocol):
    """What of the embedded stack (kestrel.devtools.embedded.EmbeddedStack) the environment is made from."""

    state: Path
    ports: Any  # EmbeddedPorts: the ports of every process
    postgres: PostgresServer
    nats: NatsServer
    secrets: dict[str, str]
    prometheus: PrometheusServer | None


def service_env(stack: Stack, token: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "KESTREL_DATABASE_URL": stack.postgres.url,
            "KESTREL_STATE_DIR": str(stack.state),
            "KESTREL_BRIDGE_MQTT_PORT": str(stack.ports.mqtt),
            "KESTREL_BRIDGE_CLIENT_ID": "svc:ingest:bridge-1",
            "KESTREL_BRIDGE_MQTT_USERNAME": "ingest",
            "KESTREL_BRIDGE_MQTT_PASSWORD": stack.secrets["ingest"],
            "KESTREL_BRIDGE_NATS_URL": stack.nats.url,
            "KESTREL_BRIDGE_METRICS_PORT": str(stack.ports.bridge_metrics),
            "KESTREL_WRITER_NATS_URL": stack.nats.url,
            "KESTREL_WRITER_METRICS_PORT": str(stack.ports.writer_metrics),
            "KESTREL_API_PORT": str(stack.ports.api),
            "KESTREL_API_ADMIN_TOKEN": token,
            "KESTREL_API_DATABASE_URL": stack.postgres.api_url,
            "KESTREL_API_PLATFORM_DATABASE_URL": stack.postgres.platform_url,
            "KESTREL_API_SIGNING_KEY_FILE": str(stack.state / "api-signing.key"),
            "KESTREL_API_NATS_URL": stack.nats.url,
            "KESTREL_AUTHSVC_PORT": str(stack.ports.authsvc),
            "KESTREL_AUTHSVC_BROKER_KEY": stack.secrets["broker-key"],
            "KESTREL_AUTHSVC_KICK_MQTT_PORT": str(stack.ports.mqtt),
            "KESTREL_AUTHSVC_KICK_USERNAME": "authsvc",
            "KESTREL_AUTHSVC_KICK_PASSWORD": stack.secrets["authsvc"],
            "KESTREL_DEVICES_MQTT_PORT": str(stack.ports.mqtt),
            "KESTREL_DEVICES_CLIENT_ID": "svc:devicesvc:1",
            "KESTREL_DEVICES_MQTT_USERNAME": "devicesvc",
            "KESTREL_DEVICES_MQTT_PASSWORD": stack.secrets["devicesvc"],
            "KESTREL_DEVICES_NATS_URL": stack.nats.url,
            # With Prometheus, devicesvc and the provisioner serve metrics too (on the ports after the writer's).
            "KESTREL_DEVICES_METRICS_PORT": str(stack.ports.writer_metrics + 1) if stack.prometheus else "0",
            "KESTREL_RULES_NATS_URL": stack.nats.url,
            "KESTREL_RULES_METRICS_PORT": str(stack.ports.rules_metrics),
            "KESTREL_RULES_MQTT_PORT": str(stack.ports.mqtt),
            "KESTREL_RULES_CLIENT_ID": "svc:rules:1",
            "KESTREL_RULES_MQTT_USERNAME": "rules",
            "KESTREL_RULES_MQTT_PASSWORD": stack.secrets["rules"],
            # Loopback only, so webhooks to `kestrel webhook-sink` work; production leaves this off (SSRF).
            "KESTREL_RULES_WEBHOOK_ALLOW_PRIVATE": "true",
            "KESTREL_PROVISIONER_MQTT_PORT": str(stack.ports.mqtt),
            "KESTREL_PROVISIONER_CLIENT_ID": "svc:provisioner:1",
            "KESTREL_PROVISIONER_MQTT_USERNAME": "provisioner",
            "KESTREL_PROVISIONER_MQTT_PASSWORD": stack.secrets["provisioner"],
            "KESTREL_PROVISIONER_METRICS_PORT": str(stack.ports.writer_metrics + 2) if stack.prometheus else "0",
        }
    )
    return env
