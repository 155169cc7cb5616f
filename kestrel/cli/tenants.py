"""``kestrel tenant|user|token|service``: tenants, their users and API tokens, and backend principals."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer
from psycopg import AsyncConnection

from kestrel.cli.env import emit, store
from kestrel.store import credentials, principals, tenants, users
from kestrel.store.session import operator
from kestrel_core.topics import ID_PATTERN

tenant_app = typer.Typer(no_args_is_help=True, help="Tenants.")
user_app = typer.Typer(no_args_is_help=True, help="Users of a tenant.")
token_app = typer.Typer(no_args_is_help=True, help="API tokens (tenant-scoped).")
service_app = typer.Typer(no_args_is_help=True, help="Backend principals (services that connect to the broker).")
JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output")]


@tenant_app.command("create")
def tenant_create(
    tenant: Annotated[str, typer.Argument(help=f"Tenant id, {ID_PATTERN}")],
    name: Annotated[str, typer.Option(help="Display name")] = "",
    as_json: JsonFlag = False,
) -> None:
    """Create a tenant."""
    store(lambda c: tenants.create(c, operator(), tenant, name=name))
    emit({"tenant": tenant, "name": name}, as_json, f"created tenant {tenant}")


@tenant_app.command("list")
def tenant_list(as_json: JsonFlag = False) -> None:
    """List tenants with their status and device counts."""

    async def work(conn: AsyncConnection[Any]) -> list[dict[str, Any]]:
        counts = await tenants.device_counts(conn)
        return [r | {"devices": counts.get(r["tenant_id"], 0)} for r in await tenants.list_all(conn)]

    rows = store(work)
    if as_json:
        typer.echo(json.dumps(rows, default=str))
        return
    for r in rows:
        typer.echo(f"{r['tenant_id']:<24} {r['status']:<10} {r['devices']:>7} device(s)  {r['name']}")


@user_app.command("create")
def user_create(
    email: Annotated[str, typer.Argument(help="The user's e-mail (unique within the tenant)")],
    tenant: Annotated[str, typer.Option(help="Tenant")],
    role: Annotated[str, typer.Option(help="admin, operator or viewer")] = "viewer",
    as_json: JsonFlag = False,
) -> None:
    """Create a user of a tenant."""
    user = store(lambda c: users.create(c, operator(), tenant, email, role), tenant=tenant)
    emit({"user_id": user["user_id"], "tenant": tenant, "role": role}, as_json, user["user_id"])


@token_app.command("create")
def token_create(
    tenant: Annotated[str, typer.Option(help="The tenant the token is bound to")],
    scope: Annotated[list[str], typer.Option(help="A scope, e.g. devices:read (repeatable)")],
    name: Annotated[str, typer.Option(help="What the token is for")] = "",
    days: Annotated[int, typer.Option(min=1, max=365, help="Lifetime")] = 90,
    user: Annotated[str | None, typer.Option(help="Bind it to a user (it never exceeds their role)")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create an API token; it is printed once and stored only as a digest."""
    expires_at = datetime.now(UTC) + timedelta(days=days)
    token_id, token = store(
        lambda c: credentials.create_token(c, operator(), tenant, scope, expires_at=expires_at, name=name, user=user),
        tenant=tenant,
    )
    emit({"token_id": token_id, "token": token, "scopes": sorted(set(scope))}, as_json, token)


@service_app.command("create")
def service_create(
    name: Annotated[str, typer.Argument(help="Principal name: the MQTT username; client ids are svc:NAME:INSTANCE")],
    role: Annotated[
        str,
        typer.Option(help="ingest (telemetry), control (kicks), devices (devicesvc) or provisioning (the provisioner)"),
    ],
    rotate: Annotated[bool, typer.Option(help="Issue a new secret for an existing principal")] = False,
) -> None:
    """Create a backend principal for the broker; prints its secret once (only a digest is stored)."""
    typer.echo(store(lambda c: principals.create(c, operator(), name, role, rotate=rotate)))


@service_app.command("revoke")
def service_revoke(name: Annotated[str, typer.Argument(help="Principal name")]) -> None:
    """Revoke a backend principal: refused at its next connect, its live sessions disconnected."""
    store(lambda c: principals.revoke(c, operator(), name))
    typer.echo(f"revoked service principal {name}")
