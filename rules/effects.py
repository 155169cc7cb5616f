"""What a transition does, inside the transaction that stores the states that caused it (so a redelivered reading,
which changes no state, never repeats any of it): the alarm (one active per (rule, device); a raise while the last
alarm is cleared and unacknowledged re-opens it as a re-trigger), its event in the outbox, one delivery per channel
the rule notifies, and the rule's actions. Every target is looked up inside the rule's tenant. An action that fails
(a decommissioned device, a command past the limits) is counted and logged with the rule id; it rolls back to its own
savepoint and never stops the other effects."""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from kestrel.store import alarms, commands, shadows
from kestrel.store.rows import fetch_all, fetch_maybe
from kestrel.store.session import Actor
from kestrel_core.errors import InvalidInput, KestrelError
from kestrel_core.messages.alarms import AlarmEvent, Transition, republish_subject
from kestrel_core.messages.telemetry import Point, TelemetryEnvelope
from kestrel_core.rules.actions import DERIVED_STREAM, Action, Republish, SendCommand, SetDesired, WriteMetric
from kestrel_core.rules.evaluate import Raised
from kestrel_core.topics import telemetry_topic, tenant_out_topic
from rules.decide import Fired, event_document

log = logging.getLogger("kestrel.rules")


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


ALARM_ROW = "alarm_id, tenant_id, rule_id, rule_name, device_id, severity, status, acknowledged"


async def _raise(conn: AsyncConnection[Any], fired: Fired) -> tuple[dict[str, Any], Transition] | None:
    loaded, at = fired.loaded, _at(fired.transition.at_ms)
    values = Jsonb(fired.transition.values)
    latest = await fetch_maybe(
        conn,
        f"SELECT {ALARM_ROW} FROM alarms WHERE rule_id = %s AND device_id = %s AND tenant_id = %s"
        " ORDER BY raised_at DESC LIMIT 1 FOR UPDATE",
        (loaded.rule_id, fired.device, loaded.tenant),
    )
    if latest is not None and latest["status"] == "active":
        return None  # raised already (the rule's state was reset by an edit): nothing new happened
    if latest is not None and not latest["acknowledged"]:
        row = await fetch_maybe(
            conn,
            f"UPDATE alarms SET status = 'active', retriggers = retriggers + 1, raised_values = %s, cleared_at = NULL,"
            f" cleared_by = NULL, cleared_values = NULL, severity = %s, version = version + 1, updated_at = now()"
            f" WHERE alarm_id = %s RETURNING {ALARM_ROW}",
            (values, loaded.rule.alarm.severity, latest["alarm_id"]),
        )
        return (row, "retriggered") if row else None
    row = await fetch_maybe(
        conn,
        f"INSERT INTO alarms (alarm_id, tenant_id, rule_id, rule_name, device_id, severity, raised_at, raised_values)"
        f" SELECT %s, d.tenant_id, %s, %s, d.device_id, %s, %s, %s FROM devices d"
        f" WHERE d.device_id = %s AND d.tenant_id = %s RETURNING {ALARM_ROW}",
        ("a" + secrets.token_hex(12), loaded.rule_id, loaded.rule.name, loaded.rule.alarm.severity, at, values,
         fired.device, loaded.tenant),
    )  # fmt: skip
    return (row, "raised") if row else None


async def _clear(conn: AsyncConnection[Any], fired: Fired) -> tuple[dict[str, Any], Transition] | None:
    row = await fetch_maybe(
        conn,
        f"UPDATE alarms SET status = 'cleared', cleared_at = %s, cleared_by = 'rule', cleared_values = %s,"
        f" version = version + 1, updated_at = now()"
        f" WHERE rule_id = %s AND device_id = %s AND tenant_id = %s AND status = 'active' RETURNING {ALARM_ROW}",
        (_at(fired.transition.at_ms), Jsonb(fired.transition.values), fired.loaded.rule_id, fired.device,
         fired.loaded.tenant),
    )  # fmt: skip
    return (row, "cleared") if row else None  # None: a person cleared it first


async def _notify(conn: AsyncConnection[Any], fired: Fired, event_id: int, document: AlarmEvent) -> int:
    """One delivery per enabled channel of the rule's tenant it names; the delivery id is the receivers' idempotency
    key."""
    channels = await fetch_all(
        conn,
        "SELECT channel_id FROM channels WHERE tenant_id = %s AND channel_id = ANY(%s) AND enabled",
        (fired.loaded.tenant, list(fired.loaded.rule.notify)),
    )
    payload = Jsonb(msgspec.to_builtins(document))
    for channel in channels:
        await conn.execute(
            "INSERT INTO deliveries (delivery_id, tenant_id, channel_id, alarm_id, event_id, payload)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (event_id, channel_id) DO NOTHING",
            ("n" + secrets.token_hex(12), fired.loaded.tenant, channel["channel_id"], document.alarm_id, event_id,
             payload),
        )  # fmt: skip
    return len(channels)


