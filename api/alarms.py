"""Alarms (issue 13): raised and cleared by the rule workers, acknowledged, cleared by hand and commented on by people;
every transition is kept (history) and published on NATS (``v1.{tenant}.d.{device}.alarm``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, get, post
from litestar.params import JSONBody, PathParameter, QueryParameter

from api.auth import CallerPrincipal, Principal
from api.context import tenant_transaction
from api.params import STRICT, Limit
from kestrel.store import alarms
from kestrel_core.topics import ID_PATTERN

AlarmId = Annotated[str, PathParameter(pattern="^a[0-9a-f]{24}$")]
Severity = Literal["critical", "major", "minor", "warning", "info"]
IdFilter = Annotated[str | None, QueryParameter(pattern=f"^{ID_PATTERN}$")]


class Alarm(msgspec.Struct, frozen=True, kw_only=True):
    alarm_id: str
    rule_id: str
    rule_name: str
    device_id: str
    severity: Severity
    status: Literal["active", "cleared"]
    acknowledged: bool
    raised_at: datetime
    #: The values that raised it (or last re-triggered it).
    raised_values: dict[str, Any]
    #: Raises folded into this alarm while it was cleared and not yet acknowledged.
    retriggers: int
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    cleared_at: datetime | None
    #: ``rule`` when its clear condition held, else who cleared it.
    cleared_by: str | None
    cleared_values: dict[str, Any] | None
    version: int
    updated_at: datetime


class AlarmEventRow(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    event: str
    actor: str
    at: datetime
    values: dict[str, Any]


class Comment(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    author: str
    body: str
    created_at: datetime


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    delivery_id: str
    channel_id: str
    event_id: int | None
    status: Literal["pending", "delivered", "dead", "digested"]
    attempts: int
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


class AlarmHistory(msgspec.Struct, frozen=True, kw_only=True):
    events: list[AlarmEventRow]
    comments: list[Comment]
    #: The notification log: one delivery per transition and channel.
    deliveries: list[Delivery]


class CommentCreate(msgspec.Struct, **STRICT):
    body: Annotated[str, msgspec.Meta(min_length=1, max_length=4000, pattern=r"^[^\x00]*$")]


@get("/alarms", operation_id="listAlarms", summary="List alarms, newest first", tags=["alarms"])
async def list_alarms(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    status: Annotated[Literal["active", "cleared"] | None, QueryParameter()] = None,
    severity: Annotated[Severity | None, QueryParameter()] = None,
    acknowledged: Annotated[bool | None, QueryParameter()] = None,
    device_id: IdFilter = None,
    group_id: IdFilter = None,
    rule_id: Annotated[str | None, QueryParameter(pattern="^r[0-9a-f]{24}$")] = None,
    before: Annotated[str | None, QueryParameter(pattern="^a[0-9a-f]{24}$", description="Last alarm id seen")] = None,
    limit: Limit = 100,
) -> list[Alarm]:
    tenant = principal.need("alarms:read")
    async with tenant_transaction(request, tenant) as conn:
        rows = await alarms.page(
            conn, tenant, status=status, severity=severity, acknowledged=acknowledged, device=device_id,
            group=group_id, rule=rule_id, before=before, limit=limit,
        )  # fmt: skip
    return [msgspec.convert(r, Alarm) for r in rows]


@get("/alarms/{alarm_id:str}", operation_id="getAlarm", summary="Get an alarm", tags=["alarms"])
async def get_alarm(request: Request[Any, Any, Any], principal: CallerPrincipal, alarm_id: AlarmId) -> Alarm:
    tenant = principal.need("alarms:read")
    async with tenant_transaction(request, tenant) as conn:
        return msgspec.convert(await alarms.get(conn, tenant, alarm_id), Alarm)


@get("/alarms/{alarm_id:str}/history", operation_id="getAlarmHistory",
     summary="An alarm's transitions, comments and notification deliveries", tags=["alarms"])  # fmt: skip
async def get_alarm_history(
    request: Request[Any, Any, Any], principal: CallerPrincipal, alarm_id: AlarmId
) -> AlarmHistory:
    tenant = principal.need("alarms:read")
    async with tenant_transaction(request, tenant) as conn:
        return msgspec.convert(await alarms.history(conn, tenant, alarm_id), AlarmHistory)


async def _transition(request: Request[Any, Any, Any], principal: Principal, alarm_id: str, clear: bool) -> Alarm:
    tenant = principal.need("alarms:write")
    act = alarms.clear if clear else alarms.acknowledge
    async with tenant_transaction(request, tenant) as conn:
        return msgspec.convert(await act(conn, principal.acting(request), tenant, alarm_id), Alarm)


@post("/alarms/{alarm_id:str}/acknowledge", operation_id="acknowledgeAlarm", summary="Acknowledge an alarm",
      tags=["alarms"], status_code=200)  # fmt: skip
async def acknowledge_alarm(request: Request[Any, Any, Any], principal: CallerPrincipal, alarm_id: AlarmId) -> Alarm:
    return await _transition(request, principal, alarm_id, False)


@post("/alarms/{alarm_id:str}/clear", operation_id="clearAlarm", summary="Clear an alarm by hand", tags=["alarms"],
      status_code=200)  # fmt: skip
async def clear_alarm(request: Request[Any, Any, Any], principal: CallerPrincipal, alarm_id: AlarmId) -> Alarm:
    return await _transition(request, principal, alarm_id, True)


@post("/alarms/{alarm_id:str}/comments", operation_id="commentAlarm", summary="Comment on an alarm", tags=["alarms"],
      status_code=201)  # fmt: skip
async def comment_alarm(
    request: Request[Any, Any, Any], principal: CallerPrincipal, alarm_id: AlarmId, data: JSONBody[CommentCreate]
) -> Comment:
    tenant = principal.need("alarms:write")
    async with tenant_transaction(request, tenant) as conn:
        return msgspec.convert(
            await alarms.comment(conn, principal.acting(request), tenant, alarm_id, data.body), Comment
        )


ROUTES = [list_alarms, get_alarm, get_alarm_history, acknowledge_alarm, clear_alarm, comment_alarm]
