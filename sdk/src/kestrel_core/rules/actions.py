"""What a rule applies to and what it does besides raising and clearing its alarm (issue 13, ADR-0019), declared once
for the REST body, the CLI's file and the rule workers.

A scope names devices, groups and tags; a device is in scope when it is named, or is a member of a named group, or
carries every named tag; an empty scope is the whole tenant. Actions run once per alarm transition (raise or clear),
inside the transaction that records the transition, so a redelivered reading never repeats them: set a desired
state, send a command, republish the transition on a NATS subject of the tenant (``v1.{tenant}.out.{subject}``) or an
MQTT topic of the tenant (``v1/{tenant}/out/...``), or
write values of the transition into the device's telemetry (``write_metric``).
Notifications go to the tenant's channels named in ``notify``. Every target is the rule's own tenant's: the API refuses
another tenant's device or channel, and the workers resolve targets inside the tenant only.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

from kestrel_core.topics import ID_PATTERN

Id = Annotated[str, msgspec.Meta(pattern=f"^{ID_PATTERN}$")]
Tag = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:=/-]{1,64}$")]
#: A subject suffix: up to 8 tokens of letters, digits, ``_`` and ``-``.
SubjectSuffix = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64}){0,7}$")]
#: What telemetry accepts as a metric name (``kestrel_core.messages.telemetry``).
MetricName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}$")]
MAX_ACTIONS: Final = 8
#: The telemetry stream derived metrics are written to.
DERIVED_STREAM: Final = "rules"


class Scope(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    devices: Annotated[list[Id], msgspec.Meta(max_length=1000)] = msgspec.field(default_factory=list)
    groups: Annotated[list[Id], msgspec.Meta(max_length=32)] = msgspec.field(default_factory=list)
    tags: Annotated[list[Tag], msgspec.Meta(max_length=16)] = msgspec.field(default_factory=list)

    @property
    def whole_tenant(self) -> bool:
        return not (self.devices or self.groups or self.tags)


class SetDesired(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="do", tag="set_desired"
):
    """Merge ``state`` into the device's desired state (shadow ``shadow``; ``""`` is the default shadow)."""

    state: dict[str, Any]
    shadow: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{0,64}$")] = ""


class SendCommand(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="do",
                  tag="command"):  # fmt: skip
    """Queue a command for the device (delivered by devicesvc like one sent through the API)."""

    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    timeout_s: Annotated[int, msgspec.Meta(ge=1, le=86_400)] = 300


class Republish(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="do",
                tag="republish"):  # fmt: skip
    """Publish the transition on NATS ``v1.{tenant}.out.{subject}`` (deduplicated by the transition's id), or with
    ``to: mqtt`` on the broker's ``v1/{tenant}/out/{subject, / for .}`` (QoS 1), which the tenant's devices may
    subscribe to."""

    subject: SubjectSuffix
    to: Literal["nats", "mqtt"] = "nats"


class WriteMetric(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="do",
                  tag="write_metric"):  # fmt: skip
    """Write these values of the transition (the rule's ``metrics`` or ``derive`` names) into the device's telemetry,
    stream ``rules``, at the transition's instant: stored like a reading and seen by other rules."""

    metrics: Annotated[list[MetricName], msgspec.Meta(min_length=1, max_length=16)]


Action = SetDesired | SendCommand | Republish | WriteMetric
Actions = Annotated[list[Action], msgspec.Meta(max_length=MAX_ACTIONS)]


def in_scope(scope: Scope, device: str, groups: frozenset[str], tags: frozenset[str]) -> bool:
    """Whether a device (its groups and tags) is in ``scope``."""
    if scope.whole_tenant:
        return True
    if device in scope.devices or not groups.isdisjoint(scope.groups):
        return True
    return bool(scope.tags) and tags.issuperset(scope.tags)
