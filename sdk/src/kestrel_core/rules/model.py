"""Rules as data (ADR-0018): a typed JSON condition tree, never code. One declaration serves the REST body, the CLI's
YAML/JSON file, the rule workers and the dry run; ``parse_rule`` refuses anything else with the offending field.

A condition compares values (``gt``, ``ge``, ``lt``, ``le``, ``eq``, ``ne``), combines conditions (``and``, ``or``,
``not``) or notices silence (``absent``). A value is a constant, a metric of the current reading, a path in the
device's reported shadow, a windowed aggregate of a metric (``avg``, ``min``, ``max``, ``count``, ``sum`` over the last
N seconds) or a metric's rate of change per second over a window. An alarm rule raises when ``when`` has held for
``for_s`` seconds and clears when ``clear_when`` (hysteresis; by default ``not when``) has held for ``clear_for_s``.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from kestrel_core.errors import InvalidInput
from kestrel_core.rules.actions import Actions, Id, Scope, WriteMetric

#: Bounds that keep one rule cheap to evaluate and its state small (per device).
MAX_DEPTH: Final = 8
MAX_NODES: Final = 64
MAX_WINDOW_S: Final = 86_400
MAX_FOR_S: Final = 7 * 86_400
Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
Path = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64}){0,7}$")]
Seconds = Annotated[int, msgspec.Meta(ge=1, le=MAX_WINDOW_S)]
Severity = Literal["critical", "major", "minor", "warning", "info"]


class Const(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind", tag="const"):
    value: float | bool | str


class Metric(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind", tag="metric"):
    """A metric of the reading being evaluated (absent from it: the condition is undecided)."""

    name: Name


class ShadowPath(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind", tag="shadow"):
    """A value of the device's reported state, by dotted path."""

    path: Path


class Window(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind", tag="window"):
    """An aggregate of a metric's readings of the last ``seconds`` (device time), the current one included."""

    agg: Literal["avg", "min", "max", "count", "sum"]
    metric: Name
    seconds: Seconds


class Rate(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind", tag="rate"):
    """Change per second between the oldest and the newest reading of the last ``seconds``."""

    metric: Name
    seconds: Seconds


Value = Const | Metric | ShadowPath | Window | Rate


class Compare(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="op", tag="compare"):
    cmp: Literal["gt", "ge", "lt", "le", "eq", "ne"]
    left: Value
    right: Value


class AllOf(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="op", tag="and"):
    of: Annotated[list[Condition], msgspec.Meta(min_length=1, max_length=16)]


class AnyOf(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="op", tag="or"):
    of: Annotated[list[Condition], msgspec.Meta(min_length=1, max_length=16)]


class Not(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="op", tag="not"):
    of: Condition


class Absent(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="op", tag="absent"):
    """No reading (with ``metric``, when named) for ``seconds``: decided on the clock, not on a message."""

    seconds: Annotated[int, msgspec.Meta(ge=1, le=MAX_FOR_S)]
    metric: Name | None = None


Condition = Compare | AllOf | AnyOf | Not | Absent


class AlarmSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the rule raises and clears: one alarm per (rule, device)."""

    severity: Severity = "major"
    when: Condition
    #: Hysteresis: what must hold to clear (default: ``when`` no longer holds).
    clear_when: Condition | None = None
    for_s: Annotated[int, msgspec.Meta(ge=0, le=MAX_FOR_S)] = 0
    clear_for_s: Annotated[int, msgspec.Meta(ge=0, le=MAX_FOR_S)] = 0


EventKind = Literal["presence", "shadow", "command", "lifecycle"]
#: Ticks of schedule triggers come at most this often per device (each is a message in the device's partition).
MIN_EVERY_S: Final = 60


class OnTelemetry(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind", tag="telemetry"):
    """Evaluated on the device's readings (those with one of the rule's ``metrics``, when it names any)."""


class OnEvents(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind", tag="events"):
    """Evaluated on the device's twin events of these kinds (``kestrel_core.rules.events`` names their values)."""

    events: Annotated[list[EventKind], msgspec.Meta(min_length=1, max_length=4)]


class OnSchedule(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind", tag="schedule"):
    """Evaluated for every device in scope every ``every_s`` seconds, on its presence and reported state."""

    every_s: Annotated[int, msgspec.Meta(ge=MIN_EVERY_S, le=MAX_WINDOW_S)]


Trigger = OnTelemetry | OnEvents | OnSchedule


class Rule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=120)]
    #: What the rule is evaluated on: readings (the default), twin events, or a schedule.
    trigger: Trigger = msgspec.field(default_factory=OnTelemetry)
    #: The metrics the rule reads (a reading without any of them is not evaluated); empty: every reading.
    metrics: Annotated[list[Name], msgspec.Meta(max_length=32)] = msgspec.field(default_factory=list)
    alarm: AlarmSpec
    #: The devices it watches (empty: the whole tenant).
    scope: Scope = msgspec.field(default_factory=Scope)
    #: The tenant's notification channels told of every transition.
    notify: Annotated[list[Id], msgspec.Meta(max_length=8)] = msgspec.field(default_factory=list)
    on_raise: Actions = msgspec.field(default_factory=list)
    on_clear: Actions = msgspec.field(default_factory=list)
    #: Values computed at each transition (a window's average, a rate, a shadow value...) and recorded with it: in
    #: the alarm's values, the notifications and the ``write_metric`` action.
    derive: Annotated[dict[Name, Value], msgspec.Meta(max_length=8)] = msgspec.field(default_factory=dict)


