"""``kestrel rule``, ``kestrel alarm`` and ``kestrel channel``: alarm rules from a YAML or JSON file (the same
document the API takes), their dry run on stored telemetry, alarms and notification channels; audited as
``cli:<user>`` through the same store functions as the API."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer
import yaml

from kestrel.cli.env import emit, json_object, store
from kestrel.store import alarms, channels, dryrun, rules
from kestrel.store.session import operator
from kestrel_core.errors import InvalidInput
from kestrel_core.rules.channels import ChannelConfig
from kestrel_core.rules.model import Rule, parse_rule

rule_app = typer.Typer(no_args_is_help=True, help="Alarm rules (YAML or JSON files).")
alarm_app = typer.Typer(no_args_is_help=True, help="Alarms raised by the rules.")
channel_app = typer.Typer(no_args_is_help=True, help="Notification channels (email, webhook, chat).")
Tenant = Annotated[str, typer.Option(help="Tenant id")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON")]


def read_rule(path: Path) -> Rule:
    """A rule from a YAML or JSON file; one clear refusal naming the field otherwise."""
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidInput("bad_rule_file", f"{path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(document, dict):
        raise InvalidInput("bad_rule_file", f"{path}: a rule is a mapping (name, alarm, ...)")
    return parse_rule(document)


def _line(row: dict[str, Any]) -> str:
    return f"{row['rule_id']}  v{row['version']}  {'enabled ' if row['enabled'] else 'disabled'}  {row['name']}"


@rule_app.command("create")
def rule_create(
    file: Annotated[Path, typer.Argument(help="The rule (YAML or JSON)")],
    tenant: Tenant,
    disabled: Annotated[bool, typer.Option(help="Create it disabled")] = False,
) -> None:
    """Create a rule; prints its id."""
    rule = read_rule(file)
    row = store(lambda c: rules.create(c, operator(), tenant, rule, enabled=not disabled), tenant=tenant)
    typer.echo(row["rule_id"])


@rule_app.command("update")
def rule_update(rule_id: Annotated[str, typer.Argument(help="Rule id")], file: Annotated[Path, typer.Argument()],
                tenant: Tenant) -> None:  # fmt: skip
    """Replace a rule's definition (a new version)."""
    rule = read_rule(file)
    row = store(lambda c: rules.update(c, operator(), tenant, rule_id, rule=rule), tenant=tenant)
    typer.echo(_line(row))


@rule_app.command("enable")
def rule_enable(rule_id: Annotated[str, typer.Argument(help="Rule id")], tenant: Tenant) -> None:
    """Enable a rule."""
    typer.echo(_line(store(lambda c: rules.update(c, operator(), tenant, rule_id, enabled=True), tenant=tenant)))


@rule_app.command("disable")
def rule_disable(rule_id: Annotated[str, typer.Argument(help="Rule id")], tenant: Tenant) -> None:
    """Disable a rule (its alarms stay)."""
    typer.echo(_line(store(lambda c: rules.update(c, operator(), tenant, rule_id, enabled=False), tenant=tenant)))


@rule_app.command("delete")
def rule_delete(rule_id: Annotated[str, typer.Argument(help="Rule id")], tenant: Tenant) -> None:
    """Delete a rule (its alarms stay)."""
    store(lambda c: rules.delete(c, operator(), tenant, rule_id), tenant=tenant)


@rule_app.command("list")
def rule_list(tenant: Tenant, as_json: AsJson = False) -> None:
    """The tenant's rules."""
    found = store(lambda c: rules.list_all(c, tenant), tenant=tenant)
    emit(found, as_json, "\n".join(_line(r) for r in found))


def _when(text: str | None, default: datetime, what: str) -> datetime:
    if text is None:
        return default
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidInput("bad_time", f"{what} must be an ISO 8601 time, e.g. 2026-11-29T10:00:00Z") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@rule_app.command("test")
def rule_test(
    file: Annotated[Path, typer.Argument(help="The rule (YAML or JSON)")],
    tenant: Tenant,
    since: Annotated[str | None, typer.Option("--from", help="Start (ISO 8601) [24 hours ago]")] = None,
    until: Annotated[str | None, typer.Option("--to", help="End (ISO 8601) [now]")] = None,
    device: Annotated[list[str] | None, typer.Option(help="Only this device (repeatable)")] = None,
) -> None:
    """The dry run: what the rule would have raised and cleared on stored telemetry (nothing is changed)."""
    rule = read_rule(file)
    end = _when(until, datetime.now(UTC), "--to")
    start = _when(since, end - timedelta(hours=24), "--from")

    async def work(conn: Any) -> Any:
        await rules.check_targets(conn, tenant, rule)
        scoped = await dryrun.scoped_devices(conn, tenant, rule.scope)
        devices = [d for d in device if scoped is None or d in scoped] if device else scoped
        return await dryrun.dry_run(conn, tenant, rule, start=start, end=end, devices=devices)

    result = store(work, tenant=tenant)
    typer.echo(json.dumps(msgspec.to_builtins(result), indent=2))


@alarm_app.command("list")
def alarm_list(
    tenant: Tenant,
    status: Annotated[str | None, typer.Option(help="active or cleared")] = None,
    severity: Annotated[str | None, typer.Option(help="critical, major, minor, warning or info")] = None,
    device: Annotated[str | None, typer.Option(help="Device id")] = None,
    as_json: AsJson = False,
) -> None:
    """The tenant's alarms, newest first."""
    found = store(lambda c: alarms.page(c, tenant, status=status, severity=severity, device=device), tenant=tenant)
    lines = [f"{a['alarm_id']}  {a['severity']:8}  {a['status']:7}  {'acked' if a['acknowledged'] else 'unacked'}"
             f"  {a['device_id']}  {a['rule_name']}" for a in found]  # fmt: skip
    emit(found, as_json, "\n".join(lines))


@alarm_app.command("ack")
def alarm_ack(alarm_id: Annotated[str, typer.Argument(help="Alarm id")], tenant: Tenant) -> None:
    """Acknowledge an alarm."""
    store(lambda c: alarms.acknowledge(c, operator(), tenant, alarm_id), tenant=tenant)


@alarm_app.command("clear")
def alarm_clear(alarm_id: Annotated[str, typer.Argument(help="Alarm id")], tenant: Tenant) -> None:
    """Clear an alarm by hand."""
    store(lambda c: alarms.clear(c, operator(), tenant, alarm_id), tenant=tenant)


@alarm_app.command("comment")
def alarm_comment(alarm_id: Annotated[str, typer.Argument(help="Alarm id")], text: Annotated[str, typer.Argument()],
                  tenant: Tenant) -> None:  # fmt: skip
    """Comment on an alarm."""
    store(lambda c: alarms.comment(c, operator(), tenant, alarm_id, text), tenant=tenant)


@channel_app.command("create")
def channel_create(
    channel_id: Annotated[str, typer.Argument(help="Channel id")],
    config: Annotated[str, typer.Argument(help='JSON, e.g. {"kind": "webhook", "url": "https://..."}')],
    tenant: Tenant,
    per_minute: Annotated[int, typer.Option(help="Notifications per minute before a digest")] = 30,
) -> None:
    """Create a channel; a webhook's signing secret is printed once."""
    try:
        parsed: ChannelConfig = msgspec.convert(json_object(config, "the channel"), ChannelConfig)
    except msgspec.ValidationError as exc:
        raise InvalidInput("bad_channel", str(exc)) from exc
    _, secret = store(lambda c: channels.create(c, operator(), tenant, channel_id, parsed, per_minute=per_minute),
                      tenant=tenant)  # fmt: skip
    typer.echo(secret or channel_id)
