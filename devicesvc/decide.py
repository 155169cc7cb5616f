"""devicesvc's decisions: pure functions, no I/O (the shape of authsvc's ``decide``). What a device message means,
whether a device is online after an event, what a command looks like on the wire and whether the broker can carry
it, when to try again. The modules around it do the reading and writing."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import msgspec

from kestrel_core import shadow
from kestrel_core.errors import InvalidInput
from kestrel_core.messages.twin import (
    BrokerStarted,
    ClientEvent,
    CommandRequest,
    CommandResponse,
    DesiredDocument,
    ReportedState,
    StatusMessage,
)
from kestrel_core.mqttpacket import publish_size
from kestrel_core.retry import Backoff
from kestrel_core.topics import (
    Uplink,
    command_response_topic,
    command_topic,
    is_valid_id,
    parse_uplink,
)

#: A device clock this far ahead of ours is trusted no further (a future timestamp would freeze fields).
MAX_CLOCK_AHEAD_MS: Final = 5_000
ATTEMPT_PROPERTY: Final = "kestrel-attempt"
#: What commands and desired-state documents say they are (MQTT 5 Content Type, with Payload Format Indicator 1).
CONTENT_TYPE: Final = "application/json"
#: The longest wait between two sends of an unacknowledged command.
COMMAND_RETRY_CAP_S: Final = 300.0


def decode(payload: bytes, kind: Any, reason: str) -> Any:
    """A device payload as ``kind``: ``bad_json`` if it is not JSON, ``reason`` if it is not that shape."""
    try:
        return msgspec.json.decode(payload, type=kind)
    except msgspec.ValidationError as exc:
        raise InvalidInput(reason, f"{reason.replace('_', ' ')}: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise InvalidInput("bad_json", "payload is not JSON") from exc
    except RecursionError as exc:
        raise InvalidInput("too_deep", "payload nests too deeply") from exc


def check_size(payload: bytes, limit: int) -> None:
    if len(payload) > limit:
        raise InvalidInput("payload_too_large", f"payloads are limited to {limit} bytes")


def worker_for(topic: str, workers: int) -> int:
    """The worker a message goes to: by device id (client id for broker events), so one device's stay in order."""
    parts = topic.split("/")
    index = 4 if topic.startswith("$SYS/") else 3
    key = parts[index] if len(parts) > index else topic
    return int.from_bytes(hashlib.blake2s(key.encode(), digest_size=4).digest(), "big") % workers


def is_report(topic: str) -> bool:
    try:
        return parse_uplink(topic).kind == "reported"
    except InvalidInput:
        return False


def ms(ts: datetime | None) -> int | None:
    return None if ts is None else int(ts.timestamp() * 1000)


# ------------------------------------------------------------------------------------------------ reports


@dataclass(frozen=True)
class Report:
    """One reported-state merge patch, validated."""

    tenant: str
    device: str
    name: str
    state: dict[str, Any]
    ts_ms: int


def report(topic: str, payload: bytes, now_ms: int, max_payload: int) -> Report:
    """What a reported-state message asks for (``InvalidInput`` when it is not one)."""
    check_size(payload, max_payload)
    uplink = parse_uplink(topic)
    body: ReportedState = decode(payload, ReportedState, "bad_report")
    ts = min(body.ts, now_ms + MAX_CLOCK_AHEAD_MS) if body.ts is not None else now_ms
    return Report(uplink.tenant, uplink.device, uplink.arg, body.state, ts)


# ------------------------------------------------------------------------------------------------ presence


@dataclass(frozen=True)
class Connection:
    """A broker client event about a device's connection."""

    node: str
    device: str
    connected: bool  # False: disconnected
    event: ClientEvent

    @property
    def at(self) -> datetime:
        return datetime.fromtimestamp((self.event.ts or self.event.connected_at) / 1000, UTC)

    @property
    def connected_at(self) -> datetime:
        return datetime.fromtimestamp(self.event.connected_at / 1000, UTC)

    @property
    def peer(self) -> str:
        return self.event.ipaddress[:64]

    @property
    def reason(self) -> str:
        return self.event.reason[:120]

    @property
    def name(self) -> str:
        return "connected" if self.connected else "disconnected"


def client_event(topic: str, payload: bytes) -> Connection | None:
    """A broker client event; None for a client that is not a device (a backend or a provisioning connection)."""
    parts = topic.split("/")
    if len(parts) != 6 or parts[3] != "clients" or parts[5] not in ("connected", "disconnected"):
        raise InvalidInput("bad_topic", "not a client event topic")
    node, clientid, what = parts[2], parts[4], parts[5]
    if not is_valid_id(clientid):
        return None
    event: ClientEvent = decode(payload, ClientEvent, "bad_client_event")
    return Connection(node, clientid, what == "connected", event)


