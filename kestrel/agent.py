"""``kestrel agent``: a device built on the SDK (``kestrel.device``), for demos and for trying the platform.

It provisions itself with a claim token if asked (a key made here, a CSR, its certificate back), connects with
its certificate, reports its state, converges to desired state (each desired field is applied and reported back),
answers the commands ``ping``, ``echo`` and ``sleep``, and sends a telemetry reading every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from pathlib import Path
from typing import Any

import gmqtt

from kestrel.device import DeviceClient, new_device_key, provision

log = logging.getLogger("kestrel.agent")


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
    await asyncio.to_thread(cert_path.write_text, answer["chain"])
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
    while not stop.is_set():
        temp += random.uniform(-0.2, 0.2)  # noqa: S311 - simulation
        if client.client is not None and client.client.is_connected:
            await client.send_telemetry({"temp": round(temp, 2)})
        else:
            await _reconnect(client, device)
        try:
            interval = float(state.get("interval", telemetry_every_s))
        except (TypeError, ValueError):
            interval = telemetry_every_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.5, interval))
    await client.disconnect()


#: CONNACK codes that retrying cannot fix: the broker (authsvc) refuses this device's credentials.
REFUSED = frozenset({4, 5, 0x86, 0x87, 0x8C})


class DeviceRefused(Exception):
    """The broker refuses the device: suspended, decommissioned or its credentials revoked."""


async def _reconnect(client: DeviceClient, device: str) -> None:
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
