"""The one evaluator of alarm rules (ADR-0018): pure, with time given, so the rule workers and the dry run over stored
history produce the same transitions from the same data.

``step`` takes a rule, one device's state and either a reading (device time) or a clock tick, and returns the new
state and the transitions (``Raised``/``Cleared``). Readings are ordered by (ts, seq): one that is not newer than the
last one applied changes nothing, so a redelivered message can never repeat a transition. Between readings the last
known values stand (a threshold held when the device went quiet still completes its duration on the clock), windows
and absence are measured against the event's time. A value that is missing or of the wrong type leaves the condition
undecided (no transition either way) and is reported as an ``EvalError`` to count, never raised.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from typing import Any, Final

import msgspec

from kestrel_core.rules.model import (
    Absent,
    AllOf,
    AnyOf,
    Compare,
    Condition,
    Const,
    Metric,
    Not,
    Rate,
    Rule,
    ShadowPath,
    Value,
    keep_s,
    windows,
)

#: Samples kept per metric and device, newest first to go: bounds a device's state whatever it sends.
MAX_SAMPLES: Final = 4096
ANY: Final = ""  # last_seen key of "any reading"


class DeviceState(msgspec.Struct, kw_only=True):
    """What a device's evaluation of one rule remembers; JSON-serializable, stored between workers."""

    raised: bool = False
    #: Since when (ms) the pending transition's condition has held.
    since_ms: int | None = None
    last_key: tuple[int, int] = (0, -1)
    last_values: dict[str, float | bool | str] = {}
    last_seen_ms: dict[str, int] = {}
    samples: dict[str, list[tuple[int, float]]] = {}
    raised_count: int = 0
    #: The evaluation's clock (ms): the last deadline ticked or reading applied (``advance``).
    clock_ms: int = -1


class Reading(msgspec.Struct, frozen=True):
    ts_ms: int
    seq: int
    metrics: dict[str, Any]
    #: ``telemetry``, a twin event's kind (``kestrel_core.rules.events``) or ``tick`` (a schedule's).
    kind: str = "telemetry"


class Raised(msgspec.Struct, frozen=True, tag="raised"):
    at_ms: int
    values: dict[str, Any]


class Cleared(msgspec.Struct, frozen=True, tag="cleared"):
    at_ms: int
    values: dict[str, Any]


Transition = Raised | Cleared


class EvalError(msgspec.Struct, frozen=True):
    reason: str  # missing_value, type_error
    detail: str


