"""Device identity at the broker, end to end: real Mosquitto with our plugin, real authsvc, real TLS, real
clients (mosquitto_pub/sub and the platform's own MQTT client). Attacked as an attacker would.

The stack: an isolated database with its own root CA; authsvc (``python -m authsvc``) with the kicker;
Mosquitto with the plugin, an mTLS listener, a TLS+JWT listener and the loopback development listener.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from kestrel.db import registry
from kestrel.mqttlite import MqttError, MqttPublisher
from kestrel.servers import BrokerAuth, MosquittoServer, PostgresServer, free_port, http_ok
from pki import x509 as px
from pki.builtin import BuiltinCA
from tests.conftest import ServiceProcess, isolated_database, wait_until

pytestmark = pytest.mark.e2e
PASSPHRASE = "broker-test-" + uuid.uuid4().hex
NOT_AUTHORIZED = 0x87
SUBACK_REFUSED = 0x87


@dataclass
class Stack:
    url: str
    root: Path
    authsvc: ServiceProcess
    broker: MosquittoServer
    auth: BrokerAuth
    authsvc_port: int
    ca: BuiltinCA = field(init=False)

    def __post_init__(self) -> None:
        self.ca = BuiltinCA(self.url, PASSPHRASE)

    def tenant(self, devices: int = 2) -> tuple[str, list[str]]:
        tag = uuid.uuid4().hex[:8]
        tenant, ids = f"t-{tag}", [f"d-{tag}-{i}" for i in range(devices)]
        registry.create_tenant(self.url, tenant)
        registry.create_devices(self.url, tenant, ids)
        self.ca.create_tenant_ca(tenant, "test")
        return tenant, ids

    def issue(self, device: str) -> tuple[Path, Path, str]:
        """The CLI's development issuance path: key + full-chain certificate files; returns the serial."""
        out = self.root / "devices"
        result = subprocess.run(
            [sys.executable, "-m", "kestrel", "pki", "issue", device, "--out-dir", str(out), "--days", "30"],
            env=os.environ | {"KESTREL_DATABASE_URL": self.url, "KESTREL_PKI_PASSPHRASE": PASSPHRASE},
            capture_output=True,
            text=True,
            check=True,
        )
        serial = result.stdout.split("serial ")[1].split(",")[0]
        return out / f"{device}.crt", out / f"{device}.key", serial

    def tls(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.auth.ca_file))
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key))
        return ctx

    def client(self, client_id: str, *, port: int | None = None, **kwargs: Any) -> MqttPublisher:
        return MqttPublisher("127.0.0.1", port or self.auth.mtls_port, client_id, **kwargs)

    def start_authsvc(self) -> None:
        self.authsvc.start()
        assert wait_until(lambda: http_ok(f"http://127.0.0.1:{self.authsvc_port}/healthz"), 30), "authsvc down"


@pytest.fixture(scope="module")
def stack(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("secure-broker")
    url = isolated_database(postgres, "broker")
    ca = BuiltinCA(url, PASSPHRASE)
    ca.init_root("test")
    cert_pem, key_pem = ca.issue_server(["localhost"], ["127.0.0.1"], 30, "test")
    (root / "server.crt").write_text(cert_pem)
    (root / "server.key").write_text(key_pem)
    (root / "ca.pem").write_text(ca.root_pem())
    control_secret = registry.create_service_principal(url, "authsvc", "control")
    broker_key = "bk-" + uuid.uuid4().hex
    plain, authsvc_port = free_port(), free_port()
    auth = BrokerAuth(
        authn_url=f"http://127.0.0.1:{authsvc_port}/mqtt/authn",
        broker_key=broker_key,
        server_cert=root / "server.crt",
        server_key=root / "server.key",
        ca_file=root / "ca.pem",
        mtls_port=free_port(),
        jwt_port=free_port(),
    )
    authsvc = ServiceProcess(
        name="authsvc",
        log_path=root / "authsvc.log",
        argv=[sys.executable, "-m", "authsvc"],
        env=os.environ
        | {
            "KESTREL_DATABASE_URL": url,
            "KESTREL_AUTHSVC_PORT": str(authsvc_port),
            "KESTREL_AUTHSVC_BROKER_KEY": broker_key,
            "KESTREL_AUTHSVC_KICK_MQTT_PORT": str(plain),
            "KESTREL_AUTHSVC_KICK_USERNAME": "authsvc",
            "KESTREL_AUTHSVC_KICK_PASSWORD": control_secret,
        },
    )
    broker = MosquittoServer(name="mosquitto-auth", log_path=root / "mosquitto.log", root=root / "mq", port=plain, auth=auth)
    s = Stack(url, root, authsvc, broker, auth, authsvc_port)
    s.start_authsvc()
    broker.start()
    yield s
    broker.stop()
    authsvc.stop()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def connected(client: MqttPublisher) -> MqttPublisher:
    await client.connect(connect_timeout=10)
    return client


async def refused(client: MqttPublisher) -> str:
    """Connect and return how it was refused (CONNACK code or TLS failure); fails if it got in."""
    try:
        await client.connect(connect_timeout=10)
    except MqttError as exc:
        return f"connack {exc.reason_code:#x}"
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError) as exc:
        return f"tls {type(exc).__name__}"
    await client.close()
    pytest.fail(f"{client.client_id} was admitted")


# ---------------------------------------------------------------------------------------------- admitted


def test_device_enrolled_by_cli_publishes_with_mosquitto_pub_and_the_backend_receives(stack: Stack) -> None:
    tenant, (device, _) = stack.tenant()
    crt, key, _ = stack.issue(device)
    ingest_secret = registry.create_service_principal(stack.url, f"ingest-{uuid.uuid4().hex[:6]}", "ingest")
    name = next(
        row[0]
        for row in psycopg.connect(stack.url).execute(
            "SELECT name FROM service_principals WHERE role = 'ingest' ORDER BY created_at DESC LIMIT 1"
        )
    )

    async def scenario() -> tuple[str, bytes]:
        backend = await connected(
            stack.client(f"svc:{name}:t1", port=stack.broker.port, username=name, password=ingest_secret)
        )
        assert await backend.subscribe("$share/ingest/v1/+/d/+/telemetry", 1) == 1
        pub = await asyncio.create_subprocess_exec(
            "mosquitto_pub", "-h", "127.0.0.1", "-p", str(stack.auth.mtls_port), "-V", "mqttv5", "-q", "1",
            "--cafile", str(stack.auth.ca_file), "--cert", str(crt), "--key", str(key), "-i", device,
            "-t", f"v1/{tenant}/d/{device}/telemetry", "-m", '{"temp": 21.5}',
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await pub.communicate()
        assert pub.returncode == 0, err.decode()
        got = await asyncio.wait_for(backend.received.get(), 10)
        await backend.close()
        return got

    topic, payload = run(scenario())
    assert topic == f"v1/{tenant}/d/{device}/telemetry"
    assert json.loads(payload) == {"temp": 21.5}
