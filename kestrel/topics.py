"""Topic and subject grammar: the one module that owns it (ADR-0002).

MQTT topics carry the tenant explicitly so both brokers (EMQX, Mosquitto) enforce the same ACLs::

    v1/{tenant}/d/{device}/telemetry[/{stream}]

NATS subjects mirror topics with ``/`` replaced by ``.``. Identifiers are ``[A-Za-z0-9_-]{1,64}``,
so no identifier can contain a topic or subject separator or wildcard (``/ . + # * >``) or ``$``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kestrel.errors import InvalidInput

VERSION = "v1"
ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"
_ID = re.compile(rf"\A{ID_PATTERN}\Z")

#: The ``aud`` every device JWT must carry (broker-auth-contract.md §7.5).
MQTT_JWT_AUDIENCE = "kestrel-mqtt"
#: Shared-subscription group of the ingest bridges (ADR-0002); only backend principals may join it.
INGEST_SHARE_GROUP = "ingest"
#: The filters the ingest bridge subscribes to (without the ``$share`` prefix).
TELEMETRY_FILTERS = (f"{VERSION}/+/d/+/telemetry", f"{VERSION}/+/d/+/telemetry/+")


def is_valid_id(value: str) -> bool:
    """True when ``value`` is a legal tenant, device or stream identifier."""
    return _ID.match(value) is not None


def require_id(kind: str, value: str) -> str:
    """Return ``value`` or raise ``InvalidInput`` naming which identifier was bad."""
    if not is_valid_id(value):
        raise InvalidInput(f"bad_{kind}_id", f"{kind} id must match {ID_PATTERN}")
    return value


@dataclass(frozen=True, slots=True)
class TelemetryTopic:
    """A parsed telemetry topic."""

    tenant: str
    device: str
    stream: str = ""

    @property
    def mqtt(self) -> str:
        base = f"{VERSION}/{self.tenant}/d/{self.device}/telemetry"
        return f"{base}/{self.stream}" if self.stream else base

    @property
    def subject(self) -> str:
        """The NATS subject this telemetry travels on inside the platform."""
        return self.mqtt.replace("/", ".")


def telemetry_topic(tenant: str, device: str, stream: str = "") -> TelemetryTopic:
    """Build a telemetry topic from validated identifiers."""
    require_id("tenant", tenant)
    require_id("device", device)
    if stream:
        require_id("stream", stream)
    return TelemetryTopic(tenant, device, stream)


def parse_telemetry_topic(topic: str) -> TelemetryTopic:
    """Parse an MQTT topic name; raise ``InvalidInput("bad_topic")`` for anything off-grammar."""
    parts = topic.split("/")
    if (
        len(parts) not in (5, 6)
        or parts[0] != VERSION
        or parts[2] != "d"
        or parts[4] != "telemetry"
        or not all(is_valid_id(p) for p in (parts[1], parts[3], *parts[5:]))
    ):
        raise InvalidInput("bad_topic", "topic must be v1/{tenant}/d/{device}/telemetry[/{stream}]")
    return TelemetryTopic(parts[1], parts[3], parts[5] if len(parts) == 6 else "")


def shared_filter(group: str, topic_filter: str) -> str:
    """``$share/{group}/{filter}``: the MQTT v5 shared-subscription form."""
    require_id("group", group)
    return f"$share/{group}/{topic_filter}"


def device_publish_topics(tenant: str, device: str) -> list[str]:
    """Concrete topics (and single-level filters) a device may publish to (broker-auth-contract.md §7.2)."""
    base = f"{VERSION}/{require_id('tenant', tenant)}/d/{require_id('device', device)}"
    return [
        f"{base}/telemetry",
        f"{base}/telemetry/+",
        f"{base}/events/+",
        f"{base}/state/reported",
        f"{base}/cmd-res/+",
        f"{base}/status",
    ]


def device_subscribe_filters(tenant: str, device: str) -> list[str]:
    """Filters a device may subscribe to: its commands and its desired state."""
    base = f"{VERSION}/{require_id('tenant', tenant)}/d/{require_id('device', device)}"
    return [f"{base}/cmd/+", f"{base}/state/desired"]
