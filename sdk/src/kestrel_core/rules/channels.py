"""Notification channels (issue 13, ADR-0019): what a tenant configures, how a message is rendered from an alarm
event, and how a webhook is signed, so that receivers (and the SDK) verify with the same code.

Webhooks carry ``Kestrel-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`` and
``Idempotency-Key: <delivery id>`` (a retry repeats the key, so a receiver drops the copy). Templates are
``string.Template`` texts (``$severity``, ``$rule_name``, ``$device``, ``$event``, ``$status``, ``$alarm_id``,
``$rule_id``, ``$at``, ``$values``, ``$tenant``): substitution only, no attribute access or code.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import string
from collections.abc import Mapping
from typing import Annotated, Final, Literal

import msgspec

from kestrel_core.messages.alarms import AlarmEvent

SIGNATURE_HEADER: Final = "Kestrel-Signature"
#: Receivers should refuse a signature older than this (replay protection).
SIGNATURE_TOLERANCE_S: Final = 300
Template = Annotated[str, msgspec.Meta(max_length=2000)]
Url = Annotated[str, msgspec.Meta(pattern=r"^https?://[^\s/$.?#][^\s]{0,2000}$")]
Email = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9.-]{1,253}$")]
DEFAULT_SUBJECT: Final = "[$severity] $rule_name on $device: $event"
DEFAULT_TEXT: Final = "Alarm $alarm_id ($rule_name) on device $device is $status: $event at $at. Values: $values"


class EmailChannel(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind",
                   tag="email"):  # fmt: skip
    to: Annotated[list[Email], msgspec.Meta(min_length=1, max_length=20)]
    subject: Template = DEFAULT_SUBJECT
    text: Template = DEFAULT_TEXT


class WebhookChannel(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind",
                     tag="webhook"):  # fmt: skip
    """The alarm event as JSON, signed."""

    url: Url


class ChatChannel(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind",
                  tag="chat"):  # fmt: skip
    """``{"text": ...}``: the generic incoming-webhook format of Slack, Mattermost, Rocket.Chat and others."""

    url: Url
    text: Template = DEFAULT_TEXT


ChannelConfig = EmailChannel | WebhookChannel | ChatChannel
ChannelKind = Literal["email", "webhook", "chat"]


def fields(event: AlarmEvent) -> dict[str, str]:
    """The template variables of an event."""
    return {
        "severity": event.severity, "rule_name": event.rule_name, "rule_id": event.rule_id, "device": event.device,
        "event": event.event, "status": event.status, "alarm_id": event.alarm_id, "tenant": event.tenant,
        "at": str(event.at), "values": json.dumps(event.values, sort_keys=True, default=str)[:1000],
    }  # fmt: skip


def render(template: str, values: Mapping[str, str]) -> str:
    return string.Template(template).safe_substitute(values)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``Kestrel-Signature`` header value."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, *, now: int, tolerance_s: int = SIGNATURE_TOLERANCE_S) -> bool:
    """What a receiver runs: the signature matches the body and is recent."""
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    try:
        timestamp = int(parts.get("t", ""))
    except ValueError:
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), f"t={timestamp},v1={parts.get('v1', '')}")
