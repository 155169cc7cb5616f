"""The production path as real processes, for tests that inject faults into it.

Devices authenticate over mTLS through our Mosquitto plugin (authsvc decides every CONNECT); every backend service
connects as its own principal; PostgreSQL, NATS JetStream and the broker are the servers the fixtures started.
Each service can be killed (SIGKILL), stopped and started again; the broker too, keeping its persistence.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import jwt
import psycopg
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from kestrel.devtools import seed
from kestrel.devtools.servers import BrokerAuth, MosquittoServer, NatsServer, PostgresServer, free_port, http_ok
from kestrel.runtime.mqttclient import MqttError, MqttPublisher
from kestrel_core.topics import DEVICE_UPLINK_FILTERS, TELEMETRY_FILTERS
from kestrel_device.client import new_device_key
from pki.builtin import BuiltinCA
from tests.balancer import Balancer, balancer
from tests.conftest import (
    ServiceProcess,
    _nats,
    api_url_for,
    isolated_database,
    platform_url_for,
    scrape,
    wait_until,
)

PASSPHRASE = "prod-" + uuid.uuid4().hex
ADMIN = "kpa_prod_" + uuid.uuid4().hex


async def connect_outcome(client: MqttPublisher) -> int | str:
    """Connect and tell how it went: 0 when admitted (the client is closed again), the CONNACK reason code when
    refused, ``"tls <error>"`` when the TLS handshake failed."""
    try:
        await client.connect(connect_timeout=10)
    except MqttError as exc:
        return exc.reason_code
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError) as exc:
        return f"tls {type(exc).__name__}"
    await client.close()
    return 0


def gate_for(services: tuple[str, ...]) -> tuple[str, ...]:
    """The plugin's subscription gate for these services: what they consume must be subscribed first."""
    return (
        *(TELEMETRY_FILTERS if "bridge" in services else ()),
        *(DEVICE_UPLINK_FILTERS if "devicesvc" in services else ()),
    )


