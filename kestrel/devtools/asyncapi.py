"""The platform's message contract as an AsyncAPI 3.0 document (``api/asyncapi.json``), generated from the
declarations in ``kestrel_core.messages`` and ``kestrel_core.topics``: what devices and the broker exchange with
the platform over MQTT, and what the platform publishes on NATS. ``python -m kestrel.devtools.asyncapi`` prints it;
a test keeps the committed copy equal to it and valid against the AsyncAPI JSON Schema.

Operations are the platform's: ``receive`` is what devices (or the broker) send to it, ``send`` what it sends.
"""

from __future__ import annotations

import sys
from typing import Any, Final

import msgspec

from kestrel import __version__
from kestrel_core import streams
from kestrel_core.messages import alarms, telemetry, twin
from kestrel_core.topics import ID_PATTERN

REF: Final = "#/components/schemas/{name}"
#: The bare telemetry form: metric name -> value, no timestamp (stamped on receipt).
BareReading = dict[str, telemetry.MetricValue]
Readings = telemetry.Reading | list[telemetry.Reading]

#: message name -> (payload type, title, summary)
MESSAGES: Final[dict[str, tuple[Any, str, str]]] = {
    "readings": (Readings, "Telemetry", "One reading or a batch of readings, each stored exactly once (ADR-0005)"),
    "bareReading": (BareReading, "Telemetry, bare", "Metric values only, timestamped on receipt (at least once)"),
    "reportedState": (twin.ReportedState, "Reported state", "A merge patch of the device's state, with its time"),
    "desiredDocument": (twin.DesiredDocument, "Desired state", "Desired state and its delta, retained"),
    "commandRequest": (twin.CommandRequest, "Command", "A command; MQTT 5 carries response topic and correlation"),
    "commandResponse": (twin.CommandResponse, "Command response", "delivered, then succeeded or failed"),
    "status": (twin.StatusMessage, "Device status", "online, or offline (normally the device's will), retained"),
    "provisionRequest": (twin.ProvisionRequest, "Provisioning request", "The device's CSR, under a claim"),
    "provisionResponse": (twin.ProvisionResponse, "Provisioning response", "The certificate chain, or the reason"),
    "clientEvent": (twin.ClientEvent, "Client event", "A connection began or ended (EMQX's shape)"),
    "brokerStarted": (twin.BrokerStarted, "Broker started", "A broker node started; older connections are gone"),
    "telemetryEnvelope": (
        telemetry.TelemetryEnvelope,
        "Telemetry envelope",
        "Validated telemetry inside the platform (bridge to writer)",
    ),
    "presenceEvent": (twin.PresenceEvent, "Presence event", "A device came online or went offline"),
    "shadowEvent": (twin.ShadowEvent, "Shadow event", "A shadow's desired state or delta changed"),
    "commandEvent": (twin.CommandEvent, "Command event", "A command moved to another state"),
    "lifecycleEvent": (twin.LifecycleEvent, "Lifecycle event", "A device's lifecycle status changed"),
    "alarmEvent": (
        alarms.AlarmEvent,
        "Alarm event",
        "An alarm was raised, re-triggered, cleared, acknowledged or commented on",
    ),
    "deadLetter": (bytes, "Dead letter", "A refused message, unchanged, with its reason in the headers"),
}

