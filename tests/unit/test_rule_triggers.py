"""Rule triggers beyond telemetry (ADR-0020): twin events and schedule ticks become the evaluator's readings with the
documented values, the partition routes each message by its subject to the rules whose trigger takes it, the dry
run's journal rows become the same readings as the published events, and the model refuses what it cannot mean."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from kestrel_core.errors import InvalidInput
from kestrel_core.messages.twin import CommandEvent, LifecycleEvent, PresenceEvent, ShadowEvent
from kestrel_core.rules.evaluate import Cleared, DeviceState, Raised, Reading, advance
from kestrel_core.rules.events import Tick, decode_event, stored_reading
from kestrel_core.rules.model import parse_rule
from rules.decide import incoming, watches

ONLINE = {"op": "compare", "cmp": "eq", "left": {"kind": "metric", "name": "presence.online"},
          "right": {"kind": "const", "value": False}}  # fmt: skip


def rule(trigger: dict[str, Any], when: dict[str, Any], **extra: Any) -> Any:
    return parse_rule({"name": "r", "trigger": trigger, "alarm": {"when": when}, **extra})


def test_twin_events_become_readings_with_the_documented_values() -> None:
    presence = PresenceEvent(tenant="t1", device="d1", event="disconnected", online=False, connections=0, at=5000)
    came = incoming("rules.3.e.t1.d1.presence", msgspec.json.encode(presence), 77)
    assert (came.tenant, came.device, came.rule_id) == ("t1", "d1", None)
    (reading,) = came.readings
    assert (reading.ts_ms, reading.seq, reading.kind) == (5000, 77, "presence")
    assert reading.metrics == {"presence.online": False, "presence.event": "disconnected", "presence.connections": 0}
    shadow = ShadowEvent(
        tenant="t1", device="d1", name="", version=4, reported={"battery": 12}, desired={}, delta={}, at=5500
    )
    came = incoming("rules.3.e.t1.d1.shadow", msgspec.json.encode(shadow), 78)
    assert came.shadow == {"battery": 12} and came.readings[0].metrics == {"shadow.name": "", "shadow.version": 4}
    named = msgspec.structs.replace(shadow, name="gps")
    assert incoming("rules.3.e.t1.d1.shadow", msgspec.json.encode(named), 79).shadow is None  # not the default's
    command = CommandEvent(tenant="t1", device="d1", command_id="c1", event="failed", status="failed", detail=None,
                           at=6000)  # fmt: skip
    assert incoming("rules.3.e.t1.d1.command", msgspec.json.encode(command), 80).readings[0].metrics == {
        "command.id": "c1", "command.event": "failed"}  # fmt: skip
    lifecycle = LifecycleEvent(tenant="t1", device="d1", status="suspended", previous="active", at=7000)
    assert incoming("rules.3.e.t1.d1.lifecycle", msgspec.json.encode(lifecycle), 81).readings[0].metrics == {
        "lifecycle.status": "suspended", "lifecycle.previous": "active"}  # fmt: skip


def test_a_tick_carries_presence_and_silence_for_its_rule_only() -> None:
    tick = Tick(tenant="t1", device="d1", rule_id="r" + "0" * 24, at=120_000, online=False, last_seen=60_000)
    came = incoming("rules.0.k.t1.d1", msgspec.json.encode(tick), 5)
    assert came.rule_id == tick.rule_id
    assert came.readings[0].metrics == {"tick.online": False, "tick.silent_s": 60.0}
    never = msgspec.structs.replace(tick, last_seen=None)
    assert "tick.silent_s" not in incoming("rules.0.k.t1.d1", msgspec.json.encode(never), 6).readings[0].metrics


@pytest.mark.parametrize(
    ("subject", "data", "reason"),
    [
        ("rules.3.e.t1.d1.presence", b"{not json", "bad_json"),
        ("rules.3.e.t1.d1.presence", b'{"tenant": "t1"}', "bad_event"),
        ("rules.3.e.t1.d1.weather", b"{}", "bad_event"),
        # an event whose body names another tenant's device than its subject: never evaluated for either
        (
            "rules.3.e.t1.d1.lifecycle",
            msgspec.json.encode(LifecycleEvent(tenant="t2", device="d1", status="active", previous="", at=1)),
            "bad_event",
        ),
    ],
)
def test_an_unreadable_event_is_refused_with_its_reason(subject: str, data: bytes, reason: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        incoming(subject, data, 1)
    assert refused.value.reason == reason


def test_each_rule_sees_only_what_its_trigger_takes() -> None:
    on_presence = rule({"kind": "events", "events": ["presence"]}, ONLINE)
    on_telemetry = parse_rule({"name": "t", "metrics": ["temp"], "alarm": {"when": ONLINE}})
    on_schedule = rule({"kind": "schedule", "every_s": 60}, ONLINE)
    presence = decode_event("presence", msgspec.json.encode(
        PresenceEvent(tenant="t", device="d", event="connected", online=True, connections=1, at=1)), 1).reading  # fmt: skip
    tick = decode_event("tick", msgspec.json.encode(Tick(tenant="t", device="d", rule_id="r", at=1, online=True)),
                        2).reading  # fmt: skip
    temp = Reading(1, 1, {"temp": 3.0})
    assert [watches(r, presence) for r in (on_presence, on_telemetry, on_schedule)] == [True, False, False]
    assert [watches(r, tick) for r in (on_presence, on_telemetry, on_schedule)] == [False, False, True]
    assert [watches(r, temp) for r in (on_presence, on_telemetry, on_schedule)] == [False, True, False]
    # a reading that happens to carry a metric named like an event value is still telemetry
    assert not watches(on_presence, Reading(1, 1, {"presence.online": False}))


def test_a_presence_rule_raises_on_the_disconnect_and_clears_on_the_connect() -> None:
    r = rule({"kind": "events", "events": ["presence"]}, ONLINE)
    state = DeviceState()
    transitions = []
    for seq, (online, at) in enumerate([(True, 1000), (False, 2000), (False, 2500), (True, 9000)]):
        event = PresenceEvent(tenant="t", device="d", event="x", online=online, connections=int(online), at=at)
        reading = decode_event("presence", msgspec.json.encode(event), seq).reading
        state, out, errors = advance(r, state, until_ms=at, reading=reading)
        assert not errors
        transitions += out
    assert [(type(t), t.at_ms) for t in transitions] == [(Raised, 2000), (Cleared, 9000)]


def test_journal_rows_become_the_readings_of_their_published_events() -> None:
    command = CommandEvent(tenant="t", device="d", command_id="c9", event="timed_out", status="timed_out",
                           detail=None, at=4000)  # fmt: skip
    published = decode_event("command", msgspec.json.encode(command), 12).reading
    stored = stored_reading("command", {"id": 12, "command_id": "c9", "event": "timed_out"}, 4000)
    assert stored == published
    lifecycle = LifecycleEvent(tenant="t", device="d", status="active", previous="provisioned", at=4100)
    assert stored_reading("lifecycle", {"id": 3, "status": "active", "previous": "provisioned"}, 4100) == (
        decode_event("lifecycle", msgspec.json.encode(lifecycle), 3).reading)  # fmt: skip


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({"trigger": {"kind": "events", "events": []}}, "$.trigger.events"),
        ({"trigger": {"kind": "events", "events": ["weather"]}}, "$.trigger.events[0]"),
        ({"trigger": {"kind": "schedule", "every_s": 5}}, "$.trigger.every_s"),
        ({"trigger": {"kind": "cron"}}, "$.trigger"),
        ({"trigger": {"kind": "events", "events": ["presence"]}, "metrics": ["temp"]}, "$.metrics"),
    ],
)
def test_a_trigger_that_cannot_mean_anything_is_refused_at_its_field(document: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        parse_rule({"name": "r", "alarm": {"when": ONLINE}, **document})
    assert field in refused.value.detail
