"""The alarm rule evaluator (ADR-0018): thresholds with hysteresis and duration, windows, rate, absence, undecided
values, and the properties the workers rely on: a redelivered reading never repeats a transition, and a state that
was stored and loaded again (a restart, a move to another worker) continues exactly as the one kept in memory."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kestrel_core.errors import InvalidInput
from kestrel_core.rules.evaluate import Cleared, DeviceState, Raised, Reading, Transition, replay, step
from kestrel_core.rules.model import Rule, parse_rule

S = 1000  # ms
BAD_CMP = {"op": "compare", "cmp": "gtx", "left": {"kind": "const", "value": 1}, "right": {"kind": "const", "value": 1}}


def rule(when: dict[str, Any], **alarm: Any) -> Rule:
    return parse_rule({"name": "r", "alarm": {"when": when, **alarm}})


def compare(cmp: str, metric: str, threshold: float) -> dict[str, Any]:
    return {"op": "compare", "cmp": cmp, "left": {"kind": "metric", "name": metric},
            "right": {"kind": "const", "value": threshold}}  # fmt: skip


def gt(metric: str, threshold: float) -> dict[str, Any]:
    return compare("gt", metric, threshold)


def lt(metric: str, threshold: float) -> dict[str, Any]:
    return compare("lt", metric, threshold)


def run(
    r: Rule, events: list[tuple[int, dict[str, Any] | None]], state: DeviceState | None = None
) -> tuple[DeviceState, list[Transition]]:
    """Feed (time in s, metrics) readings, or (time, None) clock ticks; the transitions in order."""
    state = state or DeviceState()
    out: list[Transition] = []
    for seq, (t, metrics) in enumerate(events):
        if metrics is None:
            state, transitions, _ = step(r, state, now_ms=t * S)
        else:
            state, transitions, _ = step(r, state, reading=Reading(t * S, seq, metrics))
        out += transitions
    return state, out


def test_threshold_with_duration_and_hysteresis_raises_once_and_clears_below_the_band() -> None:
    r = rule(gt("temp", 80), clear_when=lt("temp", 75), for_s=60)
    _, out = run(r, [(0, {"temp": 70}), (10, {"temp": 85}), (40, {"temp": 85}), (69, {"temp": 86})])
    assert out == []  # above for 59 s only
    _, out = run(r, [(0, {"temp": 85}), (30, {"temp": 85}), (60, {"temp": 85}), (90, {"temp": 90}),
                     (120, {"temp": 78}), (150, {"temp": 74})])  # fmt: skip
    assert out == [Raised(60 * S, {"temp": 85}), Cleared(150 * S, {"temp": 74})]  # 78 is inside the band: no clear


def test_a_dip_resets_the_duration() -> None:
    r = rule(gt("temp", 80), for_s=60)
    _, out = run(
        r, [(0, {"temp": 85}), (50, {"temp": 79}), (70, {"temp": 85}), (120, {"temp": 85}), (130, {"temp": 85})]
    )
    assert out == [Raised(130 * S, {"temp": 85})]


def test_the_duration_completes_on_the_clock_when_the_device_goes_quiet() -> None:
    r = rule(gt("temp", 80), for_s=60)
    _, out = run(r, [(0, {"temp": 85}), (30, None), (59, None), (61, None), (200, None)])
    assert out == [Raised(61 * S, {"temp": 85})]


def test_absence_raises_on_the_clock_and_clears_when_the_device_speaks() -> None:
    r = rule({"op": "absent", "seconds": 600})
    _, out = run(r, [(0, {"temp": 1}), (599, None), (600, None), (650, None), (700, {"temp": 2})])
    assert out == [Raised(600 * S, {"temp": 1}), Cleared(700 * S, {"temp": 2})]
    _, never = run(r, [(0, None), (10_000, None)])  # never seen: undecided, not an alarm for every new device
    assert never == []


def test_windows_and_rate() -> None:
    window = {"kind": "window", "agg": "avg", "metric": "p", "seconds": 30}
    avg_above = {"op": "compare", "cmp": "gt", "left": window, "right": {"kind": "const", "value": 10}}
    _, out = run(rule(avg_above), [(0, {"p": 0}), (10, {"p": 20}), (20, {"p": 20}), (35, {"p": 20})])
    assert out == [Raised(20 * S, {"p": 20})]  # avg(0, 20, 20) = 13.3 > 10
    _, early = run(rule(avg_above), [(0, {"p": 0}), (10, {"p": 20})])
    assert early == []  # avg(0, 20) = 10: not above
    rate = {"kind": "rate", "metric": "p", "seconds": 60}
    rising = {"op": "compare", "cmp": "ge", "left": rate, "right": {"kind": "const", "value": 1}}
    _, out = run(rule(rising), [(0, {"p": 0}), (30, {"p": 20}), (60, {"p": 61})])
    assert out == [Raised(60 * S, {"p": 61})]  # (61 - 0) / 60 s >= 1 /s; at 30 s: 20 / 30 < 1
    count = {"kind": "window", "agg": "count", "metric": "door", "seconds": 60}
    many = {"op": "compare", "cmp": "ge", "left": count, "right": {"kind": "const", "value": 3}}
    _, out = run(
        rule(many), [(0, {"door": 1}), (20, {"door": 1}), (70, {"door": 1}), (80, {"door": 1}), (90, {"door": 1})]
    )
    assert out == [Raised(90 * S, {"door": 1})]  # the one at 0 s left the window


def test_undecided_values_make_no_transition_and_are_reported() -> None:
    r = rule(gt("temp", 80))
    state, transitions, error = step(r, DeviceState(), reading=Reading(0, 0, {"humidity": 50}))
    assert transitions == [] and error is not None and error.reason == "missing_value"
    _, transitions, error = step(r, state, reading=Reading(1 * S, 1, {"temp": "hot"}))
    assert transitions == [] and error is not None and error.reason == "type_error"
    shadow_rule = rule({"op": "compare", "cmp": "eq", "left": {"kind": "shadow", "path": "mode.set"},
                        "right": {"kind": "const", "value": "auto"}})  # fmt: skip
    _, transitions, _ = step(shadow_rule, DeviceState(), now_ms=0, shadow={"mode": {"set": "auto"}})
    assert [type(t) for t in transitions] == [Raised]
    _, transitions, error = step(shadow_rule, DeviceState(), now_ms=0, shadow={})
    assert transitions == [] and error is not None and error.reason == "missing_value"


def test_a_redelivered_or_late_reading_changes_nothing() -> None:
    r = rule(gt("temp", 80), clear_when=lt("temp", 75))
    state, transitions, _ = step(r, DeviceState(), reading=Reading(10 * S, 5, {"temp": 90}))
    assert len(transitions) == 1
    for again in (Reading(10 * S, 5, {"temp": 10}), Reading(5 * S, 9, {"temp": 10})):  # redelivery, late reading
        after, transitions, _ = step(r, state, reading=again)
        assert transitions == [] and after == state


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({"name": "r", "alarm": {"when": BAD_CMP}}, "$.alarm.when.cmp"),
        ({"name": "r", "alarm": {"when": {"op": "absent", "seconds": 0}}}, "$.alarm.when.seconds"),
        ({"name": "r", "alarm": {"when": {"op": "eval", "code": "__import__('os')"}}}, "$.alarm.when"),
        ({"name": "r", "alarm": {"when": gt("t", 1), "severity": "doom"}}, "$.alarm.severity"),
        ({"name": "", "alarm": {"when": gt("t", 1)}}, "$.name"),
    ],
)
def test_a_bad_rule_names_the_offending_field(document: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        parse_rule(document)
    assert refused.value.reason == "bad_rule" and field in refused.value.detail, refused.value.detail
    with pytest.raises(InvalidInput):
        parse_rule(json.dumps(document))


def test_rules_are_bounded() -> None:
    deep: dict[str, Any] = gt("t", 1)
    for _ in range(9):
        deep = {"op": "not", "of": deep}
    with pytest.raises(InvalidInput, match="nest"):
        parse_rule({"name": "r", "alarm": {"when": deep}})
    wide = {"op": "or", "of": [{"op": "and", "of": [gt("t", i)] * 16} for i in range(5)]}
    with pytest.raises(InvalidInput, match="at most"):
        parse_rule({"name": "r", "alarm": {"when": wide}})


readings = st.lists(st.tuples(st.integers(0, 3), st.integers(60, 100)), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(readings, st.lists(st.integers(0, 59), max_size=20), st.integers(0, 59))
def test_redelivery_and_a_stored_state_never_change_the_outcome(
    steps: list[tuple[int, int]], repeats: list[int], cut: int
) -> None:
    r = rule(gt("temp", 80), clear_when=lt("temp", 75), for_s=20, clear_for_s=10)
    events: list[Reading] = []
    t = 0
    for seq, (gap, temp) in enumerate(steps):
        t += gap * 10
        events.append(Reading(t * S, seq, {"temp": temp}))

    def feed(sequence: list[Reading], state: DeviceState) -> tuple[DeviceState, list[Transition]]:
        out: list[Transition] = []
        for reading in sequence:
            state, transitions, _ = step(r, state, reading=reading)
            out += transitions
        return state, out

    _, expected = feed(events, DeviceState())
    assert [type(x) for x in expected] == [Raised, Cleared] * (len(expected) // 2) + [Raised] * (len(expected) % 2)
    with_repeats = list(events)
    for i in sorted(repeats, reverse=True):  # a redelivered message arrives again, anywhere after itself
        if i < len(events):
            with_repeats.insert(min(i + 1, len(with_repeats)), events[i])
    assert feed(with_repeats, DeviceState())[1] == expected
    head, tail = events[: min(cut, len(events))], events[min(cut, len(events)) :]
    state, first = feed(head, DeviceState())
    stored = msgspec.json.decode(msgspec.json.encode(state), type=DeviceState)  # another worker loads it
    assert first + feed(tail, stored)[1] == expected


def test_the_dry_run_ticks_at_deadlines_and_matches_a_clock_that_ticks_every_second() -> None:
    """The replay ticks only where something can happen; a worker whose clock ticks every second (the slow way) sees
    the same transitions at the same times."""
    quiet = {"op": "absent", "seconds": 300}
    hot = {"op": "compare", "cmp": "gt", "left": {"kind": "window", "agg": "avg", "metric": "t", "seconds": 120},
           "right": {"kind": "const", "value": 80}}  # fmt: skip
    r = rule({"op": "or", "of": [quiet, hot]}, clear_when={"op": "and", "of": [{"op": "not", "of": quiet},
             {"op": "not", "of": hot}]}, for_s=30, clear_for_s=60)  # fmt: skip
    readings = [Reading(t * S, i, {"t": v}) for i, (t, v) in enumerate(
        [(0, 70), (10, 95), (20, 95), (30, 95), (200, 60), (210, 60), (700, 60), (720, 90), (730, 90), (760, 90)])]  # fmt: skip
    _, replayed, errors = replay(r, readings, until_ms=1200 * S)
    # the only undecided instants: the 2-minute window emptied (its last reading left it) before a new reading came
    assert {e.detail for e in errors} <= {"no reading of t in 120 s"}
    state, ticked = DeviceState(), []
    by_time = {reading.ts_ms: reading for reading in readings}
    for ms in range(0, 1200 * S + 1, S):
        if ms in by_time:
            state, out, _ = step(r, state, reading=by_time[ms])
        else:
            state, out, _ = step(r, state, now_ms=ms)
        ticked += out
    assert replayed == ticked
    # Hot on the 2-minute average from 10 s, raised after 30 s; cool and reporting from 200 s, cleared after 60 s;
    # silent from 210 s, absent at 510 s, raised 30 s later; from 700 s cool again, but hot again on the average at
    # 760 s, before the 60 s needed to clear: it stays raised.
    assert [(type(x), x.at_ms // S) for x in replayed] == [(Raised, 40), (Cleared, 260), (Raised, 540)]


def test_every_reading_that_leaves_a_window_is_a_deadline_not_only_the_oldest() -> None:
    """Four readings in a minute raise; the clear needs two of them to have left the window: the second one's leaving
    (at 70 s) is ticked although the oldest left before (a regression: only the oldest was ever a deadline)."""
    count = {"kind": "window", "agg": "count", "metric": "t", "seconds": 60}
    r = rule({"op": "compare", "cmp": "ge", "left": count, "right": {"kind": "const", "value": 4}},
             clear_when={"op": "compare", "cmp": "le", "left": count, "right": {"kind": "const", "value": 2}})  # fmt: skip
    readings = [Reading(t * S, t, {"t": 1.0}) for t in (0, 10, 20, 30)]
    _, transitions, _ = replay(r, readings, until_ms=200 * S)
    assert [(type(t), t.at_ms) for t in transitions] == [(Raised, 30 * S), (Cleared, 70 * S)]


def test_derived_values_are_recorded_with_the_transition_as_the_evaluator_tells_them() -> None:
    avg = {"kind": "window", "agg": "avg", "metric": "t", "seconds": 300}
    r = parse_rule({"name": "r", "metrics": ["t"], "derive": {"t_avg": avg, "limit": {"kind": "shadow", "path": "lim"},
                    "never": {"kind": "metric", "name": "other"}},
                    "alarm": {"when": gt("t", 80)},
                    "on_raise": [{"do": "write_metric", "metrics": ["t_avg"]}]})  # fmt: skip
    readings = [Reading(t * S, t, {"t": v}) for t, v in ((0, 60.0), (60, 70.0), (120, 90.0))]
    _, transitions, _ = replay(r, readings, until_ms=200 * S, shadow={"lim": 80})
    (raised,) = transitions
    assert raised.values == {"t": 90.0, "t_avg": pytest.approx(220 / 3), "limit": 80}  # undecidable: left out
    with pytest.raises(InvalidInput, match=r"nope is neither in metrics nor in derive \(at \$\.on_clear\[0\]\)"):
        parse_rule({"name": "r", "alarm": {"when": gt("t", 80)}, "on_clear": [{"do": "write_metric",
                                                                                "metrics": ["nope"]}]})  # fmt: skip