@dataclass
class ProdStack:
    root: Path
    postgres: PostgresServer
    url: str
    nats: NatsServer
    ca: BuiltinCA
    auth: BrokerAuth
    broker: MosquittoServer
    secrets: dict[str, str]
    ports: dict[str, int]
    processes: dict[str, ServiceProcess] = field(default_factory=dict)
    #: The serial of the certificate each enrolled device holds.
    serials: dict[str, str] = field(default_factory=dict)
    #: authsvc replicas sit behind a load balancer on ports["authsvc"] (prod_stack(..., replicas=2)).
    balanced: bool = False
    lb: Balancer | None = None
    #: More environment per service name (e.g. the rule workers' SMTP relay), applied at every (re)start.
    extra_env: dict[str, dict[str, str]] = field(default_factory=dict)

    # ---------------------------------------------------------------------------------- tenants, devices

    def tenant(self, devices: int = 0, prefix: str = "p") -> tuple[str, list[str]]:
        tag = uuid.uuid4().hex[:8]
        tenant, ids = f"{prefix}-{tag}", [f"{prefix}-{tag}-{i}" for i in range(devices)]
        seed.create_tenant(self.url, tenant)
        seed.create_devices(self.url, tenant, ids)
        self.ca.create_tenant_ca(tenant, "test")
        return tenant, ids

    def enrol(self, device: str) -> ssl.SSLContext:
        """A key made on the 'device', its CSR signed by its tenant's CA; the TLS context it connects with."""
        key_pem, csr_pem = new_device_key(device)
        issued = self.ca.sign_csr(csr_pem, device, 30, "test")
        self.serials[device] = issued.serial
        folder = self.root / "devices"
        folder.mkdir(exist_ok=True)
        (folder / f"{device}.key").write_bytes(key_pem)
        (folder / f"{device}.crt").write_text(issued.full_chain_pem)
        return self.tls(folder / f"{device}.crt", folder / f"{device}.key")

    def jwt(self, tenant: str, device: str, lifetime_s: int = 3600) -> tuple[str, str]:
        """A key registered for the device (Ed25519) and a token it signed: (the key's kid, the token)."""
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        kid = seed.add_jwt_key(self.url, tenant, pem, device=device)
        now = int(time.time())
        claims = {"aud": "kestrel-mqtt", "iat": now, "exp": now + lifetime_s, "iss": tenant, "sub": device}
        return kid, jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": kid})

    def tls(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.auth.ca_file))
        if cert is not None:
            context.load_cert_chain(str(cert), str(key))
        return context

    def stored(self, tenant: str) -> list[tuple[str, int]]:
        with psycopg.connect(self.url) as conn:
            return conn.execute("SELECT device_id, seq FROM telemetry WHERE tenant_id = %s", (tenant,)).fetchall()

    # ----------------------------------------------------------------------------------------- services

    @staticmethod
    def _split(key: str) -> tuple[str, int]:
        """``devicesvc-2`` -> (``devicesvc``, 2); ``devicesvc`` -> (``devicesvc``, 1)."""
        name, _, replica = key.rpartition("-")
        return (name, int(replica)) if name and replica.isdigit() else (key, 1)

    def _port(self, key: str) -> int:
        """The HTTP port of a process (metrics or API); authsvc replicas behind the balancer have their own."""
        name, replica = self._split(key)
        if name == "authsvc":
            key = f"authsvc-{replica}" if self.balanced else "authsvc"
        if key not in self.ports:
            self.ports[key] = free_port()
        return self.ports[key]

    def _env(self, key: str) -> dict[str, str]:
        plain, nats_url = str(self.broker.port), self.nats.url
        name, replica = self._split(key)
        port = str(self._port(key))

        def principal(prefix: str, user: str) -> dict[str, str]:
            return {
                f"KESTREL_{prefix}_MQTT_PORT": plain,
                f"KESTREL_{prefix}_CLIENT_ID": f"svc:{user}:{replica}",
                f"KESTREL_{prefix}_MQTT_USERNAME": user,
                f"KESTREL_{prefix}_MQTT_PASSWORD": self.secrets[user],
            }

        base = {"KESTREL_DATABASE_URL": self.url, "PYTHONUNBUFFERED": "1"}
        specific = {
            "authsvc": {
                "KESTREL_AUTHSVC_PORT": port,
                "KESTREL_AUTHSVC_BROKER_KEY": self.auth.broker_key,
                "KESTREL_AUTHSVC_KICK_MQTT_PORT": plain,
                "KESTREL_AUTHSVC_KICK_USERNAME": "authsvc",
                "KESTREL_AUTHSVC_KICK_PASSWORD": self.secrets["authsvc"],
            },
            "bridge": principal("BRIDGE", "ingest")
            | {"KESTREL_BRIDGE_NATS_URL": nats_url, "KESTREL_BRIDGE_METRICS_PORT": port},
            "writer": {"KESTREL_WRITER_NATS_URL": nats_url, "KESTREL_WRITER_METRICS_PORT": port},
            "devicesvc": principal("DEVICES", "devicesvc")
            | {
                "KESTREL_DEVICES_NATS_URL": nats_url,
                "KESTREL_DEVICES_METRICS_PORT": port,
                "KESTREL_DEVICES_PRESENCE_GRACE_S": "8",
                "KESTREL_DEVICES_RETRY_BASE_S": "0.5",
                "KESTREL_DEVICES_SCAN_INTERVAL_S": "0.2",
            },
            "provisioner": principal("PROVISIONER", "provisioner")
            | {"KESTREL_PKI_PASSPHRASE": PASSPHRASE, "KESTREL_PROVISIONER_METRICS_PORT": port},
            "rules": principal("RULES", "rules")
            | {
                "KESTREL_RULES_NATS_URL": nats_url,
                "KESTREL_RULES_METRICS_PORT": port,
                "KESTREL_RULES_WORKER": key,
                "KESTREL_RULES_PARTITIONS": "4",
                "KESTREL_RULES_REBALANCE_INTERVAL_S": "0.5",
                "KESTREL_RULES_DELIVERY_BACKOFF_S": "0.2",
                "KESTREL_RULES_DELIVERY_BACKOFF_CAP_S": "1",
                "KESTREL_RULES_DELIVERY_TIMEOUT_S": "2",
                "KESTREL_RULES_DIGEST_WINDOW_S": "6",  # tests/e2e/test_rules.py's storm crosses a clock window
                # Few slots, so that every notification test also runs with all of them busy.
                "KESTREL_RULES_DELIVERY_CONCURRENCY": "4",
                "KESTREL_RULES_WEBHOOK_ALLOW_PRIVATE": "true",
            },
            "api": {
                "KESTREL_API_DATABASE_URL": api_url_for(self.postgres, self.url),
                "KESTREL_API_PLATFORM_DATABASE_URL": platform_url_for(self.postgres, self.url),
                "KESTREL_API_PORT": port,
                "KESTREL_API_ADMIN_TOKEN": ADMIN,
                "KESTREL_API_NATS_URL": nats_url,
            },
        }[name]
        return dict(os.environ) | base | specific | self.extra_env.get(name, {})

    _ARGV = {
        "authsvc": ["-m", "authsvc"],
        "bridge": ["-m", "ingest", "bridge"],
        "writer": ["-m", "ingest", "writer"],
        "devicesvc": ["-m", "devicesvc"],
        "provisioner": ["-m", "pki", "provisioner"],
        "api": ["-m", "api"],
        "rules": ["-m", "rules"],
    }

    def start(self, key: str) -> ServiceProcess:
        """Start (or start again) process ``key``: a service name, or ``name-N`` for its N-th replica (its own client
        id ``svc:{principal}:N`` and ports)."""
        process = self.processes.get(key)
        if process is None:
            argv = [sys.executable, *self._ARGV[self._split(key)[0]]]
            process = ServiceProcess(name=key, log_path=self.root / f"{key}.log", argv=argv, env={})
            self.processes[key] = process
        process.env = self._env(key)
        process.start()
        self.wait_ready(key)
        return process

    def wait_ready(self, key: str, timeout: float = 30.0) -> None:
        name, _ = self._split(key)
        url = f"http://127.0.0.1:{self._port(key)}"
        checks = {
            "authsvc": lambda: http_ok(f"{url}/healthz"),
            "api": lambda: http_ok(f"{url}/healthz"),
            "bridge": lambda: http_ok(f"{url}/metrics"),
            "writer": lambda: http_ok(f"{url}/metrics"),
            "devicesvc": lambda: "devicesvc connected" in self.log(key),
            "provisioner": lambda: "provisioner connected" in self.log(key),
            "rules": lambda: http_ok(f"{url}/metrics") and "partition owned" in self.log(key),
        }
        assert wait_until(checks[name], timeout), f"{key} not ready: {self.log(key)[-800:]}"

    def kill(self, name: str) -> None:
        self.processes[name].kill()

    def stop(self, name: str) -> None:
        self.processes[name].stop(signal.SIGTERM, timeout=20)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def balancer_served(self) -> dict[int, int]:
        """Connections the load balancer handed to each authsvc replica (by its port)."""
        assert self.lb is not None, "no balancer: start the stack with replicas > 1"
        return dict(self.lb.served)

    def metric(self, key: str, family: str, **labels: str) -> float:
        return scrape(self._port(key), family, **labels)

    # ------------------------------------------------------------------------------------------- broker

    def restart_broker(self, sig: int = signal.SIGTERM) -> None:
        """Stop Mosquitto with ``sig`` (SIGTERM saves its persistence; SIGKILL does not) and start it again on the
        same ports and persistence directory."""
        self.broker.send_signal(sig)
        assert self.broker.proc is not None
        self.broker.proc.wait(30)
        self.broker.stop()
        self.broker.start()


