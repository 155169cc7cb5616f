"""JetStream stream names, subjects and headers shared by the bridge, the writer, devicesvc and the tests (ADR-0004).
Names only: the stream configurations are in ``kestrel.runtime.nats``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

TELEMETRY_STREAM: Final = "TELEMETRY"
TELEMETRY_SUBJECTS: Final = ("v1.*.d.*.telemetry", "v1.*.d.*.telemetry.*")
#: The device twin's events (devicesvc publishes them; the rule workers source them into their partitions).
EVENTS_STREAM: Final = "DEVICE_EVENTS"
EVENTS_SUBJECTS: Final = ("v1.*.d.*.presence", "v1.*.d.*.shadow", "v1.*.d.*.command", "v1.*.d.*.lifecycle")
DEADLETTER_STREAM: Final = "DEADLETTER"
DEADLETTER_SUBJECTS: Final = ("dlq.>",)
WRITER_DURABLE: Final = "writer"

#: Longer than the bridge's longest retry horizon for one message (ADR-0004). Duplicates that
#: arrive later are still dropped by the storage key; this window only saves work.
DUPLICATE_WINDOW_S: Final = 120

HDR_MSG_ID: Final = "Nats-Msg-Id"
HDR_REASON: Final = "Kestrel-Reason"
HDR_DETAIL: Final = "Kestrel-Detail"
HDR_TOPIC: Final = "Kestrel-Topic"
HDR_STAGE: Final = "Kestrel-Stage"
HDR_RECEIVED: Final = "Kestrel-Received-Us"
#: W3C Trace Context, carried from a device's MQTT 5 user property to the JetStream header of the same name.
HDR_TRACEPARENT: Final = "traceparent"
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def trace_headers(properties: Mapping[str, Any] | None) -> dict[str, str]:
    """The device's ``traceparent`` user property as a header, when it is well formed (W3C Trace Context); anything
    else is ignored, never a reason to refuse a reading. ``properties``: gmqtt's, ``user_property`` as (key, value)
    pairs."""
    for pair in (properties or {}).get("user_property") or ():
        if isinstance(pair, (tuple, list)) and len(pair) == 2 and pair[0] == HDR_TRACEPARENT:
            value = pair[1]
            if isinstance(value, str) and _TRACEPARENT.fullmatch(value) and value[:2] != "ff":
                return {HDR_TRACEPARENT: value}
    return {}


def deadletter_subject(source: str, reason: str) -> str:
    """``dlq.{source}.{reason}``: e.g. ``dlq.telemetry.bad_schema``."""
    return f"dlq.{source}.{reason}"


def header_safe(value: str, limit: int = 240) -> str:
    """Make an arbitrary string safe for a NATS header value (no CR/LF, bounded length)."""
    cleaned = "".join(ch if 0x20 <= ord(ch) < 0x7F else "?" for ch in value)
    return cleaned[:limit]