def _walk(condition: Condition, depth: int) -> int:
    """Nodes under ``condition``; refuses a tree deeper than MAX_DEPTH."""
    if depth > MAX_DEPTH:
        raise InvalidInput("rule_too_deep", f"conditions nest at most {MAX_DEPTH} levels")
    if isinstance(condition, (AllOf, AnyOf)):
        return 1 + sum(_walk(c, depth + 1) for c in condition.of)
    if isinstance(condition, Not):
        return 1 + _walk(condition.of, depth + 1)
    return 1


def windows(condition: Condition | None) -> int:
    """The longest window (or absence) a condition looks back over, in seconds: the state a device needs."""
    if condition is None:
        return 0
    if isinstance(condition, (AllOf, AnyOf)):
        return max(windows(c) for c in condition.of)
    if isinstance(condition, Not):
        return windows(condition.of)
    if isinstance(condition, Absent):
        return 0
    return max(v.seconds if isinstance(v, (Window, Rate)) else 0 for v in (condition.left, condition.right))


def keep_s(rule: Rule) -> int:
    """How far back a device's samples are kept for ``rule``: its conditions' windows and its derived values'."""
    derived = [v.seconds for v in rule.derive.values() if isinstance(v, (Window, Rate))]
    return max([windows(rule.alarm.when), windows(rule.alarm.clear_when), *derived])


_decoder = msgspec.json.Decoder(Rule)


def parse_rule(document: bytes | str | dict[str, object]) -> Rule:
    """A rule from JSON text or an already parsed document (YAML goes through the latter); ``InvalidInput`` naming
    the offending field otherwise."""
    try:
        rule = msgspec.convert(document, Rule) if isinstance(document, dict) else _decoder.decode(document)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidInput("bad_rule", str(exc)) from exc
    return check_bounds(rule)


def check_bounds(rule: Rule) -> Rule:
    """Refuse a rule whose conditions nest deeper than MAX_DEPTH or have more than MAX_NODES nodes, or that writes a
    value it does not have (what a schema cannot say); the rule otherwise."""
    known = set(rule.metrics) | set(rule.derive)
    for side, actions in (("on_raise", rule.on_raise), ("on_clear", rule.on_clear)):
        for i, action in enumerate(actions):
            unknown = sorted(set(action.metrics) - known) if isinstance(action, WriteMetric) else []
            if unknown:
                raise InvalidInput("bad_rule", f"{unknown[0]} is neither in metrics nor in derive (at $.{side}[{i}])")
    if rule.metrics and not isinstance(rule.trigger, OnTelemetry):
        raise InvalidInput("bad_rule", "metrics filter readings: only a telemetry trigger takes them (at $.metrics)")
    nodes = _walk(rule.alarm.when, 1) + (_walk(rule.alarm.clear_when, 1) if rule.alarm.clear_when else 0)
    if nodes > MAX_NODES:
        raise InvalidInput("rule_too_large", f"a rule has at most {MAX_NODES} condition nodes")
    return rule
