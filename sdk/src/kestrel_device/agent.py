"""``kestrel-agent`` (and the platform's ``kestrel agent``): a device built on the SDK, for demos and for trying the
platform.

It provisions itself with a claim token if asked (a key made here, a CSR, its certificate back), connects with
its certificate, reports its state, converges to desired state (each desired field is applied and reported back),
answers the commands ``ping``, ``echo`` and ``sleep``, and sends a telemetry reading every few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import gmqtt

from kestrel_core.retry import Backoff
from kestrel_device.client import DeviceClient, ProvisioningRefused, new_device_key, provision

log = logging.getLogger("kestrel_device.agent")


async def _ping(params: dict[str, Any]) -> dict[str, Any]:
    return {"pong": int(time.time() * 1000)}


async def _echo(params: dict[str, Any]) -> dict[str, Any]:
    return params


async def _sleep(params: dict[str, Any]) -> dict[str, Any]:
    seconds = float(params.get("seconds", 1))
    await asyncio.sleep(min(max(seconds, 0.0), 3600.0))
    return {"slept": seconds}


async def provision_files(
    tenant: str, device: str, claim: str, host: str, port: int, ca_file: Path, out_dir: Path
) -> tuple[Path, Path]:
    """JIT provisioning: the key stays in ``out_dir``; returns (certificate chain, key) paths."""
    key_pem, csr_pem = new_device_key(device)
    key_path, cert_path = out_dir / f"{device}.key", out_dir / f"{device}.crt"
    context = await asyncio.to_thread(_keep_key, key_path, key_pem, ca_file)
    answer = await provision(tenant, claim, device, host, port, context, csr_pem)
    await asyncio.to_thread(cert_path.write_text, answer.chain)
    return cert_path, key_path


def _keep_key(key_path: Path, key_pem: bytes, ca_file: Path) -> ssl.SSLContext:
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.write_bytes(key_pem)
    key_path.chmod(0o600)
    return ssl.create_default_context(cafile=str(ca_file))


async def run_agent(
    tenant: str,
    device: str,
    host: str,
    port: int,
    context: ssl.SSLContext,
    *,
    telemetry_every_s: float = 5.0,
    stop: asyncio.Event | None = None,
) -> None:
    client = DeviceClient(tenant, device, host, port, ssl=context)
    state: dict[str, Any] = {"fw": "1.0.0", "interval": telemetry_every_s}
    reports: set[asyncio.Task[None]] = set()

    def converge(name: str, document: dict[str, Any]) -> None:
        delta = document.get("delta") or {}
        if name == "" and delta:
            state.update(delta)
            log.info("applying desired state", extra={"delta": delta})
            task = asyncio.ensure_future(client.report(delta))
            reports.add(task)
            task.add_done_callback(reports.discard)

    client.on_desired(converge)
    for name, handler in (("ping", _ping), ("echo", _echo), ("sleep", _sleep)):
        client.on_command(name, handler)
    await client.connect()
    await client.report(state)
    print(f"{device}: connected; answering ping, echo, sleep; converging to desired state (Ctrl-C to stop)", flush=True)
    temp = 21.0
    stop = stop or asyncio.Event()
    failures = 0
    while not stop.is_set():
        temp += random.uniform(-0.2, 0.2)  # noqa: S311 - simulation
        if client.client is not None and client.client.is_connected:
            await client.send_telemetry({"temp": round(temp, 2)})
        elif await _reconnect(client, device):
            failures = 0
        else:
            failures += 1
        try:
            interval = float(state.get("interval", telemetry_every_s))
        except (TypeError, ValueError):
            interval = telemetry_every_s
        wait = RECONNECT.delay(failures) if failures else max(0.5, interval)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), wait)
    await client.disconnect()


#: CONNACK codes that retrying cannot fix: the broker (authsvc) refuses this device's credentials.
REFUSED = frozenset({4, 5, 0x86, 0x87, 0x8C})
#: After a lost connection: soon, then less often, never in step with the rest of a fleet.
RECONNECT = Backoff(base_s=1.0, cap_s=60.0)


class DeviceRefused(Exception):
    """The broker refuses the device: suspended, decommissioned or its credentials revoked."""


async def _reconnect(client: DeviceClient, device: str) -> bool:
    """Connect again; False when the broker cannot be reached yet (``DeviceRefused`` when it refuses us)."""
    try:
        await client.connect()
    except gmqtt.MQTTConnectError as exc:
        if exc._code in REFUSED:  # noqa: SLF001 - gmqtt keeps the CONNACK code there
            raise DeviceRefused(
                f"{device}: the broker refuses this device ({exc}); suspended or decommissioned?"
            ) from exc
        log.warning("reconnect failed: %s", exc)
    except (OSError, TimeoutError) as exc:
        log.warning("reconnect failed: %s", exc)
    else:
        print(f"{device}: reconnected", flush=True)
        return True
    return False


def run(
    tenant: str,
    device: str,
    *,
    host: str,
    port: int,
    claim_port: int,
    ca_file: Path,
    cert_file: Path,
    key_file: Path,
    claim: str | None,
    devices_dir: Path,
) -> None:
    """Provision first when given a claim, then run until Ctrl-C. Raises ``DeviceRefused``, ``ProvisioningRefused``,
    ``OSError``/``TimeoutError`` (broker unreachable) for the caller to report in one line."""

    async def main() -> None:
        nonlocal cert_file, key_file
        if claim is not None:
            cert_file, key_file = await provision_files(tenant, device, claim, host, claim_port, ca_file, devices_dir)
            print(
                f"{device}: provisioned; certificate {cert_file}, key {key_file} (never left this machine)", flush=True
            )
        context = ssl.create_default_context(cafile=str(ca_file))
        context.load_cert_chain(str(cert_file), str(key_file))
        await run_agent(tenant, device, host, port, context)

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("gmqtt").setLevel(logging.CRITICAL)  # the agent reports connection trouble itself
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    """``kestrel-agent``: one line and exit 1 when the broker refuses the device or cannot be reached."""
    parser = argparse.ArgumentParser(prog="kestrel-agent", description="A demonstration device built on the SDK.")
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--claim", help="provision first with this claim token (JIT)")
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=8883, help="mTLS port")
    parser.add_argument("--claim-port", type=int, default=8884, help="TLS port for provisioning with a claim")
    parser.add_argument("--ca", type=Path, required=True, help="root CA the broker's certificate chains to")
    parser.add_argument("--dir", type=Path, default=Path("."), help="where the key and certificate are (or go)")
    args = parser.parse_args(argv)
    try:
        run(
            args.tenant, args.device, host=args.host, port=args.port, claim_port=args.claim_port, ca_file=args.ca,
            cert_file=args.dir / f"{args.device}.crt", key_file=args.dir / f"{args.device}.key", claim=args.claim,
            devices_dir=args.dir,
        )  # fmt: skip
    except ProvisioningRefused as exc:
        print(f"kestrel-agent: provisioning refused: {exc.error}: {exc.detail}", file=sys.stderr)
        return 1
    except DeviceRefused as exc:
        print(f"kestrel-agent: {exc}", file=sys.stderr)
        return 1
    except (OSError, TimeoutError) as exc:
        print(f"kestrel-agent: cannot reach the broker at {args.host}: {exc}", file=sys.stderr)
        return 1
    return 0
