"""``kestrel device``: register, list, suspend, resume, decommission devices; their JWT keys, presence and shadows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer
from psycopg import AsyncConnection

from kestrel.cli.env import emit, json_object, on_device, store
from kestrel.store import devices, jwt_keys, presence, shadows, tenants
from kestrel.store.session import operator
from kestrel_core.errors import InvalidInput
from kestrel_core.topics import ID_PATTERN, require_id

device_app = typer.Typer(no_args_is_help=True, help="Devices.")
JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output")]
DeviceArg = Annotated[str, typer.Argument(help="Device id")]


@device_app.command("list")
def device_list(
    tenant: Annotated[str, typer.Option(help="Tenant")],
    status: Annotated[str | None, typer.Option(help="Only this lifecycle state")] = None,
    as_json: JsonFlag = False,
) -> None:
    """List a tenant's devices."""
    require_id("tenant", tenant)

    async def work(conn: AsyncConnection[Any]) -> list[dict[str, Any]]:

        await tenants.require(conn, tenant)
        return await devices.page(conn, tenant, status=status, limit=10_000_000)

    rows = store(work, tenant=tenant)
    if as_json:
        typer.echo(
            json.dumps(
                [{k: r[k] for k in ("device_id", "name", "status", "tags", "created_at")} for r in rows], default=str
            )
        )
        return
    for r in rows:
        typer.echo(f"{r['device_id']:<32} {r['status']:<14} {','.join(r['tags'])}")


@device_app.command("import")
def device_import(
    file: Annotated[Path, typer.Argument(help="CSV with header device_id[,name][,tags][,groups] (split by ;)")],
    tenant: Annotated[str, typer.Option(help="Owning tenant")],
    jwt_keys_dir: Annotated[
        Path | None,
        typer.Option("--jwt-keys", help="Directory of <device_id>.pem public keys: each becomes that device's JWT key"),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Register many devices from CSV, all or none, with a progress bar on stderr; for certificates, then run
    `kestrel pki sign-batch` on their CSRs."""
    from rich.progress import Progress  # noqa: PLC0415

    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput("bad_file", f"cannot read {file} as UTF-8") from exc
    rows = devices.parse_csv(text)
    keys: dict[str, bytes] = {}
    if jwt_keys_dir is not None:
        try:
            keys = {
                r.device_id: (jwt_keys_dir / f"{r.device_id}.pem").read_bytes()
                for r in rows
                if (jwt_keys_dir / f"{r.device_id}.pem").is_file()
            }
        except OSError as exc:
            raise InvalidInput("bad_file", f"cannot read the keys in {jwt_keys_dir}: {exc}") from exc
    with Progress(transient=as_json) as progress:
        task = progress.add_task("importing", total=len(rows))
        created = store(
            lambda c: devices.create(
                c, operator(), tenant, rows, jwt_public_keys=keys, progress=lambda n: progress.advance(task, n),
                bulk=True,
            ),
            tenant=tenant,
        )  # fmt: skip
    emit({"tenant": tenant, "created": len(created)}, as_json, f"imported {len(created)} device(s)")


@device_app.command("create")
def device_create(
    ids: Annotated[list[str], typer.Argument(help=f"Device ids, {ID_PATTERN}, globally unique")],
    tenant: Annotated[str, typer.Option(help="Owning tenant")],
    as_json: JsonFlag = False,
) -> None:
    """Register devices under a tenant."""
    new = [devices.NewDevice(d) for d in ids]
    created = store(lambda c: devices.create(c, operator(), tenant, new), tenant=tenant)
    emit(
        {"tenant": tenant, "created": len(created), "devices": ids},
        as_json,
        f"registered {len(created)} device(s) in tenant {tenant}",
    )


@device_app.command("jwt-key")
def device_jwt_key(
    key_file: Annotated[Path, typer.Argument(help="PEM public key: Ed25519 (EdDSA) or EC P-256 (ES256)")],
    tenant: Annotated[str, typer.Option(help="Tenant whose devices this key may authenticate (the JWT's iss)")],
    device: Annotated[str | None, typer.Option(help="Restrict the key to one device")] = None,
) -> None:
    """Register a public key that verifies device JWTs; prints its kid (put it in the JWT header)."""
    try:
        data = key_file.read_bytes()
    except OSError as exc:
        raise InvalidInput("bad_file", f"cannot read {key_file}: {exc.strerror}") from exc
    typer.echo(store(lambda c: jwt_keys.add(c, operator(), tenant, data, device), tenant=tenant))


@device_app.command("jwt-key-revoke")
def device_jwt_key_revoke(kid: Annotated[str, typer.Argument(help="The key's kid")]) -> None:
    """Revoke a JWT key: tokens signed with it are refused and sessions opened with it are disconnected."""
    store(lambda c: jwt_keys.revoke(c, operator(), kid))
    typer.echo(f"revoked JWT key {kid}")


def _set_status(device: str, status: str) -> None:
    before, _ = on_device(device, lambda c, tenant: devices.update(c, operator(), tenant, device, status=status))
    typer.echo(f"device {device}: {before['status']} -> {status}")


@device_app.command("suspend")
def device_suspend(device: DeviceArg) -> None:
    """Suspend a device: its live session is disconnected and it cannot connect until resumed."""
    _set_status(device, "suspended")


@device_app.command("resume")
def device_resume(device: DeviceArg) -> None:
    """Re-activate a suspended device."""
    _set_status(device, "active")


@device_app.command("decommission")
def device_decommission(device: DeviceArg) -> None:
    """Retire a device for good: credentials revoked, session ended, open commands cancelled, history kept."""
    _, done = on_device(device, lambda c, tenant: devices.decommission(c, operator(), tenant, device))
    typer.echo(f"{device}: decommissioned" if done else f"{device}: already decommissioned")


@device_app.command("presence")
def device_presence(
    tenant: Annotated[str, typer.Option(help="Tenant id")],
    online: Annotated[bool | None, typer.Option("--online/--offline", help="Only online or offline devices")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Who is online: presence and last-seen of a tenant's devices."""
    rows = store(lambda c: presence.roster(c, tenant, online=online), tenant=tenant)
    if as_json:
        typer.echo(json.dumps(rows, default=str))
        return
    for r in rows:
        state = "online " if r["online"] else "offline"
        typer.echo(f"{r['device_id']:<40} {state}  last seen {r['last_seen'] or '-'}")


@device_app.command("shadow")
def device_shadow(
    device: DeviceArg,
    set_desired: Annotated[str | None, typer.Option("--set", help="Merge patch of desired state (JSON)")] = None,
    name: Annotated[str, typer.Option(help="Named shadow (default: the classic one)")] = "",
) -> None:
    """Show a device's shadow (desired, reported, delta), or change its desired state with --set."""
    if name:
        require_id("shadow", name)
    patch = json_object(set_desired, "--set") if set_desired is not None else None

    async def work(conn: AsyncConnection[Any], tenant: str) -> shadows.Shadow:
        if patch is None:
            return await shadows.get(conn, tenant, device, name)
        return await shadows.set_desired(conn, operator(), tenant, device, name, patch)

    typer.echo(json.dumps(msgspec.to_builtins(on_device(device, work)), default=str, indent=2))
