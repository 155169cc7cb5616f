"""``kestrel command`` and ``kestrel claim``: commands to devices and just-in-time provisioning claims."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import msgspec
import typer
from psycopg import AsyncConnection

from kestrel.cli.env import json_object, on_device, store
from kestrel.store import claims, commands
from kestrel.store.session import operator
from kestrel_core.errors import InvalidInput
from kestrel_core.topics import require_id

command_app = typer.Typer(no_args_is_help=True, help="Commands to devices.")
claim_app = typer.Typer(no_args_is_help=True, help="Just-in-time provisioning claims.")
POLL_S = 0.2


def _detail(command_id: str) -> dict[str, Any]:
    async def work(conn: AsyncConnection[Any]) -> dict[str, Any]:
        command, events = await commands.detail(conn, await commands.tenant_of(conn, command_id), command_id)
        detail: dict[str, Any] = msgspec.to_builtins(command)
        return detail | {"events": events}

    return store(work)


@command_app.command("send")
def command_send(
    device: Annotated[str, typer.Argument(help="Device id")],
    name: Annotated[str, typer.Argument(help="Command name")],
    params: Annotated[str, typer.Option(help="Parameters (a JSON object)")] = "{}",
    timeout_s: Annotated[int, typer.Option("--timeout", help="Seconds the device may take once sent")] = 30,
    expires_in_s: Annotated[int, typer.Option("--expires-in", help="Seconds it may wait for an offline device")] = 3600,
    wait: Annotated[bool, typer.Option(help="Wait for the end and print it")] = False,
) -> None:
    """Send a command to a device (it waits for an offline device until it expires)."""
    require_id("command", name)
    arguments = json_object(params, "--params")
    if not 1 <= timeout_s <= 86400 or not 1 <= expires_in_s <= 7 * 86400:
        raise InvalidInput("bad_command", "--timeout is 1 to 86400 s and --expires-in 1 s to 7 days")
    command = on_device(
        device,
        lambda c, tenant: commands.send(
            c, operator(), tenant, device, name, arguments, timeout_s=timeout_s, expires_in_s=expires_in_s,
            max_attempts=5,
        ),
    )  # fmt: skip
    if not wait:
        typer.echo(command.command_id)
        return
    deadline = time.monotonic() + timeout_s + expires_in_s + 5
    while (detail := _detail(command.command_id))["status"] not in commands.TERMINAL and time.monotonic() < deadline:
        time.sleep(POLL_S)
    typer.echo(json.dumps(detail, default=str, indent=2))
    if detail["status"] != "succeeded":
        raise typer.Exit(1)


@command_app.command("show")
def command_show(command_id: Annotated[str, typer.Argument(help="Command id")]) -> None:
    """A command and every state it went through."""
    typer.echo(json.dumps(_detail(command_id), default=str, indent=2))


@claim_app.command("create")
def claim_create(
    tenant: Annotated[str, typer.Option(help="Tenant id")],
    max_uses: Annotated[int, typer.Option(help="How many devices may provision with it")] = 1,
    expires_in_s: Annotated[int, typer.Option("--expires-in", help="Seconds until it expires")] = 86400,
    group: Annotated[str | None, typer.Option(help="Put provisioned devices in this group")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="Tag for provisioned devices (repeatable)")] = None,
) -> None:
    """A just-in-time provisioning claim; its token is printed once."""
    token, _ = store(
        lambda c: claims.create(
            c, operator(), tenant, max_uses=max_uses, expires_in_s=expires_in_s, group=group, tags=tag or []
        ),
        tenant=tenant,
    )
    typer.echo(token)