@contextmanager
def prod_stack(
    postgres: PostgresServer,
    nats: NatsServer,
    root: Path,
    *,
    services: tuple[str, ...] = ("authsvc", "bridge", "writer"),
    gate: tuple[str, ...] | None = None,
    replicas: int = 1,
    extra_env: dict[str, dict[str, str]] | None = None,
) -> Iterator[ProdStack]:
    """A database of its own, a CA, the secured broker and ``services``; the broker's subscription gate is what those
    services consume unless ``gate`` says otherwise (``()``: no gate). With ``replicas`` > 1 every service runs that
    many times (``name``, ``name-2``, ...), authsvc's replicas behind a load balancer as a Kubernetes Service would;
    ``extra_env`` adds variables per service."""
    url = isolated_database(postgres, "prod")
    ca = BuiltinCA(url, PASSPHRASE)
    ca.init_root("test")
    cert_pem, key_pem = ca.issue_server(["localhost"], ["127.0.0.1"], 30, "test")
    (root / "server.crt").write_text(cert_pem)
    (root / "server.key").write_text(key_pem)
    (root / "ca.pem").write_text(ca.root_pem())
    roles = {"authsvc": "control", "ingest": "ingest", "devicesvc": "devices", "provisioner": "provisioning",
             "rules": "rules"}  # fmt: skip
    secrets = {name: seed.create_service_principal(url, name, role) for name, role in roles.items()}
    ports = {name: free_port() for name in ("authsvc", "api", "bridge", "writer", "devicesvc")}
    auth = BrokerAuth(
        authn_url=f"http://127.0.0.1:{ports['authsvc']}/mqtt/authn",
        broker_key="bk-" + uuid.uuid4().hex,
        server_cert=root / "server.crt",
        server_key=root / "server.key",
        ca_file=root / "ca.pem",
        mtls_port=free_port(),
        jwt_port=free_port(),
        require_subscriptions=gate_for(services) if gate is None else gate,
    )
    broker = MosquittoServer(
        name="mosquitto", log_path=root / "mosquitto.log", root=root / "mq", port=free_port(), auth=auth
    )
    stack = ProdStack(root, postgres, url, nats, ca, auth, broker, secrets, ports, balanced=replicas > 1,
                      extra_env=extra_env or {})  # fmt: skip
    keys = {name: [name, *(f"{name}-{n}" for n in range(2, replicas + 1))] for name in services}
    with ExitStack() as cleanup:
        if stack.balanced:
            backends = [stack._port(key) for key in keys.get("authsvc", [])]  # noqa: SLF001 - the stack's own ports
            stack.lb = cleanup.enter_context(balancer(ports["authsvc"], backends))
        try:
            for key in keys.get("authsvc", []):
                stack.start(key)
            broker.start()
            for name in services:
                for key in keys[name] if name != "authsvc" else []:
                    stack.start(key)
            yield stack
        finally:
            for process in reversed(list(stack.processes.values())):
                process.stop(signal.SIGTERM, timeout=20)
            broker.stop()


@contextmanager
def stack_with_api(postgres: PostgresServer, root: Path) -> Iterator[ProdStack]:
    """A NATS of its own and the production path with the API as a process: authsvc, bridge, writer, devicesvc and
    the API (the streams' and the console's tests)."""
    nats_server = _nats(root / "nats")
    nats_server.start()
    try:
        with prod_stack(postgres, nats_server, root, services=("authsvc", "bridge", "writer", "devicesvc", "api")) as s:
            yield s
    finally:
        nats_server.stop()
