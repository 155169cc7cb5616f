"""JetStream stream names, subjects and headers shared by the bridge, the writer, devicesvc and the tests (ADR-0004).
Names only: the stream configurations are in ``kestrel.runtime.nats``."""

from __future__ import annotations

from typing import Final

TELEMETRY_STREAM: Final = "TELEMETRY"
TELEMETRY_SUBJECTS: Final = ("v1.*.d.*.telemetry", "v1.*.d.*.telemetry.*")
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


def deadletter_subject(source: str, reason: str) -> str:
    """``dlq.{source}.{reason}``: e.g. ``dlq.telemetry.bad_schema``."""
    return f"dlq.{source}.{reason}"


def header_safe(value: str, limit: int = 240) -> str:
    """Make an arbitrary string safe for a NATS header value (no CR/LF, bounded length)."""
    cleaned = "".join(ch if 0x20 <= ord(ch) < 0x7F else "?" for ch in value)
    return cleaned[:limit]
