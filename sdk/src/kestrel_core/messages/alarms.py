"""Alarm transitions as the rule workers publish them on NATS (stream ``ALARM_EVENTS``, issue 13, ADR-0019), for the
real-time streams and integrators: ``v1.{tenant}.d.{device}.alarm``, one message per transition, deduplicated by its
``Nats-Msg-Id`` (the transition's id in ``alarm_events``), so a worker that crashes after the commit and publishes
again never doubles one. A rule's ``republish`` action sends the same document on ``v1.{tenant}.out.{subject}``."""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec

ALARM_STREAM: Final = "ALARM_EVENTS"
ALARM_SUBJECTS: Final = ("v1.*.d.*.alarm",)
Transition = Literal["raised", "retriggered", "cleared", "acknowledged", "commented"]
Severity = Literal["critical", "major", "minor", "warning", "info"]


class AlarmEvent(msgspec.Struct, frozen=True, kw_only=True):
    tenant: str
    device: str
    alarm_id: str
    rule_id: str
    rule_name: str
    #: What happened to the alarm.
    event: Transition
    severity: Severity
    #: ``active`` or ``cleared``, after the transition.
    status: Literal["active", "cleared"]
    acknowledged: bool
    #: When (epoch ms).
    at: int
    #: ``rule`` for the workers' transitions, else who acted (``user:...``, ``token:...``).
    actor: str
    #: The values that triggered (raised) or cleared the alarm.
    values: dict[str, Any] = msgspec.field(default_factory=dict)


def alarm_subject(tenant: str, device: str) -> str:
    return f"v1.{tenant}.d.{device}.alarm"


def republish_subject(tenant: str, suffix: str) -> str:
    return f"v1.{tenant}.out.{suffix}"
