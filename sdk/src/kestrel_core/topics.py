"""Topic and subject grammar: the one module that owns it (ADR-0002).

MQTT topics carry the tenant explicitly so both brokers (EMQX, Mosquitto) enforce the same ACLs::

    v1/{tenant}/d/{device}/telemetry[/{stream}]

NATS subjects mirror topics with ``/`` replaced by ``.``. Identifiers are ``[A-Za-z0-9_-]{1,64}``,
so no identifier can contain a topic or subject separator or wildcard (``/ . + # * >``) or ``$``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kestrel_core.errors import InvalidInput

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
        f"{base}/state/reported/+",
        f"{base}/cmd-res/+",
        f"{base}/status",
    ]


def device_subscribe_filters(tenant: str, device: str) -> list[str]:
    """Filters a device may subscribe to: its commands, its desired state, and its tenant's ``out`` topics (what the
    tenant's rules republish for its devices, e.g. a panel that shows the plant's alarms)."""
    base = f"{VERSION}/{require_id('tenant', tenant)}/d/{require_id('device', device)}"
    return [f"{base}/cmd/+", f"{base}/state/desired", f"{base}/state/desired/+", f"{VERSION}/{tenant}/out/#"]


#: What the rule workers may publish on MQTT: the ``out`` topics of every tenant (each rule its own tenant's).
TENANT_OUT_FILTER = f"{VERSION}/+/out/#"


def tenant_out_topic(tenant: str, subject: str) -> str:
    """The MQTT topic of a rule's republish action: ``v1/{tenant}/out/{subject with / for .}``."""
    return f"{VERSION}/{require_id('tenant', tenant)}/out/{subject.replace('.', '/')}"


# ------------------------------------------------------------------ device twin topics (ADR-0013)

#: Shared-subscription group of devicesvc replicas.
DEVICES_SHARE_GROUP = "devices"
#: What devicesvc consumes from devices (without the ``$share`` prefix).
DEVICE_UPLINK_FILTERS = (
    f"{VERSION}/+/d/+/state/reported",
    f"{VERSION}/+/d/+/state/reported/+",
    f"{VERSION}/+/d/+/cmd-res/+",
    f"{VERSION}/+/d/+/status",
)
#: What the PKI's provisioner consumes: CSRs from devices holding a claim.
PROVISION_REQUEST_FILTER = f"{VERSION}/+/provision/+/+/request"
PROVISION_SHARE_GROUP = "provisioning"
#: Client events: published by EMQX (``sys_event_messages``) and by our Mosquitto plugin, same topics.
CLIENT_EVENT_FILTERS = ("$SYS/brokers/+/clients/+/connected", "$SYS/brokers/+/clients/+/disconnected")
#: A broker node's start marker (retained; our Mosquitto plugin publishes it, EMQX does not): connections of that node
#: that began before it are gone, although a crash sent no disconnected event for them.
BROKER_START_FILTER = "$SYS/brokers/+/started"
#: Everything devicesvc learns from the brokers themselves.
BROKER_EVENT_FILTERS = (*CLIENT_EVENT_FILTERS, BROKER_START_FILTER)
#: Client id prefix of a provisioning (claim) connection: no device id contains ``:``.
PROVISION_CLIENT_PREFIX = "prov:"


def device_base(tenant: str, device: str) -> str:
    return f"{VERSION}/{require_id('tenant', tenant)}/d/{require_id('device', device)}"


def desired_topic(tenant: str, device: str, shadow: str = "") -> str:
    base = f"{device_base(tenant, device)}/state/desired"
    return f"{base}/{require_id('shadow', shadow)}" if shadow else base


def reported_topic(tenant: str, device: str, shadow: str = "") -> str:
    base = f"{device_base(tenant, device)}/state/reported"
    return f"{base}/{require_id('shadow', shadow)}" if shadow else base


def command_topic(tenant: str, device: str, name: str) -> str:
    return f"{device_base(tenant, device)}/cmd/{require_id('command', name)}"


def command_response_topic(tenant: str, device: str, request_id: str) -> str:
    return f"{device_base(tenant, device)}/cmd-res/{require_id('request', request_id)}"


def status_topic(tenant: str, device: str) -> str:
    return f"{device_base(tenant, device)}/status"


def provision_topics(tenant: str, claim: str, device: str) -> tuple[str, str]:
    """(request, response) topics of one provisioning connection."""
    claim, device = require_id("claim", claim), require_id("device", device)
    base = f"{VERSION}/{require_id('tenant', tenant)}/provision/{claim}/{device}"
    return f"{base}/request", f"{base}/response"


@dataclass(frozen=True, slots=True)
class Uplink:
    """A parsed message from a device to devicesvc: ``kind`` is reported, cmd-res, status or provision."""

    kind: str
    tenant: str
    device: str
    arg: str = ""  # the shadow name, the request id, or the claim id


def parse_uplink(topic: str) -> Uplink:
    """Parse a device-to-platform twin topic; ``InvalidInput("bad_topic")`` for anything else."""
    parts = topic.split("/")
    if len(parts) >= 4 and parts[0] == VERSION and all(is_valid_id(p) for p in parts[1:2] + parts[3:]):
        tail = parts[4:]
        if parts[2] == "d" and tail in (["state", "reported"], ["status"]):
            return Uplink("reported" if tail[0] == "state" else "status", parts[1], parts[3])
        if parts[2] == "d" and len(tail) == 3 and tail[:2] == ["state", "reported"]:
            return Uplink("reported", parts[1], parts[3], tail[2])
        if parts[2] == "d" and len(tail) == 2 and tail[0] == "cmd-res":
            return Uplink("cmd-res", parts[1], parts[3], tail[1])
        if parts[2] == "provision" and len(parts) == 6 and parts[5] == "request":
            return Uplink("provision", parts[1], parts[4], parts[3])
    raise InvalidInput("bad_topic", "not a device twin topic (ADR-0013)")


def twin_event_subject(tenant: str, device: str, kind: str) -> str:
    """NATS subject of a presence, shadow or command event: ``v1.{tenant}.d.{device}.{kind}``."""
    return f"{device_base(tenant, device)}/{kind}".replace("/", ".")
