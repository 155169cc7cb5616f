"""The device twin's wire contract (ADR-0013), declared once: what devices, the broker, devicesvc and the
provisioner say to each other over MQTT, and the twin events devicesvc publishes on NATS. Every side decodes
with these types; ``api/asyncapi.json`` documents them (generated from them, drift-tested).

Device -> platform (MQTT, QoS 1)
  ``v1/{t}/d/{d}/state/reported[/{shadow}]``  ``ReportedState``
  ``v1/{t}/d/{d}/cmd-res/{request_id}``        ``CommandResponse``
  ``v1/{t}/d/{d}/status`` (retained; its will) ``StatusReport`` (or the bare string)
  ``v1/{t}/provision/{claim}/{d}/request``     ``ProvisionRequest``
Platform -> device
  ``v1/{t}/d/{d}/state/desired[/{shadow}]`` (retained)  ``DesiredDocument``
  ``v1/{t}/d/{d}/cmd/{name}``                           ``CommandRequest``
  ``v1/{t}/provision/{claim}/{d}/response``             ``ProvisionGranted`` | ``ProvisionDenied``
Broker -> platform
  ``$SYS/brokers/{node}/clients/{client}/connected|disconnected``  ``ClientEvent`` (EMQX's shape)
  ``$SYS/brokers/{node}/started`` (retained)                       ``BrokerStarted`` (our Mosquitto plugin)
Platform -> integrators (NATS, stream DEVICE_EVENTS)
  ``v1.{t}.d.{d}.presence|shadow|command|lifecycle``
      ``PresenceEvent`` | ``ShadowEvent`` | ``CommandEvent`` | ``LifecycleEvent``
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

#: Times on the twin's wire are epoch milliseconds.
EpochMs = Annotated[int, msgspec.Meta(ge=0)]
DeviceStatus = Literal["online", "offline"]
ResponseStatus = Literal["delivered", "succeeded", "failed"]
#: A device's error text is at most this long.
MAX_ERROR_CHARS: Final = 2000

# ------------------------------------------------------------------------------------------ device -> platform


class ReportedState(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A JSON merge patch of the reported state, with the device's time (ms): older reports never win."""

    state: dict[str, Any]
    ts: int | None = None


class CommandResponse(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """A device's answer to a command: ``delivered`` at once, then ``succeeded`` (with a result) or ``failed``."""

    status: ResponseStatus
    result: Any = None
    error: Annotated[str, msgspec.Meta(max_length=MAX_ERROR_CHARS)] | None = None


class StatusReport(msgspec.Struct, frozen=True):
    """The device's retained status; ``offline`` is normally its will, published by the broker when it vanishes."""

    status: DeviceStatus


#: What a status message may be: the object, or the bare JSON string.
StatusMessage = StatusReport | DeviceStatus


class ProvisionRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Just-in-time provisioning: the device's CSR (PEM) naming the device."""

    csr: str


# ------------------------------------------------------------------------------------------ platform -> device


class DesiredDocument(msgspec.Struct, frozen=True, kw_only=True):
    """A shadow's desired state and its delta from the reported state, retained: a device that connects gets it."""

    version: int
    desired: dict[str, Any]
    delta: dict[str, Any]
    ts: EpochMs


class CommandRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A command; MQTT 5 carries the response topic and the correlation data (the request id) as properties."""

    request_id: str
    name: str
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    #: When the platform stops trying (ms); the MQTT 5 message expiry says the same to the broker.
    expires_at: EpochMs | None = None
    #: 1 for the first send; a retry after a lost answer has the same request id and a higher attempt.
    attempt: int = 1
    #: A delivered command asked again after the device reconnected (its answer may have been lost with the old
    #: connection): answer it again if it ran or runs, never run it.
    answer_only: bool = False


class ProvisionGranted(msgspec.Struct, frozen=True, kw_only=True, tag_field="status", tag="ok"):
    device_id: str
    serial: str
    certificate: str
    chain: str
    root: str


class ProvisionDenied(msgspec.Struct, frozen=True, kw_only=True, tag_field="status", tag="error"):
    error: str
    detail: str


ProvisionResponse = ProvisionGranted | ProvisionDenied

# ------------------------------------------------------------------------------------------ broker -> platform


class BrokerStarted(msgspec.Struct, frozen=True, kw_only=True):
    """A broker node started (retained on ``$SYS/brokers/{node}/started``): its connections that began before
    ``started_at`` ended with the previous run, whether or not a disconnected event said so."""

    node: str
    started_at: EpochMs


class ClientEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A connection began or ended (EMQX's event shape; our Mosquitto plugin publishes the same). ``connected_at``
    identifies the connection in both events."""

    connected_at: EpochMs
    ts: EpochMs | None = None
    clientid: str = ""
    username: str | None = None
    node: str = ""
    ipaddress: str = ""
    proto_ver: int | None = None
    #: Why it ended (``normal`` for a clean DISCONNECT), on ``disconnected`` only.
    reason: str = ""


# ------------------------------------------------------------------------------------------ platform -> integrators


class PresenceEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    tenant: str
    device: str
    #: connected, disconnected, status_online, status_offline or grace_expired
    event: str
    online: bool
    connections: int
    at: EpochMs
    node: str = ""


class ShadowEvent(msgspec.Struct, frozen=True, kw_only=True):
    tenant: str
    device: str
    name: str
    version: int
    reported: dict[str, Any]
    desired: dict[str, Any]
    delta: dict[str, Any]
    #: When the shadow last changed (ms); 0 from publishers before it was carried.
    at: EpochMs = 0


class CommandEvent(msgspec.Struct, frozen=True, kw_only=True):
    tenant: str
    device: str
    command_id: str
    #: queued, sent, delivered, succeeded, failed, timed_out, expired, cancelled, retry, late_response, ...
    event: str
    status: str
    detail: Any
    at: EpochMs


class LifecycleEvent(msgspec.Struct, frozen=True, kw_only=True):
    """The device's lifecycle status changed (registered, provisioned, active, suspended, decommissioned);
    ``previous`` is empty when the device was created."""

    tenant: str
    device: str
    status: str
    previous: str
    at: EpochMs


TwinEvent = PresenceEvent | ShadowEvent | CommandEvent | LifecycleEvent
