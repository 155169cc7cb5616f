"""The rule workers' decisions, pure (no I/O): which rules see a reading, what one partition's batch of readings and
due deadlines does to the devices' states, and what a delivery attempt's outcome means for its retry. The effects
(alarms, actions, notifications) are applied by ``effects`` in the transaction that stores the states."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from kestrel_core.errors import InvalidInput
from kestrel_core.messages.alarms import AlarmEvent
from kestrel_core.messages.alarms import Transition as AlarmTransition
from kestrel_core.messages.telemetry import TelemetryEnvelope, decode_envelope
from kestrel_core.retry import Backoff
from kestrel_core.rules.actions import in_scope
from kestrel_core.rules.evaluate import DeviceState, EvalError, Reading, Transition, advance, next_deadline
from kestrel_core.rules.events import decode_event
from kestrel_core.rules.model import OnEvents, OnSchedule, Rule

Key = tuple[str, str]  # (rule id, device id)
_metrics = msgspec.json.Decoder(dict[str, Any])


@dataclass(frozen=True, slots=True)
class LoadedRule:
    rule_id: str
    tenant: str
    version: int
    rule: Rule
    #: Whether its conditions read the reported shadow (then the batch loads the devices' shadows).
    needs_shadow: bool = False


@dataclass(frozen=True, slots=True)
class Member:
    """What a scope looks at: a device's groups and tags."""

    groups: frozenset[str] = frozenset()
    tags: frozenset[str] = frozenset()


@dataclass
class Catalog:
    """The enabled rules by tenant and the memberships of the devices their scopes need."""

    rules: dict[str, list[LoadedRule]] = field(default_factory=dict)
    members: dict[str, Member] = field(default_factory=dict)
    by_id: dict[str, LoadedRule] = field(default_factory=dict)

    def for_device(self, tenant: str, device: str) -> list[LoadedRule]:
        member = self.members.get(device, Member())
        return [r for r in self.rules.get(tenant, []) if in_scope(r.rule.scope, device, member.groups, member.tags)]


def reads_shadow(rule: Rule) -> bool:
    return b'"kind":"shadow"' in msgspec.json.encode(rule.alarm)


def readings(envelope: TelemetryEnvelope) -> list[Reading]:
    """The envelope's points as the evaluator's readings (device time in ms)."""
    return [Reading(p.ts_us // 1000, p.seq, _metrics.decode(p.metrics)) for p in envelope.points]


@dataclass(frozen=True, slots=True)
class Incoming:
    """One message of a partition: a device's readings, one twin event, or one schedule tick."""

    tenant: str
    device: str
    readings: list[Reading]
    shadow: dict[str, Any] | None = None
    rule_id: str | None = None


def incoming(subject: str, data: bytes, stream_seq: int) -> Incoming:
    """A message of ``RULES_IN`` by its subject (``rules.{p}.t|e|k.{tenant}.{device}[...]``); ``InvalidInput`` when
    it cannot be read (the caller dead-letters it)."""
    parts = subject.split(".")
    if len(parts) > 2 and parts[2] == "e":
        event = decode_event(parts[-1], data, stream_seq)
    elif len(parts) > 2 and parts[2] == "k":
        event = decode_event("tick", data, stream_seq)
    else:
        envelope = decode_envelope(data)
        return Incoming(envelope.tenant, envelope.device, readings(envelope))
    if len(parts) < 5 or (event.tenant, event.device) != (parts[3], parts[4]):
        raise InvalidInput("bad_event", "the event's device is not its subject's")
    return Incoming(event.tenant, event.device, [event.reading], event.shadow, event.rule_id)


def watches(rule: Rule, reading: Reading) -> bool:
    """Whether the rule's trigger takes this reading."""
    trigger = rule.trigger
    if isinstance(trigger, OnEvents):
        return reading.kind in trigger.events
    if isinstance(trigger, OnSchedule):
        return reading.kind == "tick"
    return reading.kind == "telemetry" and (not rule.metrics or any(n in reading.metrics for n in rule.metrics))


@dataclass(frozen=True, slots=True)
class Fired:
    loaded: LoadedRule
    device: str
    transition: Transition


@dataclass
class Outcome:
    changed: dict[Key, DeviceState] = field(default_factory=dict)
    fired: list[Fired] = field(default_factory=list)
    errors: list[tuple[str, EvalError]] = field(default_factory=list)


def evaluate(
    loaded: LoadedRule,
    device: str,
    state: DeviceState,
    outcome: Outcome,
    *,
    until_ms: int,
    reading: Reading | None = None,
    shadow: dict[str, Any] | None = None,
) -> DeviceState:
    """One step of one (rule, device), recorded in ``outcome``; the state after it."""
    after, transitions, errors = advance(loaded.rule, state, until_ms=until_ms, reading=reading, shadow=shadow)
    if after != state:
        outcome.changed[(loaded.rule_id, device)] = after
    outcome.fired += [Fired(loaded, device, t) for t in transitions]
    outcome.errors += [(loaded.rule_id, e) for e in errors]
    return after


def event_document(
    row: dict[str, Any], event: AlarmTransition, at_ms: int, actor: str, values: dict[str, Any]
) -> AlarmEvent:
    return AlarmEvent(
        tenant=row["tenant_id"], device=row["device_id"], alarm_id=row["alarm_id"], rule_id=row["rule_id"],
        rule_name=row["rule_name"], event=event, severity=row["severity"], status=row["status"],
        acknowledged=row["acknowledged"], at=at_ms, actor=actor, values=values,
    )  # fmt: skip


def deadline(loaded: LoadedRule, state: DeviceState) -> int | None:
    return next_deadline(loaded.rule, state, state.clock_ms)


class Deadlines:
    """The partition's pending deadlines, earliest first (entries that were superseded are skipped lazily)."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, str, str]] = []
        self._current: dict[Key, int] = {}

    def set(self, key: Key, at_ms: int | None) -> None:
        if at_ms is None:
            self._current.pop(key, None)
            return
        if self._current.get(key) != at_ms:
            self._current[key] = at_ms
            heapq.heappush(self._heap, (at_ms, *key))

    def due(self, now_ms: int) -> list[Key]:
        keys = []
        while self._heap and self._heap[0][0] <= now_ms:
            at_ms, rule_id, device = heapq.heappop(self._heap)
            if self._current.get((rule_id, device)) == at_ms:
                del self._current[(rule_id, device)]
                keys.append((rule_id, device))
        return keys

    def next(self) -> int | None:
        while self._heap and self._current.get((self._heap[0][1], self._heap[0][2])) != self._heap[0][0]:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None


#: What a delivery attempt's failure means: retry later, or dead (no retry can help, or the attempts are spent).
PERMANENT: Final = frozenset(
    {"forbidden_address", "bad_url", "smtp_not_configured", "refused_recipients", "unrenderable"}
)


def after_failure(attempts: int, reason: str, *, max_attempts: int, backoff: Backoff) -> float | None:
    """Seconds until the next attempt, or None: dead-letter the delivery."""
    if reason in PERMANENT or attempts >= max_attempts:
        return None
    return backoff.delay(attempts)
