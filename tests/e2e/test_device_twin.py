"""Device lifecycle, presence, shadows, commands and JIT provisioning, end to end (ADR-0013).

Real servers only: PostgreSQL, NATS JetStream, Mosquitto with our plugin (mTLS), authsvc, devicesvc, the PKI
provisioner and the API, each its own process; devices are the SDK (``kestrel_device.client``) or, for attacks, the
platform's raw MQTT client.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import nats
import psycopg
import pytest
import pytest_asyncio

from kestrel.devtools import seed
from kestrel.devtools.servers import BrokerAuth, MosquittoServer, NatsServer, PostgresServer, free_port, http_ok
from kestrel.runtime.mqttclient import MqttError, MqttPublisher
from kestrel_core.messages.twin import CommandResponse, ProvisionGranted
from kestrel_device.client import DeviceClient, ProvisioningRefused, new_device_key, provision
from pki.builtin import BuiltinCA
from tests.conftest import ServiceProcess, api_url_for, isolated_database, tenant_token, wait_until

pytestmark = pytest.mark.e2e
PASSPHRASE = "twin-test-" + uuid.uuid4().hex
#: devicesvc's presence grace and the devices' Will Delay: a reconnect within them is not a drop. Generous, so a
#: loaded CI machine's slow TLS reconnect still falls inside; "at once" is checked well inside the grace.
GRACE_S = 8
WILL_DELAY_S = 6
C = TypeVar("C", bound=DeviceClient)
ADMIN = "kpa_twin_" + uuid.uuid4().hex


@dataclass
class Stack:
    url: str
    root: Path
    auth: BrokerAuth
    broker: MosquittoServer
    ca: BuiltinCA
    api: str
    nats_url: str
    processes: dict[str, ServiceProcess]

    def tenant(self) -> tuple[str, dict[str, str]]:
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        seed.create_tenant(self.url, tenant)
        self.ca.create_tenant_ca(tenant, "test")
        return tenant, tenant_token(self.url, tenant)

    def tls(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.auth.ca_file))
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key))
        return ctx

    def enrol(self, device: str) -> ssl.SSLContext:
        """A key made on the 'device', its CSR signed by the tenant CA; the TLS context it connects with."""
        key_pem, csr_pem = new_device_key(device)
        issued = self.ca.sign_csr(csr_pem, device, 30, "test")
        folder = self.root / "devices"
        folder.mkdir(exist_ok=True)
        (folder / f"{device}.key").write_bytes(key_pem)
        (folder / f"{device}.crt").write_text(issued.full_chain_pem)
        return self.tls(folder / f"{device}.crt", folder / f"{device}.key")

    def device(self, tenant: str, device: str, context: ssl.SSLContext, **kwargs: Any) -> DeviceClient:
        kwargs.setdefault("will_delay_s", WILL_DELAY_S)
        return DeviceClient(tenant, device, "127.0.0.1", self.auth.mtls_port, ssl=context, **kwargs)

    def raw(self, device: str, context: ssl.SSLContext) -> MqttPublisher:
        return MqttPublisher("127.0.0.1", self.auth.mtls_port, device, tls=context)


def _service(root: Path, name: str, argv: list[str], env: dict[str, str]) -> ServiceProcess:
    process = ServiceProcess(name=name, log_path=root / f"{name}.log", argv=argv, env=os.environ | env)
    process.start()
    return process


@pytest.fixture(scope="module")
def stack(
    postgres: PostgresServer, nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("twin")
    url = isolated_database(postgres, "twin")
    ca = BuiltinCA(url, PASSPHRASE)
    ca.init_root("test")
    cert_pem, key_pem = ca.issue_server(["localhost"], ["127.0.0.1"], 30, "test")
    (root / "server.crt").write_text(cert_pem)
    (root / "server.key").write_text(key_pem)
    (root / "ca.pem").write_text(ca.root_pem())
    secrets = {
        name: seed.create_service_principal(url, name, role)
        for name, role in (("authsvc", "control"), ("devicesvc", "devices"), ("provisioner", "provisioning"))
    }
    broker_key = "bk-" + uuid.uuid4().hex
    plain, authsvc_port, api_port = free_port(), free_port(), free_port()
    auth = BrokerAuth(
        authn_url=f"http://127.0.0.1:{authsvc_port}/mqtt/authn",
        broker_key=broker_key,
        server_cert=root / "server.crt",
        server_key=root / "server.key",
        ca_file=root / "ca.pem",
        mtls_port=free_port(),
        jwt_port=free_port(),
    )
    py = sys.executable
    processes = {
        "authsvc": _service(
            root, "authsvc", [py, "-m", "authsvc"],
            {"KESTREL_DATABASE_URL": url, "KESTREL_AUTHSVC_PORT": str(authsvc_port),
             "KESTREL_AUTHSVC_BROKER_KEY": broker_key, "KESTREL_AUTHSVC_KICK_MQTT_PORT": str(plain),
             "KESTREL_AUTHSVC_KICK_USERNAME": "authsvc", "KESTREL_AUTHSVC_KICK_PASSWORD": secrets["authsvc"]},
        ),
        "api": _service(
            root, "api", [py, "-m", "api"],
            {"KESTREL_API_DATABASE_URL": api_url_for(postgres, url), "KESTREL_API_PORT": str(api_port),
             "KESTREL_API_ADMIN_TOKEN": ADMIN},
        ),
    }  # fmt: skip
    assert wait_until(lambda: http_ok(f"http://127.0.0.1:{authsvc_port}/healthz"), 30), "authsvc down"
    broker = MosquittoServer(
        name="mosquitto-twin", log_path=root / "mosquitto.log", root=root / "mq", port=plain, auth=auth
    )
    broker.start()
    processes["devicesvc"] = _service(
        root,
        "devicesvc",
        [py, "-m", "devicesvc"],
        {
            "KESTREL_DATABASE_URL": url,
            "KESTREL_DEVICES_MQTT_PORT": str(plain),
            "KESTREL_DEVICES_CLIENT_ID": "svc:devicesvc:1",
            "KESTREL_DEVICES_MQTT_USERNAME": "devicesvc",
            "KESTREL_DEVICES_MQTT_PASSWORD": secrets["devicesvc"],
            "KESTREL_DEVICES_NATS_URL": nats_server.url,
            "KESTREL_DEVICES_PRESENCE_GRACE_S": str(GRACE_S),
            "KESTREL_DEVICES_RETRY_BASE_S": "0.5",
            "KESTREL_DEVICES_SCAN_INTERVAL_S": "0.2",
            "KESTREL_DEVICES_METRICS_PORT": str(free_port()),
        },
    )
    processes["provisioner"] = _service(
        root, "provisioner", [py, "-m", "pki", "provisioner"],
        {"KESTREL_DATABASE_URL": url, "KESTREL_PKI_PASSPHRASE": PASSPHRASE,
         "KESTREL_PROVISIONER_MQTT_PORT": str(plain), "KESTREL_PROVISIONER_CLIENT_ID": "svc:provisioner:1",
         "KESTREL_PROVISIONER_MQTT_USERNAME": "provisioner",
         "KESTREL_PROVISIONER_MQTT_PASSWORD": secrets["provisioner"],
         "KESTREL_PROVISIONER_METRICS_PORT": str(free_port())},
    )  # fmt: skip
    api = f"http://127.0.0.1:{api_port}"
    assert wait_until(lambda: http_ok(f"{api}/healthz"), 30), "api down"
    try:
        for name, line in (("devicesvc", "devicesvc connected"), ("provisioner", "provisioner connected")):
            assert wait_until(lambda n=name, s=line: s in _log(root, n), 30), f"{name} never connected"
        yield Stack(url, root, auth, broker, ca, api, nats_server.url, processes)
    finally:
        for process in processes.values():
            process.stop()
        broker.stop()


def _log(root: Path, name: str) -> str:
    path = root / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(autouse=True)
def services_survive(stack: Stack) -> Iterator[None]:
    yield
    for name, process in stack.processes.items():
        assert process.alive(), f"{name} died: see {process.log_path}"
    assert stack.broker.alive(), "Mosquitto died"


@pytest_asyncio.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"{stack.api}/api/v1", timeout=10) as client:
        yield client


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def get_json(http: httpx.AsyncClient, path: str, headers: dict[str, str]) -> Any:
    response = await http.get(path, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


async def register(http: httpx.AsyncClient, headers: dict[str, str], device: str) -> None:
    response = await http.post("/devices", json={"device_id": device}, headers=headers)
    assert response.status_code == 201, response.text


async def command(
    http: httpx.AsyncClient, headers: dict[str, str], device: str, name: str, **body: Any
) -> dict[str, Any]:
    response = await http.post(f"/devices/{device}/commands", json={"name": name, **body}, headers=headers)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def command_status(
    http: httpx.AsyncClient, headers: dict[str, str], command_id: str, status: str, timeout: float = 15.0
) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        detail = await get_json(http, f"/commands/{command_id}", headers)
        return detail if detail["command"]["status"] == status else None

    return dict(await eventually(check, timeout, f"command {command_id} to be {status}"))


def new_id(prefix: str = "dev") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def enrolled_device(stack: Stack, http: httpx.AsyncClient) -> tuple[str, dict[str, str], str, ssl.SSLContext]:
    """A new tenant with one device registered through the API and enrolled: (tenant, API headers, device, TLS)."""
    tenant, headers = stack.tenant()
    device = new_id()
    await register(http, headers, device)
    return tenant, headers, device, stack.enrol(device)


# ---------------------------------------------------------------------------------------------- lifecycle


@pytest.mark.asyncio
async def test_lifecycle_presence_and_connection_history(stack: Stack, http: httpx.AsyncClient) -> None:
    tenant, headers = stack.tenant()
    device = new_id()
    await register(http, headers, device)
    assert (await get_json(http, f"/devices/{device}", headers))["status"] == "registered"
    context = stack.enrol(device)
    assert (await get_json(http, f"/devices/{device}", headers))["status"] == "provisioned"
    nc = await nats.connect(stack.nats_url)
    presence_events = await collect(nc, f"v1.{tenant}.d.{device}.presence")
    client = stack.device(tenant, device, context)
    await client.connect()

    async def online() -> bool:
        return bool((await get_json(http, f"/devices/{device}/presence", headers))["online"])

    await eventually(online, what="online")
    assert (await get_json(http, f"/devices/{device}", headers))["status"] == "active"
    listed = await get_json(http, "/presence?online=true", headers)
    assert [p["device_id"] for p in listed] == [device]

    # A short drop (no DISCONNECT) followed by a quick reconnect does not flap: nobody sees it offline.
    client.drop()
    await asyncio.sleep(0.3)
    client = stack.device(tenant, device, context)
    await client.connect()
    await asyncio.sleep(GRACE_S + 1)  # past both the will delay and the presence grace
    assert await online()
    assert not [e for e in presence_events if e["online"] is False], presence_events

    # A lost link: offline only after the will delay (or the grace), with the reason recorded.
    client.drop()

    async def offline() -> dict[str, Any] | None:
        presence = await get_json(http, f"/devices/{device}/presence", headers)
        return None if presence["online"] else presence

    presence = await eventually(offline, timeout=GRACE_S + 10, what="offline after the will delay")
    assert presence["reported_status"] == "offline"
    history = await get_json(http, f"/devices/{device}/connections", headers)
    assert len(history) == 2 and all(c["disconnected_at"] for c in history), history
    assert all(c["protocol"] == 5 for c in history)

    # A clean disconnect is offline at once (no grace: the device left on purpose).
    client = stack.device(tenant, device, context)
    await client.connect()
    await eventually(online, what="online again")
    await client.disconnect()
    await eventually(offline, timeout=GRACE_S / 2, what="offline at once after a clean DISCONNECT")
    await eventually(lambda: _true(len(presence_events) >= 6), what="presence events on NATS")
    assert {e["event"] for e in presence_events} >= {"connected", "disconnected"}
    await nc.close()


async def collect(nc: Any, subject: str) -> list[dict[str, Any]]:
    """Every event published on ``subject`` from now on, decoded."""
    events: list[dict[str, Any]] = []

    async def append(message: Any) -> None:
        events.append(json.loads(message.data))

    await nc.subscribe(subject, cb=append)
    return events


async def _true(value: bool) -> bool:
    return value


@pytest.mark.asyncio
async def test_lifecycle_allows_only_its_transitions(stack: Stack, http: httpx.AsyncClient) -> None:
    _, headers = stack.tenant()
    device = new_id()
    await register(http, headers, device)
    retired = await http.post(f"/devices/{device}/decommission", headers=headers)
    assert retired.status_code == 200 and retired.json()["status"] == "decommissioned"
    response = await http.patch(f"/devices/{device}", json={"status": "active"}, headers=headers)
    assert response.status_code == 409
    with psycopg.connect(stack.url) as conn, pytest.raises(psycopg.errors.CheckViolation, match="cannot go from"):
        conn.execute("UPDATE devices SET status = 'provisioned' WHERE device_id = %s", (device,))
    again = await http.post(f"/devices/{device}/decommission", headers=headers)  # idempotent: a retry succeeds
    assert again.status_code == 200 and again.json() == retired.json()


@pytest.mark.asyncio
async def test_suspended_device_is_disconnected_and_refused(stack: Stack, http: httpx.AsyncClient) -> None:
    _, headers = stack.tenant()
    device = new_id()
    await register(http, headers, device)
    context = stack.enrol(device)
    raw = stack.raw(device, context)
    await raw.connect()
    response = await http.patch(f"/devices/{device}", json={"status": "suspended"}, headers=headers)
    assert response.status_code == 200, response.text
    await asyncio.wait_for(raw.closed.wait(), 10)
    with pytest.raises(MqttError):
        await stack.raw(device, context).connect()
    assert (await http.post(f"/devices/{device}/commands", json={"name": "x"}, headers=headers)).status_code == 409
    assert (await http.patch(f"/devices/{device}", json={"status": "active"}, headers=headers)).status_code == 200
    again = stack.raw(device, context)
    await again.connect()
    await again.close()


@pytest.mark.asyncio
async def test_decommissioning_revokes_disconnects_keeps_history_and_never_frees_the_id(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    tenant, headers, device, context = await enrolled_device(stack, http)
    client = stack.device(tenant, device, context)
    await client.connect()
    assert (
        await http.patch(f"/devices/{device}/shadow", json={"desired": {"a": 1}}, headers=headers)
    ).status_code == 200
    await client.wait_desired(lambda d: d["desired"] == {"a": 1})
    pending = await command(http, headers, device, "never-answered", timeout_s=600)  # no handler registered
    client.commands.clear()
    response = await http.post(f"/devices/{device}/decommission", headers=headers)
    assert response.status_code == 200, response.text
    await eventually(lambda: _true(not client.client.is_connected), what="the device to be disconnected")  # type: ignore[union-attr]
    with pytest.raises(MqttError):
        await stack.raw(device, context).connect()
    with psycopg.connect(stack.url) as conn:
        statuses = conn.execute(
            "SELECT DISTINCT status FROM pki_certificates WHERE device_id = %s", (device,)
        ).fetchall()
    assert statuses == [("revoked",)]
    detail = await get_json(http, f"/commands/{pending['command_id']}", headers)
    assert detail["command"]["status"] in ("cancelled", "failed")  # failed: the SDK had no handler and said so first
    shadow = await get_json(http, f"/devices/{device}/shadow", headers)
    assert shadow["desired"] == {"a": 1}  # history is kept
    _, other_headers = stack.tenant()
    response = await http.post("/devices", json={"device_id": device}, headers=other_headers)
    assert response.status_code == 409  # the id is never free again, so nobody inherits its topics or data
    response = await http.patch(f"/devices/{device}/shadow", json={"desired": {"a": 2}}, headers=headers)
    assert response.status_code == 409


# ------------------------------------------------------------------------------------------------ shadows


@pytest.mark.asyncio
async def test_shadow_desired_reported_delta_and_optimistic_concurrency(stack: Stack, http: httpx.AsyncClient) -> None:
    tenant, headers, device, context = await enrolled_device(stack, http)
    path = f"/devices/{device}/shadow"

    # Desired state set while the device is offline reaches it when it connects (retained).
    response = await http.patch(
        path, json={"desired": {"led": {"on": True}, "rate": 5}}, headers=headers | {"If-Match": '"s0"'}
    )
    assert response.status_code == 200, response.text
    assert response.headers["ETag"] == '"s1"'
    assert response.json()["delta"] == {"led": {"on": True}, "rate": 5}
    client = stack.device(tenant, device, context)
    await client.connect()
    doc = await client.wait_desired(lambda d: d["version"] >= 1)
    assert doc["delta"] == {"led": {"on": True}, "rate": 5}

    await client.report({"led": {"on": True}, "fw": "1.0"})
    await client.wait_desired(lambda d: d["delta"] == {"rate": 5})
    shadow = await get_json(http, path, headers)
    assert shadow["reported"] == {"led": {"on": True}, "fw": "1.0"} and shadow["delta"] == {"rate": 5}
    assert isinstance(shadow["metadata"]["reported"]["led"]["on"]["timestamp"], int)

    # Stale If-Match: 412; stale version in the body: 409; concurrent writers from the same version: one wins.
    stale = await http.patch(path, json={"desired": {"rate": 6}}, headers=headers | {"If-Match": '"s1"'})
    assert stale.status_code == 412
    version = shadow["version"]
    results = await asyncio.gather(
        *[http.patch(path, json={"desired": {"rate": 10 + i}, "version": version}, headers=headers) for i in range(4)]
    )
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 409, 409, 409], [r.text for r in results]
    assert (await http.patch(path, json={"desired": {"rate": 1}, "version": 0}, headers=headers)).status_code == 409

    # null deletes; an out-of-order (older) report does not regress reported state.
    now = int(time.time() * 1000)
    await client.report({"temp": 21}, ts=now)
    await client.report({"temp": 19, "mode": "eco"}, ts=now - 5000)

    async def settled() -> dict[str, Any] | None:
        current = await get_json(http, path, headers)
        return current if current["reported"].get("mode") == "eco" else None

    current = await eventually(settled, what="the late report to be applied")
    assert current["reported"]["temp"] == 21
    response = await http.patch(path, json={"desired": {"led": None}}, headers=headers)
    assert "led" not in response.json()["desired"]

    # Named shadows are separate documents on their own topic.
    named = await http.patch(f"/devices/{device}/shadows/config", json={"desired": {"interval": 30}}, headers=headers)
    assert named.status_code == 200 and named.json()["name"] == "config"
    await client.wait_desired(lambda d: d["desired"] == {"interval": 30}, shadow="config")

    # Limits answer with a reason, and the history lists every change with its author.
    too_big = await http.patch(path, json={"desired": {"blob": "x" * 20_000}}, headers=headers)
    assert too_big.status_code == 413 and "shadow_too_large" in too_big.text
    not_object = await http.patch(path, json={"desired": [1, 2]}, headers=headers)
    assert not_object.status_code == 400
    history = await get_json(http, f"{path}/history", headers)
    assert {h["side"] for h in history} == {"desired", "reported"}
    assert any(h["actor"] == f"device:{device}" for h in history)

    # Last known state is readable while the device is offline; it converges when it is back.
    await client.disconnect()
    await http.patch(path, json={"desired": {"rate": 99}}, headers=headers)
    assert (await get_json(http, path, headers))["reported"]["fw"] == "1.0"
    client = stack.device(tenant, device, context)
    await client.connect()
    await client.wait_desired(lambda d: d["desired"].get("rate") == 99)
    await client.disconnect()


# ----------------------------------------------------------------------------------------------- commands


@pytest.mark.asyncio
async def test_command_to_an_offline_device_is_delivered_when_it_connects(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    tenant, headers, device, context = await enrolled_device(stack, http)
    nc = await nats.connect(stack.nats_url)
    events = await collect(nc, f"v1.{tenant}.d.{device}.command")
    created = await command(http, headers, device, "reboot", params={"delay": 1}, expires_in_s=60, timeout_s=10)
    assert created["status"] == "queued"
    # The control: a command to an online device of the same tenant, created later, is dispatched; by then devicesvc
    # has considered the earlier one too (it dispatches in creation order) and must have left it queued.
    online = new_id()
    await register(http, headers, online)
    peer = stack.device(tenant, online, stack.enrol(online))
    peer.on_command("ping", _ok)
    await peer.connect()
    later = await command(http, headers, online, "ping", expires_in_s=60)
    await command_status(http, headers, later["command_id"], "succeeded")
    await peer.disconnect()
    assert (await get_json(http, f"/commands/{created['command_id']}", headers))["command"]["status"] == "queued"

    calls: list[dict[str, Any]] = []

    async def reboot(params: dict[str, Any]) -> dict[str, Any]:
        calls.append(params)
        return {"rebooted": True}

    client = stack.device(tenant, device, context)
    client.on_command("reboot", reboot)
    await client.connect()
    detail = await command_status(http, headers, created["command_id"], "succeeded")
    assert detail["command"]["result"] == {"rebooted": True}
    assert calls == [{"delay": 1}]
    assert [e["event"] for e in detail["events"]] == ["queued", "sent", "delivered", "succeeded"]
    command_row = detail["command"]
    assert command_row["sent_at"] <= command_row["delivered_at"] <= command_row["completed_at"]
    await eventually(lambda: _true(len(events) >= 4), what="command events on NATS")
    assert [e["event"] for e in events][:4] == ["queued", "sent", "delivered", "succeeded"]
    await client.disconnect()
    await nc.close()


@pytest.mark.asyncio
async def test_commands_expire_time_out_and_cancel_with_exactly_one_end(stack: Stack, http: httpx.AsyncClient) -> None:
    tenant, headers = stack.tenant()
    offline, silent = new_id(), new_id()
    for device in (offline, silent):
        await register(http, headers, device)
    stack.enrol(offline)
    never = await command(http, headers, offline, "ping", expires_in_s=2)
    detail = await command_status(http, headers, never["command_id"], "expired")
    assert [e["event"] for e in detail["events"]] == ["queued", "expired"]

    started = asyncio.Event()

    async def hang(params: dict[str, Any]) -> None:
        started.set()
        await asyncio.sleep(3600)

    client = stack.device(tenant, silent, stack.enrol(silent))
    client.on_command("hang", hang)
    await client.connect()
    hung = await command(http, headers, silent, "hang", timeout_s=2)
    detail = await command_status(http, headers, hung["command_id"], "timed_out")
    assert [e["event"] for e in detail["events"]][:3] == ["queued", "sent", "delivered"]
    assert started.is_set()

    queued = await command(http, headers, offline, "ping", expires_in_s=600)
    response = await http.post(f"/commands/{queued['command_id']}/cancel", headers=headers)
    assert response.status_code == 200 and response.json()["command"]["status"] == "cancelled"
    again = await http.post(f"/commands/{queued['command_id']}/cancel", headers=headers)
    assert again.status_code == 409
    await client.disconnect()


async def dispenser(
    stack: Stack, http: httpx.AsyncClient, kind: type[C], **options: Any
) -> tuple[str, dict[str, str], str, C, list[int]]:
    """A new tenant's enrolled device on a ``kind`` client, connected, that runs ``dispense`` and records each run:
    (tenant, API headers, device, client, the runs)."""
    tenant, headers, device, context = await enrolled_device(stack, http)
    client = kind(tenant, device, "127.0.0.1", stack.auth.mtls_port, ssl=context, **options)
    runs: list[int] = []

    async def dispense(params: dict[str, Any]) -> int:
        runs.append(params["ml"])
        return len(runs)

    client.on_command("dispense", dispense)
    await client.connect()
    return tenant, headers, device, client, runs


class LossyDevice(DeviceClient):
    """Loses the answers to the first delivery of every command (as if the uplink dropped them)."""

    lose = 2

    def _publish_response(self, topic: str, body: CommandResponse, correlation: bytes | None) -> None:
        if self.lose > 0:
            self.lose -= 1
            return
        super()._publish_response(topic, body, correlation)


@pytest.mark.asyncio
async def test_a_lost_acknowledgement_is_retried_and_executed_once(stack: Stack, http: httpx.AsyncClient) -> None:
    tenant, headers, device, client, runs = await dispenser(stack, http, LossyDevice, will_delay_s=WILL_DELAY_S)
    created = await command(http, headers, device, "dispense", params={"ml": 50}, timeout_s=30)
    detail = await command_status(http, headers, created["command_id"], "succeeded")
    assert runs == [50]  # executed once, although delivered more than once
    assert detail["command"]["attempts"] >= 2 and detail["command"]["result"] == 1
    events = [e["event"] for e in detail["events"]]
    assert "retry" in events and events.count("succeeded") == 1

    # A replayed or late answer changes nothing: exactly one terminal state.
    assert client.client is not None
    response_topic = f"v1/{tenant}/d/{device}/cmd-res/{created['command_id']}"
    client.client.publish(response_topic, json.dumps({"status": "failed", "error": "late"}).encode(), qos=1)

    async def recorded() -> bool:
        events = (await get_json(http, f"/commands/{created['command_id']}", headers))["events"]
        return any(e["event"] == "late_response" for e in events)

    await eventually(recorded, what="the late answer to be recorded")
    final = await get_json(http, f"/commands/{created['command_id']}", headers)
    assert final["command"]["status"] == "succeeded" and final["command"]["result"] == 1
    await client.disconnect()


class LosesFinalAnswers(DeviceClient):
    """Says ``delivered``, runs the command, and loses its final answer while ``losing`` (as when the connection or the
    broker dies with the answer in flight); records every command that reaches it."""

    losing = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.received: list[dict[str, Any]] = []

    def _publish_response(self, topic: str, body: CommandResponse, correlation: bytes | None) -> None:
        if not (self.losing and body.status != "delivered"):
            super()._publish_response(topic, body, correlation)

    async def _command(self, name: str, payload: bytes, properties: dict[str, Any]) -> None:
        self.received.append(json.loads(payload))
        await super()._command(name, payload, properties)


@pytest.mark.asyncio
async def test_an_answer_lost_with_the_connection_is_asked_for_again_and_never_runs_the_command_twice(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    tenant, headers, device, client, runs = await dispenser(stack, http, LosesFinalAnswers, will_delay_s=60)
    created = await command(http, headers, device, "dispense", params={"ml": 50}, timeout_s=60)
    await command_status(http, headers, created["command_id"], "delivered")
    await eventually(lambda: asyncio.sleep(0, runs == [50]), what="the command to run")
    client.losing = False
    client.drop()  # its answer is gone with the connection; it connects again, remembering what it ran
    await client.connect()
    detail = await command_status(http, headers, created["command_id"], "succeeded")
    assert runs == [50] and detail["command"]["result"] == 1
    events = [e["event"] for e in detail["events"]]
    assert "answer_requested" in events and events.count("succeeded") == 1
    assert [r.get("answer_only", False) for r in client.received] == [False, True]

    # A device that restarted (no memory of what it ran) is asked too, and does not run the command again: the
    # command times out, the honest outcome when nobody can tell whether it ran.
    client.losing = True
    second = await command(http, headers, device, "dispense", params={"ml": 70}, timeout_s=8)
    await command_status(http, headers, second["command_id"], "delivered")
    await eventually(lambda: asyncio.sleep(0, runs == [50, 70]), what="the second command to run")
    client.drop()
    restarted = LosesFinalAnswers(tenant, device, "127.0.0.1", stack.auth.mtls_port, ssl=client.ssl, will_delay_s=60)
    restarted.on_command("dispense", client.commands["dispense"])
    await restarted.connect()
    await eventually(lambda: asyncio.sleep(0, len(restarted.received) == 1), what="the restarted device to be asked")
    assert restarted.received[0]["request_id"] == second["command_id"] and restarted.received[0]["answer_only"]
    detail = await command_status(http, headers, second["command_id"], "timed_out", timeout=20)
    assert runs == [50, 70]
    await restarted.disconnect()


@pytest.mark.asyncio
async def test_mqtt_311_device_answers_with_the_request_id_in_the_topic(stack: Stack, http: httpx.AsyncClient) -> None:
    tenant, headers, device, context = await enrolled_device(stack, http)
    client = stack.device(tenant, device, context, protocol=4)

    async def version(params: dict[str, Any]) -> str:
        return "3.1.1"

    client.on_command("version", version)
    await client.connect()
    created = await command(http, headers, device, "version")
    detail = await command_status(http, headers, created["command_id"], "succeeded")
    assert detail["command"]["result"] == "3.1.1"
    presence = await get_json(http, f"/devices/{device}/presence", headers)
    assert presence["protocol"] == 4
    await client.disconnect()


# ---------------------------------------------------------------------------------------------- isolation


@pytest.mark.asyncio
async def test_a_device_cannot_touch_another_devices_shadow_or_commands(stack: Stack, http: httpx.AsyncClient) -> None:
    tenant, headers = stack.tenant()
    mallory, victim = new_id("mallory"), new_id("victim")
    for device in (mallory, victim):
        await register(http, headers, device)
    victim_context = stack.enrol(victim)
    attacker = stack.raw(mallory, stack.enrol(mallory))
    await attacker.connect()
    base = f"v1/{tenant}/d/{victim}"
    for topic_filter in (f"{base}/state/desired", f"{base}/cmd/+", f"{base}/cmd-res/+", f"v1/{tenant}/d/+/cmd/+"):
        assert await attacker.subscribe(topic_filter) >= 0x80, topic_filter
    await attacker.publish(f"{base}/state/reported", b'{"state": {"owned": true}}')  # dropped by the broker ACL

    pending = await command(http, headers, victim, "unlock", expires_in_s=600)
    # Answering the victim's command from its own topic with the victim's request id is refused.
    await attacker.publish(f"v1/{tenant}/d/{mallory}/cmd-res/{pending['command_id']}", b'{"status": "succeeded"}')
    # The control: mallory's own report, sent after, on the same connection and devicesvc queue, is applied; the
    # forged answer had been handled by then.
    await attacker.publish(f"v1/{tenant}/d/{mallory}/state/reported", b'{"state": {"mine": true}}')

    async def own_report_applied() -> bool:
        return (await get_json(http, f"/devices/{mallory}/shadow", headers))["reported"] == {"mine": True}

    await eventually(own_report_applied, what="the attacker's own report (the control)")
    detail = await get_json(http, f"/commands/{pending['command_id']}", headers)
    assert detail["command"]["status"] == "queued" and [e["event"] for e in detail["events"]] == ["queued"]
    shadow = await get_json(http, f"/devices/{victim}/shadow", headers)
    assert shadow["reported"] == {}
    await attacker.close()

    # The victim itself still works, and another tenant sees none of it.
    client = stack.device(tenant, victim, victim_context)
    client.on_command("unlock", _ok)
    await client.connect()
    await command_status(http, headers, pending["command_id"], "succeeded")
    await client.disconnect()
    _, other = stack.tenant()
    for path in (f"/devices/{victim}/shadow", f"/devices/{victim}/presence", f"/devices/{victim}/commands",
                 f"/commands/{pending['command_id']}", f"/devices/{victim}/connections"):  # fmt: skip
        assert (await http.get(path, headers=other)).status_code == 404, path
    assert (await http.post(f"/commands/{pending['command_id']}/cancel", headers=other)).status_code == 404
    response = await http.patch(f"/devices/{victim}/shadow", json={"desired": {"x": 1}}, headers=other)
    assert response.status_code == 404
    assert (await http.post(f"/devices/{victim}/commands", json={"name": "x"}, headers=other)).status_code == 404


async def _ok(params: dict[str, Any]) -> str:
    return "ok"


# ------------------------------------------------------------------------------------------- provisioning


@pytest.mark.asyncio
async def test_jit_provisioning_issues_exactly_the_claims_uses(stack: Stack, http: httpx.AsyncClient) -> None:
    tenant, headers = stack.tenant()
    assert (await http.post("/groups", json={"group_id": "field"}, headers=headers)).status_code == 201
    response = await http.post(
        "/provisioning-claims", json={"max_uses": 3, "group_id": "field", "tags": ["jit"]}, headers=headers
    )
    assert response.status_code == 201, response.text
    token = response.json()["token"]
    devices = [new_id("jit") for _ in range(6)]
    keys = {d: new_device_key(d) for d in devices}
    context = stack.tls()

    async def attempt(device: str) -> ProvisionGranted | str:
        try:
            return await provision(tenant, token, device, "127.0.0.1", stack.auth.jwt_port, context, keys[device][1])
        except ProvisioningRefused as exc:
            return exc.error
        except (TimeoutError, MqttError, OSError) as exc:
            return f"refused at connect: {exc!r}"

    results = await asyncio.gather(*[attempt(d) for d in devices])
    issued = {d: r for d, r in zip(devices, results, strict=True) if isinstance(r, ProvisionGranted)}
    assert len(issued) == 3, results
    assert all(isinstance(r, str) for r in results if not isinstance(r, ProvisionGranted))
    claims = await get_json(http, "/provisioning-claims", headers)
    assert claims[0]["used"] == 3

    # A provisioned device reconnects as itself, in the claim's group and with its tags.
    device, answer = next(iter(issued.items()))
    folder = stack.root / "jit"
    folder.mkdir(exist_ok=True)
    (folder / "d.key").write_bytes(keys[device][0])
    (folder / "d.crt").write_text(answer.chain)
    client = stack.device(tenant, device, stack.tls(folder / "d.crt", folder / "d.key"))
    await client.connect()
    shown = await get_json(http, f"/devices/{device}", headers)
    assert shown["tags"] == ["jit"]
    grouped = await get_json(http, "/devices?group=field", headers)
    assert sorted(d["device_id"] for d in grouped["items"]) == sorted(issued)
    await client.disconnect()

    # An exhausted claim no longer even connects; a wrong secret never did.
    late = new_id("jit")
    outcome = await attempt_with(stack, tenant, token, late, context)
    assert outcome.startswith("refused at connect")
    forged = token[:-4] + "AAAA"
    assert (await attempt_with(stack, tenant, forged, new_id("jit"), context)).startswith("refused at connect")


async def attempt_with(stack: Stack, tenant: str, token: str, device: str, context: ssl.SSLContext) -> str:
    try:
        await provision(tenant, token, device, "127.0.0.1", stack.auth.jwt_port, context, new_device_key(device)[1])
    except ProvisioningRefused as exc:
        return exc.error
    except Exception as exc:  # noqa: BLE001 - every connect failure is the expected outcome here
        return f"refused at connect: {exc!r}"
    return "issued"


@pytest.mark.asyncio
async def test_bad_device_messages_are_dead_lettered_with_a_reason_and_nothing_else_is_lost(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    tenant, headers, device, context = await enrolled_device(stack, http)
    raw = stack.raw(device, context)
    await raw.connect()
    base = f"v1/{tenant}/d/{device}"
    bad = {
        "bad_json": (f"{base}/state/reported", b"not json"),
        "bad_report": (f"{base}/state/reported", b'{"state": [1]}'),
        "shadow_too_large": (f"{base}/state/reported", json.dumps({"state": {"blob": "x" * 20_000}}).encode()),
        "unknown_command": (f"{base}/cmd-res/c{'0' * 24}", b'{"status": "succeeded"}'),
        "bad_command_response": (f"{base}/cmd-res/c{'1' * 24}", b'{"status": "done"}'),
        "bad_status": (f"{base}/status", b'"sleeping"'),
    }
    for topic, payload in bad.values():
        await raw.publish(topic, payload)
    await raw.publish(f"{base}/state/reported", b'{"state": {"ok": 1}}')  # good input after bad input still applies

    async def applied() -> bool:
        return bool((await get_json(http, f"/devices/{device}/shadow", headers))["reported"] == {"ok": 1})

    await eventually(applied, what="the good report after the bad ones")
    await raw.close()
    nc = await nats.connect(stack.nats_url)
    js = nc.jetstream()
    subscription = await js.subscribe("dlq.twin.>", ordered_consumer=True)
    reasons: dict[str, str] = {}
    deadline = time.monotonic() + 15
    while len(reasons) < len(bad) and time.monotonic() < deadline:
        try:
            message = await subscription.next_msg(timeout=1)
        except nats.errors.TimeoutError:
            continue
        if (message.headers or {}).get("Kestrel-Topic", "").startswith(base):
            reasons[message.headers["Kestrel-Reason"]] = message.subject  # type: ignore[index]
    await nc.close()
    assert reasons == {reason: f"dlq.twin.{reason}" for reason in bad}


@pytest.mark.asyncio
async def test_devicesvc_killed_mid_stream_loses_no_report(stack: Stack, http: httpx.AsyncClient) -> None:
    """SIGKILL devicesvc while a device reports: its persistent session keeps what was not acknowledged, the
    restarted service stores every report once (a redelivered one changes nothing), and the state is the last.
    On its way up it prunes history past retention, and only that."""
    tenant, headers, device, context = await enrolled_device(stack, http)
    client = stack.device(tenant, device, context)
    await client.connect()
    count = 600
    for n in range(count):
        await client.report({"n": n}, shadow="stream")
        if n == count // 3:
            stack.processes["devicesvc"].kill()
        if n % 50 == 49:
            await asyncio.sleep(0.05)
    old_command = f"c{uuid.uuid4().hex[:24]}"
    with psycopg.connect(stack.url) as conn:  # history past retention (30 days), pruned when devicesvc starts
        conn.execute(
            "INSERT INTO shadow_history (tenant_id, device_id, name, version, side, patch, actor, at)"
            " VALUES (%s, %s, 'stream', 0, 'reported', '{}', 'old', now() - interval '40 days')",
            (tenant, device),
        )
        conn.execute(
            "INSERT INTO device_connections (tenant_id, device_id, node, connected_ms, connected_at, disconnected_at)"
            " VALUES (%s, %s, 'old', 1, now() - interval '41 days', now() - interval '40 days')",
            (tenant, device),
        )
        conn.execute(
            "INSERT INTO commands (command_id, tenant_id, device_id, name, status, timeout_s, expires_at,"
            " completed_at) VALUES (%s, %s, %s, 'old', 'succeeded', 30, now(), now() - interval '40 days')",
            (old_command, tenant, device),
        )
        conn.execute(
            "INSERT INTO command_events (tenant_id, command_id, event) VALUES (%s, %s, 'succeeded')",
            (tenant, old_command),
        )
    stack.processes["devicesvc"].start()
    assert wait_until(lambda: _log(stack.root, "devicesvc").count("devicesvc connected") >= 2, 30)
    assert wait_until(lambda: "history pruned" in _log(stack.root, "devicesvc"), 30)
    with psycopg.connect(stack.url) as conn:
        assert conn.execute("SELECT count(*) FROM shadow_history WHERE actor = 'old'").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM device_connections WHERE node = 'old'").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM commands WHERE command_id = %s", (old_command,)).fetchone() == (0,)
        recent = conn.execute("SELECT count(*) FROM device_connections WHERE device_id = %s", (device,)).fetchone()
        assert recent is not None and recent[0] >= 1  # the current connection's row is kept

    async def stored() -> bool:
        shadow = await get_json(http, f"/devices/{device}/shadows/stream", headers)
        return bool(shadow["reported"].get("n") == count - 1)

    await eventually(stored, timeout=60, what="the last report after the restart")
    with psycopg.connect(stack.url) as conn:
        rows = conn.execute(
            "SELECT count(*), count(DISTINCT patch->>'n') FROM shadow_history WHERE device_id = %s AND name = 'stream'",
            (device,),
        ).fetchone()
    assert rows == (count, count)  # every report once: none lost, none stored twice
    await client.disconnect()
