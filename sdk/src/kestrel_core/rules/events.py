"""Twin events and schedule ticks as the evaluator's readings (issue 13, ADR-0020), so rules on events and schedules
run through the same ``advance`` as rules on telemetry. A rule triggered by events sees each event of the kinds it
names as a reading at the event's time (``seq``: its position in the stream), with these values:

=========  ==================================================================================================
presence   ``presence.online`` (bool), ``presence.event`` (connected, disconnected, status_online,
           status_offline, grace_expired), ``presence.connections``
shadow     ``shadow.name``, ``shadow.version``; conditions on the reported state (``shadow`` values) read the
           event's own reported document when it is the default shadow's
command    ``command.id``, ``command.event`` (the status it moved to: queued, sent, delivered, succeeded,
           failed, timed_out, expired, cancelled; or retry, answer_requested, duplicate_response, late_response)
lifecycle  ``lifecycle.status`` (registered, provisioned, active, suspended, decommissioned),
           ``lifecycle.previous`` (empty when the device was created)
tick       ``tick.online`` (bool), ``tick.silent_s`` (seconds since the device was last seen; missing if never)
=========  ==================================================================================================

An event older than one the rule already applied for the device is ignored, as a late reading is. The dry run
replays command and lifecycle events from their journals (``stored_reading``) into the same values.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from kestrel_core.errors import InvalidInput
from kestrel_core.messages.twin import CommandEvent, LifecycleEvent, PresenceEvent, ShadowEvent
from kestrel_core.rules.evaluate import Reading

_DECODERS: Final[dict[str, msgspec.json.Decoder[Any]]] = {
    "presence": msgspec.json.Decoder(PresenceEvent),
    "shadow": msgspec.json.Decoder(ShadowEvent),
    "command": msgspec.json.Decoder(CommandEvent),
    "lifecycle": msgspec.json.Decoder(LifecycleEvent),
}
EVENT_KINDS: Final = frozenset(_DECODERS)


class Tick(msgspec.Struct, frozen=True, kw_only=True):
    """A schedule's tick for one device (the scheduler publishes it into the device's partition)."""

    tenant: str
    device: str
    rule_id: str
    at: int
    online: bool
    last_seen: int | None = None


_tick = msgspec.json.Decoder(Tick)


class Decoded(msgspec.Struct, frozen=True):
    tenant: str
    device: str
    reading: Reading
    #: The reported state the event carries (the default shadow's), to evaluate against instead of the stored one.
    shadow: dict[str, Any] | None = None
    #: A tick is for one rule only.
    rule_id: str | None = None


def decode_event(kind: str, data: bytes, seq: int) -> Decoded:
    """The event of ``kind`` (or a ``tick``) as a reading; ``InvalidInput`` when it is not one."""
    try:
        if kind == "tick":
            tick = _tick.decode(data)
            values: dict[str, Any] = {"tick.online": tick.online}
            if tick.last_seen is not None:
                values["tick.silent_s"] = max(0, tick.at - tick.last_seen) / 1000
            return Decoded(tick.tenant, tick.device, Reading(tick.at, seq, values, "tick"), rule_id=tick.rule_id)
        decoder = _DECODERS.get(kind)
        if decoder is None:
            raise InvalidInput("bad_event", f"no event kind {kind}")
        event = decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise InvalidInput("bad_event", str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise InvalidInput("bad_json", str(exc)) from exc
    shadow = None
    if isinstance(event, PresenceEvent):
        values = {"presence.online": event.online, "presence.event": event.event,
                  "presence.connections": event.connections}  # fmt: skip
    elif isinstance(event, ShadowEvent):
        values = {"shadow.name": event.name, "shadow.version": event.version}
        shadow = event.reported if event.name == "" else None
    elif isinstance(event, CommandEvent):
        values = {"command.id": event.command_id, "command.event": event.event}
    else:
        values = {"lifecycle.status": event.status, "lifecycle.previous": event.previous}
    return Decoded(event.tenant, event.device, Reading(event.at, seq, values, kind), shadow)


#: The event kinds the dry run can replay from what PostgreSQL keeps (presence and shadow history are not kept in
#: the form of their events).
STORED_KINDS: Final = frozenset({"command", "lifecycle"})


def stored_reading(kind: str, row: dict[str, Any], at_ms: int) -> Reading:
    """A journal row (``command_events``: command_id, event; ``lifecycle_events``: status, previous) as the reading
    its published event becomes (``seq``: the row id, the order the journal publishes in)."""
    if kind == "command":
        values: dict[str, Any] = {"command.id": row["command_id"], "command.event": row["event"]}
    else:
        values = {"lifecycle.status": row["status"], "lifecycle.previous": row["previous"]}
    return Reading(at_ms, row["id"], values, kind)
