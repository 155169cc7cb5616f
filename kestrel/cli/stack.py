"""``kestrel run|agent|simulate|db migrate``: the embedded default, a device, a simulated fleet, the schema."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kestrel.cli.env import database_url, stack_setting, state_dir
from kestrel_core.errors import Conflict, InvalidInput, Unavailable


def db_migrate() -> None:
    """Apply pending migrations (idempotent)."""
    from kestrel.store.migrate import migrate  # noqa: PLC0415 - keep CLI start-up light

    applied = migrate(database_url())
    if applied:
        for m in applied:
            typer.echo(f"applied {m.version:04d}_{m.name} ({m.variant})")
    else:
        typer.echo("database is up to date")


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
    rules_metrics_port: Annotated[int, typer.Option(min=1, max=65535, help="The rule workers' metrics")] = 19105,
    devices: Annotated[int, typer.Option(min=0, max=10_000, help="Simulated devices (0: none)")] = 20,
    rate: Annotated[float, typer.Option(min=0.001, help="Simulated messages per second")] = 20.0,
    prometheus: Annotated[
        bool, typer.Option(help="Also run Prometheus (Debian's), scraping every service, with the SLO rules")
    ] = False,
    prometheus_port: Annotated[int, typer.Option(min=1, max=65535)] = 19090,
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
        rules_metrics_port,
    )
    if len(set(vars(ports).values())) != len(vars(ports)):
        raise InvalidInput("bad_ports", "every port must be different")
    run_embedded(state or state_dir(), ports, devices=devices, rate=rate, simulator=devices > 0,
                 prometheus_port=prometheus_port if prometheus else 0)  # fmt: skip


def webhook_sink(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Loopback port to listen on")] = 18181,
    secret: Annotated[str, typer.Option(envvar="KESTREL_WEBHOOK_SECRET", help="The channel's secret (verifies)")] = "",
) -> None:
    """Print the notification webhooks sent here (development: try rules on `kestrel run`)."""
    from kestrel.devtools import webhook  # noqa: PLC0415 - development machinery, loaded when asked for

    webhook.serve(port, secret)
