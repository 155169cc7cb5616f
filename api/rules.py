"""Alarm rules (issue 13, ADR-0018): the rule document is the body (``kestrel_core.rules.model.Rule``, the same a
``kestrel rule`` file holds), versioned (ETag ``"v<version>"``, every version kept), enabled and disabled, and tried
on stored telemetry by the dry run, which has no side effect."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, delete, get, post, put
from litestar.params import JSONBody, PathParameter, QueryParameter

from api.auth import CallerPrincipal, Principal
from api.context import tenant_transaction
from api.params import STRICT, IdField
from api.preconditions import IfMatch, etag, expected_version
from kestrel.store import dryrun, rules
from kestrel.store.dryrun import DeviceOutcome
from kestrel_core.errors import InvalidInput
from kestrel_core.rules.evaluate import Raised
from kestrel_core.rules.model import Rule, check_bounds

RuleId = Annotated[str, PathParameter(pattern="^r[0-9a-f]{24}$")]


class StoredRule(msgspec.Struct, frozen=True, kw_only=True):
    rule_id: str
    name: str
    enabled: bool
    version: int
    definition: Rule
    created_by: str
    created_at: datetime
    updated_at: datetime


class RuleVersion(msgspec.Struct, frozen=True, kw_only=True):
    version: int
    enabled: bool
    definition: Rule
    changed_by: str
    changed_at: datetime


class DryRunRequest(msgspec.Struct, **STRICT):
    rule: Rule
    #: The start of the range of stored telemetry to evaluate (RFC 3339, with its offset).
    start: Annotated[datetime, msgspec.Meta(tz=True, extra_json_schema={"format": "date-time"})]
    #: Its length (at most 31 days).
    duration_s: Annotated[int, msgspec.Meta(ge=1, le=dryrun.MAX_RANGE_S)]
    #: Only these devices (default: every device the rule's scope selects).
    devices: Annotated[list[IdField], msgspec.Meta(max_length=1000)] | None = None


class WouldDo(msgspec.Struct, frozen=True, kw_only=True):
    """What a transition would have done live: its actions and notifications (none were done)."""

    device_id: str
    at_ms: int
    transition: str
    actions: list[str]
    notify: list[str]


class DryRunResult(msgspec.Struct, frozen=True, kw_only=True):
    readings: int
    devices: list[DeviceOutcome]
    effects: list[WouldDo]


def _stored(row: dict[str, Any]) -> StoredRule:
    return msgspec.convert(row, StoredRule)


def _answer(row: dict[str, Any], status_code: int = 200) -> Response[StoredRule]:
    return Response(_stored(row), status_code=status_code, headers={"ETag": etag(row["version"])})


@get("/rules", operation_id="listRules", summary="List alarm rules", tags=["rules"])
async def list_rules(request: Request[Any, Any, Any], principal: CallerPrincipal) -> list[StoredRule]:
    tenant = principal.need("rules:read")
    async with tenant_transaction(request, tenant) as conn:
        return [_stored(r) for r in await rules.list_all(conn, tenant)]


@post("/rules", operation_id="createRule", summary="Create an alarm rule", tags=["rules"], status_code=201)
async def create_rule(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    data: JSONBody[Rule],
    enabled: Annotated[bool, QueryParameter(description="Start enabled (default) or disabled")] = True,
) -> Response[StoredRule]:
    tenant = principal.need("rules:write")
    check_bounds(data)
    async with tenant_transaction(request, tenant) as conn:
        row = await rules.create(conn, principal.acting(request), tenant, data, enabled=enabled)
    return _answer(row, 201)


@get("/rules/{rule_id:str}", operation_id="getRule", summary="Get an alarm rule", tags=["rules"])
async def get_rule(
    request: Request[Any, Any, Any], principal: CallerPrincipal, rule_id: RuleId
) -> Response[StoredRule]:
    tenant = principal.need("rules:read")
    async with tenant_transaction(request, tenant) as conn:
        return _answer(await rules.get(conn, tenant, rule_id))


@put("/rules/{rule_id:str}", operation_id="replaceRule", summary="Replace a rule's definition (a new version)",
     tags=["rules"])  # fmt: skip
async def replace_rule(
    request: Request[Any, Any, Any],
    principal: CallerPrincipal,
    rule_id: RuleId,
    data: JSONBody[Rule],
    if_match: IfMatch = None,
) -> Response[StoredRule]:
    tenant = principal.need("rules:write")
    check_bounds(data)
    version = expected_version(if_match)
    async with tenant_transaction(request, tenant) as conn:
        row = await rules.update(conn, principal.acting(request), tenant, rule_id, rule=data, if_match=version)
    return _answer(row)


async def _switch(
    request: Request[Any, Any, Any], principal: Principal, rule_id: str, on: bool
) -> Response[StoredRule]:
    tenant = principal.need("rules:write")
    async with tenant_transaction(request, tenant) as conn:
        return _answer(await rules.update(conn, principal.acting(request), tenant, rule_id, enabled=on))


@post(
    "/rules/{rule_id:str}/enable", operation_id="enableRule", summary="Enable a rule", tags=["rules"], status_code=200
)
async def enable_rule(
    request: Request[Any, Any, Any], principal: CallerPrincipal, rule_id: RuleId
) -> Response[StoredRule]:
    return await _switch(request, principal, rule_id, True)


@post("/rules/{rule_id:str}/disable", operation_id="disableRule", summary="Disable a rule (its alarms stay)",
      tags=["rules"], status_code=200)  # fmt: skip
async def disable_rule(
    request: Request[Any, Any, Any], principal: CallerPrincipal, rule_id: RuleId
) -> Response[StoredRule]:
    return await _switch(request, principal, rule_id, False)


@delete("/rules/{rule_id:str}", operation_id="deleteRule", summary="Delete a rule (its alarms stay)", tags=["rules"],
        status_code=204)  # fmt: skip
async def delete_rule(request: Request[Any, Any, Any], principal: CallerPrincipal, rule_id: RuleId) -> None:
    tenant = principal.need("rules:write")
    async with tenant_transaction(request, tenant) as conn:
        await rules.delete(conn, principal.acting(request), tenant, rule_id)


@get("/rules/{rule_id:str}/versions", operation_id="listRuleVersions", summary="A rule's versions, newest first",
     tags=["rules"])  # fmt: skip
async def list_rule_versions(
    request: Request[Any, Any, Any], principal: CallerPrincipal, rule_id: RuleId
) -> list[RuleVersion]:
    tenant = principal.need("rules:read")
    async with tenant_transaction(request, tenant) as conn:
        return [msgspec.convert(r, RuleVersion) for r in await rules.versions(conn, tenant, rule_id)]


@post("/rules/dry-run", operation_id="dryRunRule", summary="Evaluate a rule on stored telemetry, without effects",
      tags=["rules"], status_code=200)  # fmt: skip
async def dry_run_rule(
    request: Request[Any, Any, Any], principal: CallerPrincipal, data: JSONBody[DryRunRequest]
) -> DryRunResult:
    tenant = principal.need("rules:read")
    principal.need("telemetry:read")
    rule = check_bounds(data.rule)
    async with tenant_transaction(request, tenant) as conn:  # the scope resolves inside the tenant: others see nothing
        devices = await dryrun.scoped_devices(conn, tenant, rule.scope)
        if data.devices is not None:
            devices = [d for d in data.devices if devices is None or d in devices]
        try:
            end = data.start + timedelta(seconds=data.duration_s)
        except OverflowError as exc:
            raise InvalidInput("bad_range", "the range ends after the year 9999") from exc
        result = await dryrun.dry_run(conn, tenant, rule, start=data.start, end=end, devices=devices)
    effects = [
        WouldDo(
            device_id=outcome.device_id, at_ms=t.at_ms, transition="raised" if isinstance(t, Raised) else "cleared",
            actions=[type(a).__name__ for a in (rule.on_raise if isinstance(t, Raised) else rule.on_clear)],
            notify=list(rule.notify),
        )
        for outcome in result.devices
        for t in outcome.transitions
    ]  # fmt: skip
    return DryRunResult(readings=result.readings, devices=result.devices, effects=effects)


ROUTES = [
    list_rules, create_rule, dry_run_rule, get_rule, replace_rule, enable_rule, disable_rule, delete_rule,
    list_rule_versions,
]  # fmt: skip