ACTION_KINDS: Final = {SetDesired: "set_desired", SendCommand: "command", Republish: "republish",
                       WriteMetric: "write_metric"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message an action publishes once its transition is committed: on NATS (deduplicated by ``msg_id``) or, with
    ``mqtt``, on the broker (``subject`` is then the MQTT topic)."""

    subject: str
    data: bytes
    msg_id: str
    kind: str = "republish"  # the action's kind, for the counts
    mqtt: bool = False


def _derived(fired: Fired, action: WriteMetric, event_id: int) -> Outgoing:
    """The transition's values named by the action as one reading of the device's ``rules`` stream, at the
    transition's instant; its sequence is the alarm event's id, so it is stored once however often it is sent."""
    values = fired.transition.values
    metrics = {n: values[n] for n in action.metrics if n in values and _storable(values[n])}
    if not metrics:
        raise InvalidInput("no_value", "none of the values to write was known at the transition")
    topic = telemetry_topic(fired.loaded.tenant, fired.device, DERIVED_STREAM)
    point = Point(fired.transition.at_ms * 1000, event_id, msgspec.Raw(msgspec.json.encode(metrics)))
    envelope = TelemetryEnvelope(tenant=fired.loaded.tenant, device=fired.device, stream=DERIVED_STREAM,
                                 received_us=time.time_ns() // 1000, identity="server", points=[point])  # fmt: skip
    msg_id = f"derived-{event_id}-{','.join(sorted(metrics))}"
    return Outgoing(topic.subject, msgspec.json.encode(envelope), msg_id, kind="write_metric")


def _storable(value: Any) -> bool:
    return isinstance(value, (bool, str)) or (isinstance(value, (int, float)) and math.isfinite(value))


async def _act(
    conn: AsyncConnection[Any], fired: Fired, action: Action, actor: Actor, event_id: int, document: AlarmEvent
) -> Outgoing | None:
    """One action; returns what to publish after the commit, if anything."""
    tenant, device = fired.loaded.tenant, fired.device
    if isinstance(action, SetDesired):
        await shadows.set_desired(conn, actor, tenant, device, action.shadow, action.state)
    elif isinstance(action, SendCommand):
        await commands.send(
            conn, actor, tenant, device, action.name, action.params, timeout_s=action.timeout_s,
            expires_in_s=max(action.timeout_s, 300), max_attempts=5,
        )  # fmt: skip
    elif isinstance(action, Republish):
        msg_id = f"republish-{document.alarm_id}-{document.event}-{document.at}-{action.subject}"[:200]
        if action.to == "mqtt":
            return Outgoing(tenant_out_topic(tenant, action.subject), msgspec.json.encode(document), msg_id, mqtt=True)
        return Outgoing(republish_subject(tenant, action.subject), msgspec.json.encode(document), msg_id)
    else:
        return _derived(fired, action, event_id)
    return None


def wanted(fired: list[Fired]) -> dict[str, int]:
    """How many actions each tenant's transitions would take (what a batch reserves of the tenants' rates)."""
    wants: dict[str, int] = {}
    for item in fired:
        actions = item.loaded.rule.on_raise if isinstance(item.transition, Raised) else item.loaded.rule.on_clear
        if actions:
            wants[item.loaded.tenant] = wants.get(item.loaded.tenant, 0) + len(actions)
    return wants


async def apply(
    conn: AsyncConnection[Any],
    fired: list[Fired],
    *,
    allow_action: Callable[[str], bool],
    counted: Callable[[str, str], None],
) -> list[Outgoing]:
    """Apply the batch's transitions in order; returns what the actions publish after the commit.
    ``allow_action(tenant)`` spends one of the tenant's actions reserved for the batch; ``counted(kind, outcome)``
    counts."""
    outgoing: list[Outgoing] = []
    for item in fired:
        raising = isinstance(item.transition, Raised)
        changed = await (_raise(conn, item) if raising else _clear(conn, item))
        if changed is None:
            counted("transition", "absorbed")
            continue
        row, event = changed
        at = _at(item.transition.at_ms)
        event_id = await alarms.record_event(
            conn, row["tenant_id"], row["alarm_id"], event, "rule", item.transition.values, at
        )
        document = event_document(row, event, item.transition.at_ms, "rule", item.transition.values)
        counted("transition", event)
        if await _notify(conn, item, event_id, document):
            counted("delivery", "queued")
        actor = Actor(f"rule:{item.loaded.rule_id}", f"alarm-event-{event_id}")
        for action in item.loaded.rule.on_raise if raising else item.loaded.rule.on_clear:
            kind = ACTION_KINDS[type(action)]
            if not allow_action(item.loaded.tenant):
                counted(kind, "rate_limited")
                log.warning("rule action over the tenant's rate", extra={"rule": item.loaded.rule_id, "action": kind})
                continue
            try:
                async with conn.transaction():  # a savepoint: a failed action undoes itself only
                    if (message := await _act(conn, item, action, actor, event_id, document)) is not None:
                        outgoing.append(message)
                counted(kind, "done")
            except KestrelError as exc:
                counted(kind, "failed")
                log.warning("rule action failed", extra={"rule": item.loaded.rule_id, "action": kind,
                                                         "device": item.device, "error": str(exc)})  # fmt: skip
    return outgoing
