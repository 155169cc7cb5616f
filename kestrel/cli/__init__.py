"""The ``kestrel`` command: operator and developer entry point.

Errors end with one clear line on stderr and a non-zero exit: 2 for bad input, 1 otherwise.
Connection settings come from the environment (``KESTREL_DATABASE_URL``), falling back to the
``kestrel.env`` that ``kestrel run`` writes, so commands work right after ``make run``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from kestrel_core.errors import Conflict, InvalidInput, KestrelError, Unavailable
from kestrel_core.topics import ID_PATTERN

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Kestrel IoT platform.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
tenant_app = typer.Typer(no_args_is_help=True, help="Tenants.")
device_app = typer.Typer(no_args_is_help=True, help="Devices.")
app.add_typer(db_app, name="db")
app.add_typer(tenant_app, name="tenant")
app.add_typer(device_app, name="device")
user_app = typer.Typer(no_args_is_help=True, help="Users of a tenant.")
app.add_typer(user_app, name="user")
token_app = typer.Typer(no_args_is_help=True, help="API tokens (tenant-scoped).")
app.add_typer(token_app, name="token")
service_app = typer.Typer(no_args_is_help=True, help="Backend principals (services that connect to the broker).")
command_app = typer.Typer(no_args_is_help=True, help="Commands to devices.")
app.add_typer(command_app, name="command")
claim_app = typer.Typer(no_args_is_help=True, help="Just-in-time provisioning claims.")
app.add_typer(claim_app, name="claim")
app.add_typer(service_app, name="service")


@app.callback()
def options(
    state: Annotated[
        Path | None,
        typer.Option(
            "--state-dir",
            envvar="KESTREL_STATE_DIR",
            help="The embedded default's state directory: where commands find its database and ports [.kestrel]",
        ),
    ] = None,
) -> None:
    """Kestrel IoT platform."""
    if state is not None:
        os.environ["KESTREL_STATE_DIR"] = str(state)  # read by every command below, and by `kestrel run`


def state_dir() -> Path:
    """``--state-dir`` / ``KESTREL_STATE_DIR`` (read when a command runs, not at import), default ``.kestrel``."""
    return Path(os.environ.get("KESTREL_STATE_DIR", ".kestrel"))


def stack_setting(key: str) -> str | None:
    """A ``KESTREL_*`` value from the environment, else from the embedded default's ``kestrel.env``."""
    if value := os.environ.get(key):
        return value
    env_file = state_dir() / "kestrel.env"
    if env_file.exists():
        for line in env_file.read_text().splitlines():
            name, _, value = line.partition("=")
            if name == key:
                return value
    return None


def database_url() -> str:
    """``KESTREL_DATABASE_URL``, else the embedded default's ``kestrel.env``."""
    if url := stack_setting("KESTREL_DATABASE_URL"):
        return url
    raise InvalidInput(
        "no_database",
        f"no database: set KESTREL_DATABASE_URL, or point --state-dir at a running `kestrel run` ({state_dir()} has"
        " no kestrel.env)",
    )


@db_app.command("migrate")
def db_migrate() -> None:
    """Apply pending migrations (idempotent)."""
    from kestrel.store.migrate import migrate  # noqa: PLC0415 - keep CLI start-up light

    applied = migrate(database_url())
    if applied:
        for m in applied:
            typer.echo(f"applied {m.version:04d}_{m.name} ({m.variant})")
    else:
        typer.echo("database is up to date")


