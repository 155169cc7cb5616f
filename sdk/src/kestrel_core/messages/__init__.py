"""Every MQTT and NATS message of the platform, declared once (msgspec structs), decoded once at the edge."""

from kestrel_core.messages.telemetry import Reading, TelemetryEnvelope
from kestrel_core.messages.twin import (
    ClientEvent,
    CommandEvent,
    CommandRequest,
    CommandResponse,
    DesiredDocument,
    PresenceEvent,
    ProvisionDenied,
    ProvisionGranted,
    ProvisionRequest,
    ProvisionResponse,
    ReportedState,
    ShadowEvent,
    StatusMessage,
    StatusReport,
)

__all__ = [
    "ClientEvent",
    "CommandEvent",
    "CommandRequest",
    "CommandResponse",
    "DesiredDocument",
    "PresenceEvent",
    "ProvisionDenied",
    "ProvisionGranted",
    "ProvisionRequest",
    "ProvisionResponse",
    "Reading",
    "ReportedState",
    "ShadowEvent",
    "StatusMessage",
    "StatusReport",
    "TelemetryEnvelope",
]