#: channel -> (server, address, parameters, messages, description)
CHANNELS: Final[dict[str, tuple[str, str, tuple[str, ...], tuple[str, ...], str]]] = {
    "telemetry": ("mqtt", "v1/{tenant}/d/{device}/telemetry", ("tenant", "device"),
                  ("readings", "bareReading"), "Device telemetry, QoS 1; the default stream"),
    "telemetryStream": ("mqtt", "v1/{tenant}/d/{device}/telemetry/{stream}", ("tenant", "device", "stream"),
                        ("readings", "bareReading"), "Device telemetry on a named stream"),
    "reported": ("mqtt", "v1/{tenant}/d/{device}/state/reported", ("tenant", "device"), ("reportedState",),
                 "Reported state of the classic shadow"),
    "reportedNamed": ("mqtt", "v1/{tenant}/d/{device}/state/reported/{shadow}", ("tenant", "device", "shadow"),
                      ("reportedState",), "Reported state of a named shadow"),
    "desired": ("mqtt", "v1/{tenant}/d/{device}/state/desired", ("tenant", "device"), ("desiredDocument",),
                "Desired state of the classic shadow (retained)"),
    "desiredNamed": ("mqtt", "v1/{tenant}/d/{device}/state/desired/{shadow}", ("tenant", "device", "shadow"),
                     ("desiredDocument",), "Desired state of a named shadow (retained)"),
    "command": ("mqtt", "v1/{tenant}/d/{device}/cmd/{name}", ("tenant", "device", "name"), ("commandRequest",),
                "Commands; retried with the same request id until answered, expired or timed out"),
    "commandResponse": ("mqtt", "v1/{tenant}/d/{device}/cmd-res/{requestId}", ("tenant", "device", "requestId"),
                        ("commandResponse",), "Answers to commands (the MQTT 5 response topic)"),
    "status": ("mqtt", "v1/{tenant}/d/{device}/status", ("tenant", "device"), ("status",),
               "The device's own status, retained; its Last Will says offline"),
    "provisionRequest": ("mqtt", "v1/{tenant}/provision/{claim}/{device}/request", ("tenant", "claim", "device"),
                         ("provisionRequest",), "Just-in-time provisioning, as client prov:{device} with a claim"),
    "provisionResponse": ("mqtt", "v1/{tenant}/provision/{claim}/{device}/response", ("tenant", "claim", "device"),
                          ("provisionResponse",), "The provisioner's answer"),
    "clientConnected": ("mqtt", "$SYS/brokers/{node}/clients/{client}/connected", ("node", "client"),
                        ("clientEvent",), "The broker's connect events (our Mosquitto plugin, or EMQX)"),
    "clientDisconnected": ("mqtt", "$SYS/brokers/{node}/clients/{client}/disconnected", ("node", "client"),
                           ("clientEvent",), "The broker's disconnect events"),
    "brokerStarted": ("mqtt", "$SYS/brokers/{node}/started", ("node",), ("brokerStarted",),
                      "Retained start marker of a broker node (our Mosquitto plugin; EMQX has none)"),
    "telemetryEnvelopes": ("nats", "v1.{tenant}.d.{device}.telemetry", ("tenant", "device"), ("telemetryEnvelope",),
                           f"JetStream {streams.TELEMETRY_STREAM}: validated telemetry, deduplicated by Nats-Msg-Id"),
    "presenceEvents": ("nats", "v1.{tenant}.d.{device}.presence", ("tenant", "device"), ("presenceEvent",),
                       "JetStream DEVICE_EVENTS: presence changes"),
    "shadowEvents": ("nats", "v1.{tenant}.d.{device}.shadow", ("tenant", "device"), ("shadowEvent",),
                     "JetStream DEVICE_EVENTS: shadow changes"),
    "commandEvents": ("nats", "v1.{tenant}.d.{device}.command", ("tenant", "device"), ("commandEvent",),
                      "JetStream DEVICE_EVENTS: command transitions, in order"),
    "lifecycleEvents": ("nats", "v1.{tenant}.d.{device}.lifecycle", ("tenant", "device"), ("lifecycleEvent",),
                        "JetStream DEVICE_EVENTS: lifecycle status changes, in order"),
    "alarmEvents": ("nats", "v1.{tenant}.d.{device}.alarm", ("tenant", "device"), ("alarmEvent",),
                    f"JetStream {alarms.ALARM_STREAM}: alarm transitions, deduplicated by Nats-Msg-Id"),
    "republished": ("nats", "v1.{tenant}.out.{subject}", ("tenant", "subject"), ("alarmEvent",),
                    f"JetStream {alarms.ALARM_STREAM}: a rule's republish action"),
    "deadLetters": ("nats", "dlq.{source}.{reason}", ("source", "reason"), ("deadLetter",),
                    f"JetStream {streams.DEADLETTER_STREAM}: refused messages with {streams.HDR_REASON},"
                    f" {streams.HDR_DETAIL}, {streams.HDR_TOPIC} and {streams.HDR_STAGE} headers"),
}  # fmt: skip

#: operation -> (action, channel, retained); the platform's point of view.
OPERATIONS: Final[dict[str, tuple[str, str, bool]]] = {
    "receiveTelemetry": ("receive", "telemetry", False),
    "receiveStreamTelemetry": ("receive", "telemetryStream", False),
    "receiveReportedState": ("receive", "reported", False),
    "receiveNamedReportedState": ("receive", "reportedNamed", False),
    "sendDesiredState": ("send", "desired", True),
    "sendNamedDesiredState": ("send", "desiredNamed", True),
    "sendCommand": ("send", "command", False),
    "receiveCommandResponse": ("receive", "commandResponse", False),
    "receiveStatus": ("receive", "status", True),
    "receiveProvisionRequest": ("receive", "provisionRequest", False),
    "sendProvisionResponse": ("send", "provisionResponse", False),
    "receiveClientConnected": ("receive", "clientConnected", False),
    "receiveClientDisconnected": ("receive", "clientDisconnected", False),
    "receiveBrokerStarted": ("receive", "brokerStarted", True),
    "publishTelemetryEnvelope": ("send", "telemetryEnvelopes", False),
    "publishPresenceEvent": ("send", "presenceEvents", False),
    "publishShadowEvent": ("send", "shadowEvents", False),
    "publishCommandEvent": ("send", "commandEvents", False),
    "publishLifecycleEvent": ("send", "lifecycleEvents", False),
    "publishAlarmEvent": ("send", "alarmEvents", False),
    "publishRepublished": ("send", "republished", False),
    "publishDeadLetter": ("send", "deadLetters", False),
}