@tenant_app.command("create")
def tenant_create(
    tenant: Annotated[str, typer.Argument(help=f"Tenant id, {ID_PATTERN}")],
    name: Annotated[str, typer.Option(help="Display name")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Create a tenant."""
    from kestrel.store import registry  # noqa: PLC0415

    registry.create_tenant(database_url(), tenant, name)
    typer.echo(json.dumps({"tenant": tenant, "name": name}) if as_json else f"created tenant {tenant}")


@tenant_app.command("list")
def tenant_list(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False) -> None:
    """List tenants with their status and device counts."""
    from kestrel.store import registry  # noqa: PLC0415

    rows = registry.list_tenants(database_url())
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
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Create a user of a tenant."""
    from kestrel.store import registry  # noqa: PLC0415

    user_id = registry.create_user(database_url(), tenant, email, role)
    typer.echo(json.dumps({"user_id": user_id, "tenant": tenant, "role": role}) if as_json else user_id)


@token_app.command("create")
def token_create(
    tenant: Annotated[str, typer.Option(help="The tenant the token is bound to")],
    scope: Annotated[list[str], typer.Option(help="A scope, e.g. devices:read (repeatable)")],
    name: Annotated[str, typer.Option(help="What the token is for")] = "",
    days: Annotated[int, typer.Option(min=1, max=365, help="Lifetime")] = 90,
    user: Annotated[str | None, typer.Option(help="Bind it to a user (it never exceeds their role)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Create an API token; it is printed once and stored only as a digest."""
    from kestrel.store import registry  # noqa: PLC0415

    token_id, token = registry.create_api_token(database_url(), tenant, scope, name=name, days=days, user_id=user)
    typer.echo(json.dumps({"token_id": token_id, "token": token, "scopes": sorted(set(scope))}) if as_json else token)


@device_app.command("list")
def device_list(
    tenant: Annotated[str, typer.Option(help="Tenant")],
    status: Annotated[str | None, typer.Option(help="Only this lifecycle state")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """List a tenant's devices."""
    from kestrel.store import registry  # noqa: PLC0415

    rows = registry.list_devices(database_url(), tenant, status)
    if as_json:
        typer.echo(json.dumps(rows, default=str))
        return
    for r in rows:
        typer.echo(f"{r['device_id']:<32} {r['status']:<14} {','.join(r['tags'])}")


@device_app.command("import")
def device_import(
    file: Annotated[Path, typer.Argument(help="CSV with header device_id[,name][,tags][,groups] (split by ;)")],
    tenant: Annotated[str, typer.Option(help="Owning tenant")],
    jwt_keys: Annotated[
        Path | None, typer.Option(help="Directory of <device_id>.pem public keys: each becomes that device's JWT key")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Register many devices from CSV, all or none, with a progress bar on stderr; for certificates, then run
    `kestrel pki sign-batch` on their CSRs."""
    from rich.progress import Progress  # noqa: PLC0415

    from kestrel.store import registry  # noqa: PLC0415

    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput("bad_file", f"cannot read {file} as UTF-8") from exc
    devices = registry.parse_device_csv(text)
    keys: dict[str, bytes] = {}
    if jwt_keys is not None:
        try:
            keys = {d: (jwt_keys / f"{d}.pem").read_bytes() for d, *_ in devices if (jwt_keys / f"{d}.pem").is_file()}
        except OSError as exc:
            raise InvalidInput("bad_file", f"cannot read the keys in {jwt_keys}: {exc}") from exc
    with Progress(transient=as_json) as progress:
        task = progress.add_task("importing", total=len(devices))
        created = registry.import_devices(
            database_url(), tenant, devices, lambda n: progress.advance(task, n), jwt_keys=keys
        )
    typer.echo(json.dumps({"tenant": tenant, "created": created}) if as_json else f"imported {created} device(s)")


@device_app.command("create")
def device_create(
    devices: Annotated[list[str], typer.Argument(help=f"Device ids, {ID_PATTERN}, globally unique")],
    tenant: Annotated[str, typer.Option(help="Owning tenant")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Register devices under a tenant."""
    from kestrel.store import registry  # noqa: PLC0415

    created = registry.create_devices(database_url(), tenant, devices)
    if as_json:
        typer.echo(json.dumps({"tenant": tenant, "created": created, "devices": devices}))
    else:
        typer.echo(f"registered {created} device(s) in tenant {tenant}")


@device_app.command("jwt-key")
def device_jwt_key(
    key_file: Annotated[Path, typer.Argument(help="PEM public key: Ed25519 (EdDSA) or EC P-256 (ES256)")],
    tenant: Annotated[str, typer.Option(help="Tenant whose devices this key may authenticate (the JWT's iss)")],
    device: Annotated[str | None, typer.Option(help="Restrict the key to one device")] = None,
) -> None:
    """Register a public key that verifies device JWTs; prints its kid (put it in the JWT header)."""
    from kestrel.store import registry  # noqa: PLC0415

    try:
        data = key_file.read_bytes()
    except OSError as exc:
        raise InvalidInput("bad_file", f"cannot read {key_file}: {exc.strerror}") from exc
    typer.echo(registry.add_jwt_key(database_url(), tenant, data, device))


@device_app.command("jwt-key-revoke")
def device_jwt_key_revoke(kid: Annotated[str, typer.Argument(help="The key's kid")]) -> None:
    """Revoke a JWT key: tokens signed with it are refused and sessions opened with it are disconnected."""
    from kestrel.store import registry  # noqa: PLC0415

    registry.revoke_jwt_key(database_url(), kid)
    typer.echo(f"revoked JWT key {kid}")


def _set_status(device: str, status: str) -> None:
    from kestrel.store import registry  # noqa: PLC0415

    before = registry.set_device_status(database_url(), device, status)
    typer.echo(f"device {device}: {before} -> {status}")


@device_app.command("suspend")
def device_suspend(device: Annotated[str, typer.Argument(help="Device id")]) -> None:
    """Suspend a device: its live session is disconnected and it cannot connect until resumed."""
    _set_status(device, "suspended")


@device_app.command("resume")
def device_resume(device: Annotated[str, typer.Argument(help="Device id")]) -> None:
    """Re-activate a suspended device."""
    _set_status(device, "active")


@device_app.command("decommission")
def device_decommission(device: Annotated[str, typer.Argument(help="Device id")]) -> None:
    """Retire a device for good: credentials revoked, session ended, open commands cancelled, history kept."""
    from kestrel.store import registry  # noqa: PLC0415

    done = registry.decommission_device(database_url(), device)
    typer.echo(f"{device}: decommissioned" if done else f"{device}: already decommissioned")


@device_app.command("presence")
def device_presence(
    tenant: Annotated[str, typer.Option(help="Tenant id")],
    online: Annotated[bool | None, typer.Option("--online/--offline", help="Only online or offline devices")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Who is online: presence and last-seen of a tenant's devices."""
    from kestrel.store import twin_ops  # noqa: PLC0415

    rows = twin_ops.presence(database_url(), tenant, online)
    if as_json:
        typer.echo(json.dumps(rows, default=str))
        return
    for r in rows:
        state = "online " if r["online"] else "offline"
        typer.echo(f"{r['device_id']:<40} {state}  last seen {r['last_seen'] or '-'}")


@device_app.command("shadow")
def device_shadow(
    device: Annotated[str, typer.Argument(help="Device id")],
    set_desired: Annotated[str | None, typer.Option("--set", help="Merge patch of desired state (JSON)")] = None,
    name: Annotated[str, typer.Option(help="Named shadow (default: the classic one)")] = "",
) -> None:
    """Show a device's shadow (desired, reported, delta), or change its desired state with --set."""
    from kestrel.store import twin_ops  # noqa: PLC0415

    typer.echo(json.dumps(twin_ops.shadow(database_url(), device, name, set_desired), default=str, indent=2))


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
    from kestrel.store import twin_ops  # noqa: PLC0415

    url = database_url()
    command_id = twin_ops.send_command(url, device, name, params, timeout_s, expires_in_s)
    if not wait:
        typer.echo(command_id)
        return
    detail = twin_ops.wait_command(url, command_id, timeout_s + expires_in_s)
    typer.echo(json.dumps(detail, default=str, indent=2))
    if detail["status"] != "succeeded":
        raise typer.Exit(1)


@command_app.command("show")
def command_show(command_id: Annotated[str, typer.Argument(help="Command id")]) -> None:
    """A command and every state it went through."""
    from kestrel.store import twin_ops  # noqa: PLC0415

    typer.echo(json.dumps(twin_ops.command(database_url(), command_id), default=str, indent=2))


@claim_app.command("create")
def claim_create(
    tenant: Annotated[str, typer.Option(help="Tenant id")],
    max_uses: Annotated[int, typer.Option(help="How many devices may provision with it")] = 1,
    expires_in_s: Annotated[int, typer.Option("--expires-in", help="Seconds until it expires")] = 86400,
    group: Annotated[str | None, typer.Option(help="Put provisioned devices in this group")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="Tag for provisioned devices (repeatable)")] = None,
) -> None:
    """A just-in-time provisioning claim; its token is printed once."""
    from kestrel.store import twin_ops  # noqa: PLC0415

    typer.echo(twin_ops.create_claim(database_url(), tenant, max_uses, expires_in_s, group, tag or []))


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
    from kestrel.store import registry  # noqa: PLC0415

    typer.echo(registry.create_service_principal(database_url(), name, role, rotate=rotate))


@service_app.command("revoke")
def service_revoke(name: Annotated[str, typer.Argument(help="Principal name")]) -> None:
    """Revoke a backend principal: refused at its next connect, its live sessions disconnected."""
    from kestrel.store import registry  # noqa: PLC0415

    registry.revoke_service_principal(database_url(), name)
    typer.echo(f"revoked service principal {name}")


@app.command()
def agent(
    tenant: Annotated[str, typer.Option(help="Tenant id")],
    device: Annotated[str, typer.Option(help="Device id")],
    claim: Annotated[str | None, typer.Option(help="Provision first with this claim token (JIT)")] = None,
    cert: Annotated[Path | None, typer.Option(help="Certificate chain (default: <state>/devices/<device>.crt)")] = None,
    key: Annotated[Path | None, typer.Option(help="Private key (default: <state>/devices/<device>.key)")] = None,
    ca: Annotated[Path | None, typer.Option(help="Root CA the broker's certificate chains to")] = None,
    host: Annotated[str, typer.Option(help="Broker host")] = "localhost",
    port: Annotated[int | None, typer.Option(help="mTLS port [the state directory's, else 18883]")] = None,
    claim_port: Annotated[
        int | None, typer.Option(help="TLS port for provisioning with a claim [the state directory's, else 18884]")
    ] = None,
) -> None:
    """Run a device built on the SDK: provisions itself with a claim if asked, then reports state, converges to
    desired state and answers the commands ping, echo and sleep."""
    from kestrel_device.agent import DeviceRefused, run  # noqa: PLC0415
    from kestrel_device.client import ProvisioningRefused  # noqa: PLC0415

    devices = state_dir() / "devices"
    port = port or int(stack_setting("KESTREL_MQTT_TLS_PORT") or 18883)
    claim_port = claim_port or int(stack_setting("KESTREL_MQTT_JWT_PORT") or 18884)
    try:
        run(
            tenant, device, host=host, port=port, claim_port=claim_port,
            ca_file=ca or state_dir() / "tls" / "ca.pem", cert_file=cert or devices / f"{device}.crt",
            key_file=key or devices / f"{device}.key", claim=claim, devices_dir=devices,
        )  # fmt: skip
    except ProvisioningRefused as exc:
        raise Conflict(f"provisioning refused: {exc.error}: {exc.detail}") from exc
    except DeviceRefused as exc:
        raise Conflict(str(exc)) from exc
    except (OSError, TimeoutError) as exc:
        raise Unavailable(f"cannot reach the broker at {host}: {exc}") from exc


@app.command()
def simulate(
    devices: Annotated[int, typer.Option(min=1, max=100_000, help="Simulated device connections")] = 10,
    rate: Annotated[float, typer.Option(min=0.001, help="Messages per second, whole fleet")] = 10.0,
    tenant: Annotated[str, typer.Option(help="Tenant the devices belong to")] = "demo",
    prefix: Annotated[str, typer.Option(help="Device id prefix: PREFIX-0001 ...")] = "sim",
    host: Annotated[str, typer.Option(help="MQTT broker host")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="MQTT broker port")] = 11883,
    mqtt_version: Annotated[int, typer.Option(help="5 (MQTT 5) or 4 (MQTT 3.1.1)")] = 5,
    duration: Annotated[float | None, typer.Option(min=0.1, help="Stop after this many seconds")] = None,
    jwt_key: Annotated[
        Path | None, typer.Option(help="Tenant signing key (PEM, Ed25519 or P-256): devices log in with JWTs")
    ] = None,
    jwt_kid: Annotated[str, typer.Option(help="The key's kid, as `kestrel device jwt-key` printed it")] = "",
) -> None:
    """Publish realistic telemetry (with seq, QoS 1) from simulated devices over real MQTT."""
    from kestrel.devtools.simulate import Fleet, device_ids, jwt_credentials  # noqa: PLC0415
    from kestrel_core.topics import require_id  # noqa: PLC0415

    if mqtt_version not in (4, 5):
        raise InvalidInput("bad_mqtt_version", "--mqtt-version must be 4 (3.1.1) or 5")
    require_id("tenant", tenant)
    require_id("device prefix", prefix)
    credentials = None
    if jwt_key is not None:
        if not jwt_kid:
            raise InvalidInput("bad_arguments", "--jwt-key needs --jwt-kid")
        try:
            credentials = jwt_credentials(jwt_key.read_bytes(), jwt_kid, tenant)
        except OSError as exc:
            raise InvalidInput("bad_file", f"cannot read {jwt_key}: {exc.strerror}") from exc
        except ValueError as exc:
            raise InvalidInput("bad_key", f"{jwt_key} is not an unencrypted PEM private key") from exc
    fleet = Fleet(host, port, tenant, device_ids(prefix, devices), rate, version=mqtt_version, credentials=credentials)
    typer.echo(f"simulating {devices} devices at {rate:g} msg/s on {host}:{port} (tenant {tenant})")
    import uvloop  # noqa: PLC0415

    try:
        stats = uvloop.run(fleet.run(duration=duration))
    except KeyboardInterrupt:
        stats = fleet.stats
    typer.echo(f"sent {stats.sent}, acknowledged {stats.acked}, failed {stats.failed}, reconnects {stats.reconnects}")


@app.command()
def run(
    state: Annotated[
        Path | None, typer.Option("--state-dir", help="Where data and logs live [default: .kestrel]")
    ] = None,
    postgres_port: Annotated[int, typer.Option(min=1, max=65535)] = 15432,
    nats_port: Annotated[int, typer.Option(min=1, max=65535)] = 14222,
    nats_monitor_port: Annotated[int, typer.Option(min=1, max=65535)] = 18222,
    mqtt_port: Annotated[int, typer.Option(min=1, max=65535)] = 11883,
    api_port: Annotated[int, typer.Option(min=1, max=65535)] = 18080,
    bridge_metrics_port: Annotated[int, typer.Option(min=1, max=65535)] = 19101,
    writer_metrics_port: Annotated[int, typer.Option(min=1, max=65535)] = 19102,
    mqtt_tls_port: Annotated[int, typer.Option(min=1, max=65535, help="mTLS device listener")] = 18883,
    mqtt_jwt_port: Annotated[int, typer.Option(min=1, max=65535, help="TLS + JWT device listener")] = 18884,
    authsvc_port: Annotated[int, typer.Option(min=1, max=65535)] = 18090,
    supervisor_port: Annotated[int, typer.Option(min=1, max=65535, help="Health of every process")] = 18099,
    devices: Annotated[int, typer.Option(min=0, max=10_000, help="Simulated devices (0: none)")] = 20,
    rate: Annotated[float, typer.Option(min=0.001, help="Simulated messages per second")] = 20.0,
) -> None:
    """Run the embedded default: PostgreSQL, NATS, Mosquitto, Kestrel's services and a simulated fleet."""
    from kestrel.devtools.embedded import EmbeddedPorts, run_embedded  # noqa: PLC0415

    ports = EmbeddedPorts(
        postgres_port,
        nats_port,
        nats_monitor_port,
        mqtt_port,
        api_port,
        bridge_metrics_port,
        writer_metrics_port,
        mqtt_tls_port,
        mqtt_jwt_port,
        authsvc_port,
        supervisor_port,
    )
    if len(set(vars(ports).values())) != len(vars(ports)):
        raise InvalidInput("bad_ports", "every port must be different")
    run_embedded(state or state_dir(), ports, devices=devices, rate=rate, simulator=devices > 0)


def _add_plugins() -> None:
    """Sub-commands that other Kestrel packages register (entry point group ``kestrel.cli``), e.g. ``pki``.

    The shared package never imports a service; installed packages plug their commands in.
    """
    from importlib.metadata import entry_points  # noqa: PLC0415

    for entry in entry_points(group="kestrel.cli"):
        app.add_typer(entry.load(), name=entry.name)


def main() -> None:
    try:
        _add_plugins()
        code = app(standalone_mode=False)  # click returns a command's typer.Exit code here
        if isinstance(code, int) and code:
            sys.exit(code)
    except KestrelError as exc:
        typer.echo(f"kestrel: {exc.detail}", err=True)
        sys.exit(2 if isinstance(exc, InvalidInput) else 1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("kestrel: aborted", err=True)
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence: one line, no traceback
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):  # click/typer usage errors
            typer.echo(f"kestrel: {exc.format_message()}", err=True)
            sys.exit(int(exc.exit_code))
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        typer.echo(f"kestrel: {type(exc).__name__}: {first_line}", err=True)
        sys.exit(1)