def broker_started(topic: str, payload: bytes) -> BrokerStarted:
    """A broker node's start marker; its node must be the topic's."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[3] != "started":
        raise InvalidInput("bad_topic", "not a broker start topic")
    started: BrokerStarted = decode(payload, BrokerStarted, "bad_broker_event")
    if started.node != parts[2]:
        raise InvalidInput("bad_broker_event", "the marker names another node than its topic")
    return started


def online_after(before: dict[str, Any], change: Connection, live_connections: int) -> bool:
    """Online at once on connect; offline at once only when the last connection ended cleanly (a device leaving on
    purpose sends no will); otherwise still online until the grace period ends (the sweep).

    A clean goodbye: EMQX says "normal"; Mosquitto 2.0 gives plugins no reason, so the SDK says "offline" on its
    status topic just before its DISCONNECT (same device, same worker: it is handled first)."""
    at = change.at
    said_goodbye = before["reported_status"] == "offline" and (before["reported_status_at"] or at) >= (
        before["connected_at"] or at
    )
    clean = not change.connected and (change.event.reason == "normal" or said_goodbye)
    return live_connections > 0 or (before["online"] and not clean)


def status(payload: bytes) -> str | None:
    """A device's status (``online``/``offline``); None for a retained status being cleared (empty payload)."""
    if not payload:
        return None
    body = decode(payload, StatusMessage, "bad_status")
    return body if isinstance(body, str) else body.status


@dataclass(frozen=True)
class StatusChange:
    went_offline: bool
    came_online: bool


def status_change(before: dict[str, Any], value: str) -> StatusChange:
    """An offline status (the will) ends presence at once when no connection is left; an online one starts it even
    when the connect event was never seen (devicesvc deployed after the devices connected)."""
    return StatusChange(
        went_offline=value == "offline" and before["online"] and before["connections"] == 0,
        came_online=value == "online" and not before["online"],
    )


# ------------------------------------------------------------------------------------------------ shadows


def desired_document(row: dict[str, Any]) -> dict[str, Any]:
    """What devices see of a shadow: desired state and its delta from the reported."""
    return {"desired": row["desired"], "delta": shadow.delta(row["desired"], row["reported"])}


def desired_message(version: int, document: dict[str, Any], now_ms: int) -> bytes:
    return msgspec.json.encode(DesiredDocument(version=version, ts=now_ms, **document))


# ------------------------------------------------------------------------------------------------ commands


@dataclass(frozen=True)
class CommandMessage:
    """A command as it goes on the wire, and its size as one MQTT packet."""

    topic: str
    payload: bytes
    response_topic: str
    correlation: bytes
    expiry_s: int
    attempt: int
    size: int

    @property
    def properties(self) -> list[tuple[str, str]]:
        return [(ATTEMPT_PROPERTY, str(self.attempt))]


def command_message(row: dict[str, Any], now: datetime) -> CommandMessage:
    """The MQTT 5 publish of a due command (``row``: its id, tenant, device, name, params, status, attempts, expiry);
    a delivered one is only asked for its answer."""
    attempt = row["attempts"] + 1
    body = CommandRequest(
        request_id=row["command_id"], name=row["name"], params=row["params"], expires_at=ms(row["expires_at"]),
        attempt=attempt, answer_only=row["status"] == "delivered",
    )  # fmt: skip
    topic = command_topic(row["tenant_id"], row["device_id"], row["name"])
    response_topic = command_response_topic(row["tenant_id"], row["device_id"], row["command_id"])
    payload = msgspec.json.encode(body)
    correlation = row["command_id"].encode()
    size = publish_size(
        topic, payload, response_topic, correlation, [(ATTEMPT_PROPERTY, str(attempt))], content_type=CONTENT_TYPE
    )
    # Whole seconds left, rounded down, so the broker drops the message no later than the platform expires the command:
    # a command goes out only with two seconds left at least (DUE_COMMANDS), so this is 1 or more.
    expiry = max(1, int((row["expires_at"] - now).total_seconds()))
    return CommandMessage(topic, payload, response_topic, correlation, expiry, attempt, size)


def too_large(message: CommandMessage, max_packet_bytes: int) -> str | None:
    """Why the broker could never carry this command (it would drop our connection instead), or None."""
    if message.size <= max_packet_bytes:
        return None
    return f"the command is {message.size} bytes as an MQTT packet; the broker carries at most {max_packet_bytes}"


def next_attempt(now: datetime, attempts: int, retry_base_s: float) -> datetime:
    """When an unacknowledged command is sent again: the base delay, doubled with each attempt, jittered."""
    return now + timedelta(seconds=Backoff(base_s=retry_base_s, cap_s=COMMAND_RETRY_CAP_S).delay(attempts + 1))


def command_response(uplink: Uplink, correlation: Any, payload: bytes) -> CommandResponse:
    """A command response, checked against its topic (``InvalidInput`` when it does not fit)."""
    if correlation is not None and bytes(correlation) != uplink.arg.encode():
        raise InvalidInput("correlation_mismatch", "correlation data does not match the request id")
    response: CommandResponse = decode(payload, CommandResponse, "bad_command_response")
    return response