PARAMETERS: Final[dict[str, str]] = {
    "tenant": f"Tenant id ({ID_PATTERN})",
    "device": f"Device id ({ID_PATTERN})",
    "stream": f"Telemetry stream name ({ID_PATTERN})",
    "shadow": f"Named shadow ({ID_PATTERN})",
    "name": f"Command name ({ID_PATTERN})",
    "requestId": "The command's request id (c + 24 hex digits)",
    "claim": "The provisioning claim's id (16 hex digits)",
    "node": "The broker node's name",
    "client": "The MQTT client id (a device id for devices)",
    "source": "Where the message was refused: telemetry, twin or rules",
    "subject": "The subject a rule's republish action names (1 to 8 tokens)",
    "reason": "Why, e.g. bad_schema, unknown_device, payload_too_large",
}


def _asyncapi_schema(node: Any) -> Any:
    """msgspec writes JSON Schema 2020-12; AsyncAPI Schema (draft 07 based) wants ``discriminator`` as a property
    name and ``items`` lists for fixed-length arrays."""
    if isinstance(node, dict):
        out = {k: _asyncapi_schema(v) for k, v in node.items()}
        if isinstance(out.get("discriminator"), dict):
            out["discriminator"] = out["discriminator"]["propertyName"]
        if "prefixItems" in out:
            out["items"] = out.pop("prefixItems")
        return out
    if isinstance(node, list):
        return [_asyncapi_schema(v) for v in node]
    return node


def document() -> dict[str, Any]:
    payloads, components = msgspec.json.schema_components([kind for kind, _, _ in MESSAGES.values()], ref_template=REF)
    messages = {
        name: {
            "name": name,
            "title": title,
            "summary": summary,
            "contentType": "application/octet-stream" if kind is bytes else "application/json",
            "payload": _asyncapi_schema(payload),
        }
        for (name, (kind, title, summary)), payload in zip(MESSAGES.items(), payloads, strict=True)
    }
    channels = {
        name: {
            "address": address,
            "description": description,
            "servers": [{"$ref": f"#/servers/{server}"}],
            "parameters": {p: {"description": PARAMETERS[p]} for p in parameters},
            "messages": {m: {"$ref": f"#/components/messages/{m}"} for m in names},
        }
        for name, (server, address, parameters, names, description) in CHANNELS.items()
    }
    operations = {}
    for name, (action, channel, retained) in OPERATIONS.items():
        operation: dict[str, Any] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{channel}"},
            "messages": [{"$ref": f"#/channels/{channel}/messages/{m}"} for m in CHANNELS[channel][3]],
        }
        if CHANNELS[channel][0] == "mqtt":
            operation["bindings"] = {"mqtt": {"qos": 1, "retain": retained, "bindingVersion": "0.2.0"}}
        operations[name] = operation
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Kestrel device and event contract",
            "version": __version__,
            "description": "MQTT v5 (and 3.1.1) between devices and the platform, and the platform's NATS"
            " JetStream subjects. Devices authenticate with a certificate (mTLS) or a JWT; the broker allows each"
            " device only its own topics (ADR-0009, ADR-0013). Times are epoch milliseconds.",
        },
        "servers": {
            "mqtt": {
                "host": "broker.example.com:8883",
                "protocol": "mqtts",
                "protocolVersion": "5.0",
                "description": "The device broker (Mosquitto with Kestrel's plugin, or EMQX); mTLS or TLS + JWT",
            },
            "nats": {
                "host": "nats.example.com:4222",
                "protocol": "nats",
                "description": "NATS JetStream inside the platform (integrators subscribe to DEVICE_EVENTS)",
            },
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": _asyncapi_schema(components)},
    }


def render() -> str:
    return msgspec.json.format(msgspec.json.encode(document(), order="sorted"), indent=2).decode() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
