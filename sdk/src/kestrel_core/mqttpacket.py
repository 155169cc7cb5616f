"""Sizes of MQTT 5 packets, so a sender can tell before publishing whether a broker will carry a message (a packet
above the broker's Maximum Packet Size gets the sender disconnected, not just the message refused)."""

from __future__ import annotations


def varint_size(value: int) -> int:
    """Bytes of an MQTT variable byte integer."""
    size = 1
    while value >= 128:
        value //= 128
        size += 1
    return size


def publish_size(
    topic: str,
    payload: bytes,
    response_topic: str = "",
    correlation_data: bytes = b"",
    user_properties: list[tuple[str, str]] | None = None,
    *,
    message_expiry: bool = True,
    content_type: str = "",
) -> int:
    """The encoded size of a QoS 1/2 MQTT 5 PUBLISH with these properties (fixed header included)."""
    properties = 0
    if response_topic:
        properties += 1 + 2 + len(response_topic.encode())
    if correlation_data:
        properties += 1 + 2 + len(correlation_data)
    if message_expiry:
        properties += 1 + 4
    if content_type:  # with the Payload Format Indicator (UTF-8) that goes with it
        properties += 1 + 2 + len(content_type.encode()) + 1 + 1
    for key, value in user_properties or []:
        properties += 1 + 2 + len(key.encode()) + 2 + len(value.encode())
    remaining = 2 + len(topic.encode()) + 2 + varint_size(properties) + properties + len(payload)
    return 1 + varint_size(remaining) + remaining