class _Undecided(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.error = EvalError(reason, detail)


def _shadow_value(shadow: Mapping[str, Any], path: str) -> Any:
    node: Any = shadow
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise _Undecided("missing_value", f"reported state has no {path}")
        node = node[part]
    return node


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Undecided("type_error", f"{what} is not a number")
    return float(value)


def _window(state: DeviceState, metric: str, seconds: int, now_ms: int) -> list[tuple[int, float]]:
    start = now_ms - seconds * 1000
    return [s for s in state.samples.get(metric, []) if start < s[0] <= now_ms]


def _value(value: Value, state: DeviceState, shadow: Mapping[str, Any], now_ms: int) -> Any:
    if isinstance(value, Const):
        return value.value
    if isinstance(value, Metric):
        if value.name not in state.last_values:
            raise _Undecided("missing_value", f"no reading of {value.name} yet")
        return state.last_values[value.name]
    if isinstance(value, ShadowPath):
        return _shadow_value(shadow, value.path)
    samples = _window(state, value.metric, value.seconds, now_ms)
    if isinstance(value, Rate):
        if len(samples) < 2 or samples[-1][0] == samples[0][0]:
            raise _Undecided("missing_value", f"fewer than two readings of {value.metric} in {value.seconds} s")
        return (samples[-1][1] - samples[0][1]) * 1000 / (samples[-1][0] - samples[0][0])
    if value.agg == "count":
        return len(samples)
    if not samples:
        raise _Undecided("missing_value", f"no reading of {value.metric} in {value.seconds} s")
    numbers = [v for _, v in samples]
    return {"avg": sum(numbers) / len(numbers), "min": min(numbers), "max": max(numbers), "sum": sum(numbers)}[
        value.agg
    ]


_CMP = {
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
}


def holds(condition: Condition, state: DeviceState, shadow: Mapping[str, Any], now_ms: int) -> bool:
    """Whether ``condition`` holds at ``now_ms``; ``_Undecided`` when it cannot be told."""
    if isinstance(condition, Compare):
        left = _value(condition.left, state, shadow, now_ms)
        right = _value(condition.right, state, shadow, now_ms)
        if condition.cmp in ("eq", "ne"):
            if isinstance(left, (str, bool)) or isinstance(right, (str, bool)):
                same = type(left) is type(right) and left == right  # no coercion between kinds
            else:
                same = _number(left, "the left side") == _number(right, "the right side")
            return same if condition.cmp == "eq" else not same
        return bool(_CMP[condition.cmp](_number(left, "the left side"), _number(right, "the right side")))
    if isinstance(condition, AllOf):
        return all(holds(c, state, shadow, now_ms) for c in condition.of)
    if isinstance(condition, AnyOf):
        return any(holds(c, state, shadow, now_ms) for c in condition.of)
    if isinstance(condition, Not):
        return not holds(condition.of, state, shadow, now_ms)
    assert isinstance(condition, Absent)
    seen = state.last_seen_ms.get(condition.metric or ANY)
    if seen is None:
        raise _Undecided("missing_value", "never seen: absence counts from a first reading")
    return now_ms - seen >= condition.seconds * 1000


def _apply(rule: Rule, state: DeviceState, reading: Reading) -> bool:
    """Record the reading; False when it is not newer than the last one (a redelivery or a late reading)."""
    key = (reading.ts_ms, reading.seq)
    if key <= state.last_key:
        return False
    keep_ms = keep_s(rule) * 1000
    state.last_key = key
    state.last_seen_ms[ANY] = reading.ts_ms
    for name, value in reading.metrics.items():
        if isinstance(value, (bool, str)) or (isinstance(value, (int, float)) and math.isfinite(value)):
            state.last_values[name] = value
            state.last_seen_ms[name] = reading.ts_ms
        if keep_ms and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            samples = [s for s in state.samples.get(name, []) if s[0] > reading.ts_ms - keep_ms]
            samples.append((reading.ts_ms, float(value)))
            state.samples[name] = samples[-MAX_SAMPLES:]
    return True


def _values(rule: Rule, state: DeviceState, shadow: Mapping[str, Any], now_ms: int) -> dict[str, Any]:
    """What a transition records: the rule's metrics (every last value, when it names none) and its derived values
    (one that cannot be told at this instant is left out)."""
    names = rule.metrics or sorted(state.last_values)
    values = {n: state.last_values[n] for n in names if n in state.last_values}
    for name, value in rule.derive.items():
        try:
            values[name] = _value(value, state, shadow, now_ms)
        except _Undecided:
            values.pop(name, None)
    return values


def step(
    rule: Rule,
    state: DeviceState,
    *,
    reading: Reading | None = None,
    now_ms: int | None = None,
    shadow: Mapping[str, Any] | None = None,
) -> tuple[DeviceState, list[Transition], EvalError | None]:
    """Evaluate ``rule`` for one device after ``reading`` (at its time) or at the clock's ``now_ms``."""
    state = msgspec.structs.replace(
        state, last_values=dict(state.last_values), last_seen_ms=dict(state.last_seen_ms), samples=dict(state.samples)
    )
    if reading is not None:
        if not _apply(rule, state, reading):
            return state, [], None
        now_ms = reading.ts_ms
    if now_ms is None:
        raise ValueError("a reading or the time is needed")
    alarm = rule.alarm
    try:
        if not state.raised:
            target, wait_s = holds(alarm.when, state, shadow or {}, now_ms), alarm.for_s
        elif alarm.clear_when is not None:
            target, wait_s = holds(alarm.clear_when, state, shadow or {}, now_ms), alarm.clear_for_s
        else:
            target, wait_s = not holds(alarm.when, state, shadow or {}, now_ms), alarm.clear_for_s
    except _Undecided as undecided:
        return state, [], undecided.error
    if not target:
        state.since_ms = None
        return state, [], None
    if state.since_ms is None:
        state.since_ms = now_ms
    if now_ms - state.since_ms < wait_s * 1000:
        return state, [], None
    state.since_ms = None
    state.raised = not state.raised
    if state.raised:
        state.raised_count += 1
        return state, [Raised(now_ms, _values(rule, state, shadow or {}, now_ms))], None
    return state, [Cleared(now_ms, _values(rule, state, shadow or {}, now_ms))], None


def _absences(condition: Condition | None) -> list[Absent]:
    if condition is None:
        return []
    if isinstance(condition, (AllOf, AnyOf)):
        return [a for c in condition.of for a in _absences(c)]
    if isinstance(condition, Not):
        return _absences(condition.of)
    return [condition] if isinstance(condition, Absent) else []


def next_deadline(rule: Rule, state: DeviceState, after_ms: int) -> int | None:
    """The earliest time (ms) later than ``after_ms`` at which a clock tick may change the outcome with no new reading:
    a duration that completes, an absence that begins, a reading that leaves a window. Workers and the dry run tick
    exactly there, so both see the same transitions at the same times."""
    alarm = rule.alarm
    candidates: list[int] = []
    if state.since_ms is not None:
        candidates.append(state.since_ms + (alarm.clear_for_s if state.raised else alarm.for_s) * 1000)
    for absent in _absences(alarm.when) + _absences(alarm.clear_when):
        seen = state.last_seen_ms.get(absent.metric or ANY)
        if seen is not None:
            candidates.append(seen + absent.seconds * 1000)
    keep_ms = max(windows(alarm.when), windows(alarm.clear_when)) * 1000
    if keep_ms:
        for samples in state.samples.values():
            # the oldest sample still in the conditions' window leaves it first (older ones may be kept for derive)
            first = bisect.bisect_right(samples, (after_ms - keep_ms, math.inf))
            candidates += [ts + keep_ms for ts, _ in samples[first : first + 1]]
    future = [c for c in candidates if c > after_ms]
    return min(future) if future else None


def advance(
    rule: Rule,
    state: DeviceState,
    *,
    until_ms: int,
    reading: Reading | None = None,
    shadow: Mapping[str, Any] | None = None,
) -> tuple[DeviceState, list[Transition], list[EvalError]]:
    """Move one device's evaluation forward: tick every deadline after its clock and before ``reading`` (or up to
    ``until_ms`` without one), then apply the reading. The rule workers call it for each reading and when a deadline
    is due, the dry run for each stored reading: one definition of behaviour for both."""
    transitions: list[Transition] = []
    errors: list[EvalError] = []
    limit = until_ms if reading is None else min(until_ms, reading.ts_ms - 1)
    while (deadline := next_deadline(rule, state, state.clock_ms)) is not None and deadline <= limit:
        state, out, error = step(rule, state, now_ms=deadline, shadow=shadow)
        state.clock_ms = deadline
        transitions += out
        errors += [error] if error is not None else []
    if reading is not None:
        state, out, error = step(rule, state, reading=reading, shadow=shadow)
        state.clock_ms = max(state.clock_ms, reading.ts_ms)
        transitions += out
        errors += [error] if error is not None else []
    return state, transitions, errors


def replay(
    rule: Rule, readings: list[Reading], *, until_ms: int, shadow: Mapping[str, Any] | None = None
) -> tuple[DeviceState, list[Transition], list[EvalError]]:
    """One device's stored readings (any order) through ``advance`` with the clock ticking at every deadline up to
    ``until_ms``: the dry run."""
    state = DeviceState()
    transitions: list[Transition] = []
    errors: list[EvalError] = []
    for reading in sorted(readings, key=lambda r: (r.ts_ms, r.seq)):
        state, out, errs = advance(rule, state, until_ms=until_ms, reading=reading, shadow=shadow)
        transitions += out
        errors += errs
    state, out, errs = advance(rule, state, until_ms=until_ms, shadow=shadow)
    return state, transitions + out, errors + errs
