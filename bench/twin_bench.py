"""Device twin benchmarks (not tests), each against a ceiling measured in the same run on the same broker:

1. Command round trip at a fixed rate: ``POST /api/v1/devices/{id}/commands`` -> devicesvc -> Mosquitto -> SDK
   device (answers ``delivered`` then ``succeeded``) -> devicesvc -> PostgreSQL -> the result visible through
   ``GET /api/v1/commands/{id}`` (polled every 5 ms). Ceiling: the same request/response over the same broker
   between a bare MQTT requester and the same SDK devices (no API, no database, no devicesvc).
2. Reported-state updates per second, committed to the shadow table by devicesvc, against the rate at which
   the same broker delivers the same messages to a bare subscriber.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import gmqtt
import httpx
import msgspec
import psycopg
import uvloop
from scale import pick

from kestrel.devtools import seed
from kestrel.devtools.servers import BrokerAuth, MosquittoServer, NatsServer, PostgresServer, free_port, http_ok
from kestrel.store.migrate import migrate
from kestrel.store.rows import fetch_maybe
from kestrel_core.messages.twin import CommandRequest
from kestrel_core.tokens import SCOPES
from kestrel_device.client import DeviceClient, new_device_key
from pki.builtin import BuiltinCA

PASSPHRASE = "bench-" + uuid.uuid4().hex
KEY = "bench-broker-key"
TENANT = "bench"
DEVICES = pick(40, 4)
RATE = pick(20, 5)  # commands per second
DURATION_S = pick(15, 2)
REPORTS_PER_DEVICE = pick(250, 20)


def _wait(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not http_ok(url):
        if time.monotonic() > deadline:
            raise SystemExit(f"not up: {url}")
        time.sleep(0.2)


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered) * 1000, ordered[int(len(ordered) * 0.99) - 1] * 1000


async def _ok(params: dict[str, Any]) -> str:
    return "ok"


async def _devices(contexts: list[tuple[str, ssl.SSLContext]], port: int) -> list[DeviceClient]:
    devices = []
    for device, context in contexts:
        client = DeviceClient(TENANT, device, "127.0.0.1", port, ssl=context)
        client.on_command("ping", _ok)
        await client.connect()
        devices.append(client)
    return devices


async def raw_round_trips(port: int, secret: str, devices: list[str]) -> list[float]:
    """The ceiling: a bare requester publishes commands with a response topic; the SDK devices answer."""
    done: dict[str, asyncio.Future[None]] = {}
    requester = gmqtt.Client("svc:benchraw:1")
    requester.set_auth_credentials("benchraw", secret)

    def on_message(c: Any, topic: str, payload: bytes, qos: int, properties: Any) -> int:
        if b"succeeded" in payload:
            future = done.get(topic.rsplit("/", 1)[1])
            if future is not None and not future.done():
                future.set_result(None)
        return 0

    requester.on_message = on_message
    await requester.connect("127.0.0.1", port, version=gmqtt.constants.MQTTv50)
    requester.subscribe(f"v1/{TENANT}/d/+/cmd-res/+", qos=1)
    await asyncio.sleep(0.5)
    samples: list[float] = []

    async def one(i: int) -> None:
        device, request_id = devices[i % len(devices)], f"c{uuid.uuid4().hex[:24]}"
        done[request_id] = asyncio.get_running_loop().create_future()
        started = time.perf_counter()
        requester.publish(
            f"v1/{TENANT}/d/{device}/cmd/ping",
            msgspec.json.encode(CommandRequest(request_id=request_id, name="ping")),
            qos=1,
            response_topic=f"v1/{TENANT}/d/{device}/cmd-res/{request_id}",
            correlation_data=request_id.encode(),
        )
        await asyncio.wait_for(done[request_id], 10)
        samples.append(time.perf_counter() - started)

    await _paced(one)
    await requester.disconnect()
    return samples


async def _paced(one: Any) -> None:
    tasks = []
    start = time.perf_counter()
    for i in range(RATE * DURATION_S):
        await asyncio.sleep(max(0.0, start + i / RATE - time.perf_counter()))
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)


async def platform_round_trips(api: str, headers: dict[str, str], devices: list[str]) -> list[float]:
    samples: list[float] = []
    async with httpx.AsyncClient(base_url=f"{api}/api/v1", headers=headers, timeout=30) as http:

        async def one(i: int) -> None:
            started = time.perf_counter()
            response = await http.post(f"/devices/{devices[i % len(devices)]}/commands", json={"name": "ping"})
            command_id = response.json()["command_id"]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                body = (await http.get(f"/commands/{command_id}")).json()
                if body["command"]["status"] == "succeeded":
                    break
                if body["command"]["status"] in ("failed", "timed_out", "expired"):
                    raise RuntimeError(body)
                await asyncio.sleep(0.005)
            else:
                raise RuntimeError(f"command {command_id} did not succeed within 30 s")
            samples.append(time.perf_counter() - started)

        await _paced(one)
    return samples


async def raw_report_rate(port: int, secret: str, devices: list[DeviceClient]) -> float:
    """The ceiling: the broker delivering the same reports to one bare QoS 1 subscriber."""
    total = len(devices) * REPORTS_PER_DEVICE
    received = 0
    finished = asyncio.Event()
    subscriber = gmqtt.Client("svc:benchraw:2")
    subscriber.set_auth_credentials("benchraw", secret)

    def on_message(c: Any, topic: str, payload: bytes, qos: int, properties: Any) -> int:
        nonlocal received
        received += 1
        if received >= total:
            finished.set()
        return 0

    subscriber.on_message = on_message
    await subscriber.connect("127.0.0.1", port, version=gmqtt.constants.MQTTv50)
    subscriber.subscribe(f"v1/{TENANT}/d/+/state/reported/raw", qos=1)
    await asyncio.sleep(0.5)
    started = time.perf_counter()
    await _report_all(devices, "raw")
    await asyncio.wait_for(finished.wait(), 120)
    elapsed = time.perf_counter() - started
    await subscriber.disconnect()
    return total / elapsed


async def _report_all(devices: list[DeviceClient], shadow: str) -> None:
    async def device_reports(device: DeviceClient) -> None:
        for n in range(REPORTS_PER_DEVICE):
            await device.report({"n": n, "temp": 20 + n % 7}, shadow=shadow)
            if n % 50 == 49:
                await asyncio.sleep(0)  # let gmqtt flush

    await asyncio.gather(*[device_reports(d) for d in devices])


async def platform_report_rate(url: str, devices: list[DeviceClient]) -> float:
    total = len(devices) * REPORTS_PER_DEVICE
    started = time.perf_counter()
    await _report_all(devices, "bench")
    deadline = time.monotonic() + 120
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while True:
            if time.monotonic() > deadline:
                raise RuntimeError("reports were not all committed within 120 s")
            row = await fetch_maybe(
                conn,
                "SELECT count(*) AS done FROM device_shadows WHERE name = 'bench' AND (reported->>'n')::int = %s",
                (REPORTS_PER_DEVICE - 1,),
            )
            if row and row["done"] == len(devices):
                break
            await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        row = await fetch_maybe(
            conn, "SELECT count(*) AS recorded FROM shadow_history WHERE name = 'bench' AND side = 'reported'"
        )
    if row is None or row["recorded"] != total:
        raise RuntimeError(f"{row} reports recorded, {total} sent")
    return total / elapsed


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="kestrel-twinbench-"))
    root.chmod(0o755)
    pg = PostgresServer(name="postgres", log_path=root / "pg.log", root=root / "pg", port=free_port())
    nats_server = NatsServer(
        name="nats", log_path=root / "nats.log", root=root / "nats", port=free_port(), monitor_port=free_port()
    )
    pg.start()
    nats_server.start()
    procs: list[subprocess.Popen[bytes]] = []
    broker: MosquittoServer | None = None
    try:
        migrate(pg.url)
        ca = BuiltinCA(pg.url, PASSPHRASE)
        ca.init_root("bench")
        seed.create_tenant(pg.url, TENANT)
        ca.create_tenant_ca(TENANT, "bench")
        names = [f"twin-{i:03d}" for i in range(DEVICES)]
        seed.create_devices(pg.url, TENANT, names)
        tls = root / "tls"
        tls.mkdir(mode=0o755)
        cert_pem, key_pem = ca.issue_server(["localhost"], ["127.0.0.1"], 30, "bench")
        (tls / "server.crt").write_text(cert_pem)
        (tls / "server.key").write_text(key_pem)
        (tls / "server.key").chmod(0o644)  # a throwaway bench key the mosquitto user must read
        (tls / "ca.pem").write_text(ca.root_pem())
        contexts = []
        for name in names:
            key, csr = new_device_key(name)
            issued = ca.sign_csr(csr, name, 30, "bench")
            (tls / f"{name}.key").write_bytes(key)
            (tls / f"{name}.crt").write_text(issued.full_chain_pem)
            context = ssl.create_default_context(cafile=str(tls / "ca.pem"))
            context.load_cert_chain(str(tls / f"{name}.crt"), str(tls / f"{name}.key"))
            contexts.append((name, context))
        secrets = {n: seed.create_service_principal(pg.url, n, r) for n, r in
                   (("devicesvc", "devices"), ("benchraw", "devices"), ("authsvc", "control"))}  # fmt: skip
        _, token = seed.create_api_token(pg.url, TENANT, list(SCOPES), name="bench")
        headers = {"Authorization": f"Bearer {token}"}
        plain, authsvc_port, api_port = free_port(), free_port(), free_port()
        env = os.environ | {
            "KESTREL_DATABASE_URL": pg.url, "KESTREL_AUTHSVC_PORT": str(authsvc_port),
            "KESTREL_AUTHSVC_BROKER_KEY": KEY, "KESTREL_AUTHSVC_KICK_MQTT_PORT": str(plain),
            "KESTREL_AUTHSVC_KICK_USERNAME": "authsvc", "KESTREL_AUTHSVC_KICK_PASSWORD": secrets["authsvc"],
            "KESTREL_API_DATABASE_URL": pg.api_url, "KESTREL_API_PORT": str(api_port),
            "KESTREL_API_ADMIN_TOKEN": "kpa_bench_" + uuid.uuid4().hex, "KESTREL_API_POOL_MAX": "20",
            "KESTREL_DEVICES_MQTT_PORT": str(plain), "KESTREL_DEVICES_MQTT_USERNAME": "devicesvc",
            "KESTREL_DEVICES_MQTT_PASSWORD": secrets["devicesvc"], "KESTREL_DEVICES_NATS_URL": nats_server.url,
            "KESTREL_DEVICES_METRICS_PORT": "0",
        }  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-m", "authsvc"], env=env, stderr=(root / "a.log").open("w")))
        _wait(f"http://127.0.0.1:{authsvc_port}/healthz")
        broker = MosquittoServer(
            name="mosquitto", log_path=root / "mosquitto.log", root=root / "mq", port=plain,
            auth=BrokerAuth(
                authn_url=f"http://127.0.0.1:{authsvc_port}/mqtt/authn", broker_key=KEY,
                server_cert=tls / "server.crt", server_key=tls / "server.key", ca_file=tls / "ca.pem",
                mtls_port=free_port(), jwt_port=free_port(),
            ),
        )  # fmt: skip
        broker.start()
        assert broker.auth is not None
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        devices = loop.run_until_complete(_devices(contexts, broker.auth.mtls_port))
        raw_rtt = loop.run_until_complete(raw_round_trips(plain, secrets["benchraw"], names))
        raw_reports = loop.run_until_complete(raw_report_rate(plain, secrets["benchraw"], devices))

        procs.append(subprocess.Popen([sys.executable, "-m", "api"], env=env, stderr=(root / "api.log").open("w")))
        procs.append(
            subprocess.Popen([sys.executable, "-m", "devicesvc"], env=env, stderr=(root / "devicesvc.log").open("w"))
        )
        _wait(f"http://127.0.0.1:{api_port}/healthz")
        time.sleep(2)  # devicesvc subscribed; devices seen online
        platform_rtt = loop.run_until_complete(platform_round_trips(f"http://127.0.0.1:{api_port}", headers, names))
        reports = loop.run_until_complete(platform_report_rate(pg.url, devices))
        for device in devices:
            loop.run_until_complete(device.disconnect())

        count = RATE * DURATION_S
        print(f"Command round trip, {RATE} commands/s for {DURATION_S} s ({count}), {DEVICES} SDK devices over mTLS:")
        for label, samples in (("bare MQTT request/response (ceiling):", raw_rtt),
                               ("API -> devicesvc -> device -> result in API:", platform_rtt)):  # fmt: skip
            p50, p99 = _percentiles(samples)
            print(f"  {label:<46} p50 {p50:6.1f} ms   p99 {p99:6.1f} ms   ({len(samples)} done)")
        print(
            f"  extra latency of the platform (p50): {_percentiles(platform_rtt)[0] - _percentiles(raw_rtt)[0]:.1f} ms"
        )
        print(f"Reported-state updates, {DEVICES} devices x {REPORTS_PER_DEVICE} QoS 1 reports:")
        print(f"  broker to a bare subscriber (ceiling):         {raw_reports:>8,.0f} msg/s")
        print(f"  committed to shadows by devicesvc:             {reports:>8,.0f} updates/s")
        print(f"  ratio to the ceiling: {reports / raw_reports:.2f}")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(15)
        if broker is not None:
            broker.stop()
        nats_server.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
