"""The real-time streams' contract (issue 14, ADR-0021), declared once for the API's SSE, WebSocket and GraphQL
endpoints, the console and clients: what a client may ask for (``Filter``), what it receives (``LiveEvent``) and where
it is (``Cursor``).

Events come from three JetStream streams: readings (``TELEMETRY``), twin events (``DEVICE_EVENTS``: presence,
shadow, command, lifecycle) and alarm transitions (``ALARM_EVENTS``). A cursor is the last sequence delivered of each,
written ``t<seq>.e<seq>.a<seq>``: a client that reconnects with it gets exactly what it missed, from the streams
themselves, within their retention.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, Literal

import msgspec

from kestrel_core.errors import Forbidden, InvalidInput
from kestrel_core.topics import ID_PATTERN

Kind = Literal["telemetry", "presence", "shadow", "command", "lifecycle", "alarm"]
KINDS: Final[tuple[Kind, ...]] = ("telemetry", "presence", "shadow", "command", "lifecycle", "alarm")
#: The scope a token needs to receive each kind.
KIND_SCOPES: Final[dict[str, str]] = {
    "telemetry": "telemetry:read",
    "presence": "devices:read",
    "shadow": "devices:read",
    "command": "devices:read",
    "lifecycle": "devices:read",
    "alarm": "alarms:read",
}
#: The JetStream stream of each family, and the family of each kind.
FAMILIES: Final[dict[str, str]] = {"t": "TELEMETRY", "e": "DEVICE_EVENTS", "a": "ALARM_EVENTS"}
FAMILY_OF: Final[dict[str, str]] = {"telemetry": "t", "alarm": "a"} | dict.fromkeys(
    ("presence", "shadow", "command", "lifecycle"), "e"
)
Id = Annotated[str, msgspec.Meta(pattern=f"^{ID_PATTERN}$")]
Tag = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:=/-]{1,64}$")]
MetricName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}$")]
_CURSOR = re.compile(r"\At(\d{1,19})\.e(\d{1,19})\.a(\d{1,19})\Z")


class Filter(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """What a client receives: the kinds it names (empty: every kind its token may see), of the devices it names or
    that are in the groups or carry every tag it names (none named: every device of its tenant); readings keep only
    the metrics it names (none: all)."""

    kinds: Annotated[list[Kind], msgspec.Meta(max_length=6)] = msgspec.field(default_factory=list)
    devices: Annotated[list[Id], msgspec.Meta(max_length=1000)] = msgspec.field(default_factory=list)
    groups: Annotated[list[Id], msgspec.Meta(max_length=32)] = msgspec.field(default_factory=list)
    tags: Annotated[list[Tag], msgspec.Meta(max_length=16)] = msgspec.field(default_factory=list)
    metrics: Annotated[list[MetricName], msgspec.Meta(max_length=64)] = msgspec.field(default_factory=list)

    @property
    def selects_devices(self) -> bool:
        return bool(self.devices or self.groups or self.tags)


def parse_filter(document: dict[str, Any] | None) -> Filter:
    try:
        return msgspec.convert(document or {}, Filter)
    except msgspec.ValidationError as exc:
        raise InvalidInput("bad_filter", str(exc)) from exc


def granted_kinds(wanted: Filter, scopes: frozenset[str]) -> frozenset[str]:
    """The kinds a client receives; ``Forbidden`` naming the scope when it asks for a kind its token may not see."""
    for kind in wanted.kinds:
        if KIND_SCOPES[kind] not in scopes:
            raise Forbidden(f"receiving {kind} events needs the {KIND_SCOPES[kind]} scope")
    kinds = wanted.kinds or [k for k in KINDS if KIND_SCOPES[k] in scopes]
    if not kinds:
        raise Forbidden("this token may receive no kind of event (telemetry:read, devices:read or alarms:read)")
    return frozenset(kinds)


class Cursor(msgspec.Struct, frozen=True):
    """The last sequence delivered of each stream (0: nothing yet)."""

    t: int = 0
    e: int = 0
    a: int = 0

    def __str__(self) -> str:
        return f"t{self.t}.e{self.e}.a{self.a}"

    def at(self, family: str) -> int:
        return int(getattr(self, family))

    def moved(self, family: str, seq: int) -> Cursor:
        return msgspec.structs.replace(self, **{family: seq})


def parse_cursor(text: str) -> Cursor:
    match = _CURSOR.match(text.strip())
    if match is None:
        raise InvalidInput("bad_cursor", "a cursor looks like t<seq>.e<seq>.a<seq>, as the stream sent it")
    return Cursor(int(match[1]), int(match[2]), int(match[3]))


class LiveEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One event as every stream delivers it. ``data``: for telemetry ``{"stream", "readings": [{"ts", "seq",
    "metrics"}]}``; for the others the event as published (``kestrel_core.messages.twin``, ``.alarms``)."""

    kind: Kind
    device: str
    cursor: str
    data: Any
