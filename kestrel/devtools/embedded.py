"""The embedded default (``kestrel run``): every server and service on loopback, supervised (ADR-0007).

State lives under one directory (``.kestrel/`` by default): the PostgreSQL cluster, the JetStream
store, Mosquitto's persistence, logs, the admin token, ``kestrel.env`` for later CLI calls, the PKI
passphrase, the broker's TLS files (``tls/``) and the first device's certificate (``devices/``).
Running it again keeps the data. Ctrl-C (or SIGTERM) stops services first, then servers, each by PID.

The broker is secured as in production (ADR-0010): every client is authenticated by authsvc through the
Mosquitto plugin; devices use the mTLS or the TLS+JWT listener; the plain listener is on loopback only
and admits only what authsvc admits (backend principals, JWT devices). Backend secrets and the broker key
are new on every start and never written outside the 0600 files the plugin reads.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import psycopg
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from psycopg.rows import dict_row

from kestrel.devtools import seed
from kestrel.devtools.embedded_env import service_env
from kestrel.devtools.servers import (
    LOOPBACK,
    BrokerAuth,
    ManagedProcess,
    MosquittoServer,
    NatsServer,
    PostgresServer,
    PrometheusServer,
    ServerFailed,
    ensure_port_free,
    http_ok,
)
from kestrel.devtools.simulate import device_ids
from kestrel.devtools.statefiles import expires_within, read_or_create_token
from kestrel.devtools.supervisor import Supervisor
from kestrel.store.migrate import migrate
from kestrel_core.tokens import SCOPES
from kestrel_core.topics import DEVICE_UPLINK_FILTERS, TELEMETRY_FILTERS

DEMO_TENANT = "demo"
FIRST_DEVICE = "my-sensor"


@dataclass(frozen=True)
class EmbeddedPorts:
    postgres: int = 15432
    nats: int = 14222
    nats_monitor: int = 18222
    mqtt: int = 11883
    api: int = 18080
    bridge_metrics: int = 19101
    writer_metrics: int = 19102
    mqtt_tls: int = 18883
    mqtt_jwt: int = 18884
    authsvc: int = 18090
    supervisor: int = 18099
    rules_metrics: int = 19105


@dataclass
class Service(ManagedProcess):
    """A Kestrel service process (the supervisor restarts it with back-off if it dies while the stack runs)."""

    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        self._spawn(self.argv, env=self.env)


class EmbeddedStack:
    def __init__(
        self,
        state_dir: Path,
        ports: EmbeddedPorts,
        *,
        devices: int,
        rate: float,
        simulator: bool = True,
        prometheus_port: int = 0,
    ) -> None:
        self.state = state_dir.resolve()
        self.ports = ports
        self.devices = devices
        self.rate = rate
        self.simulator = simulator
        logs = self.state / "logs"
        self.postgres = PostgresServer(
            name="postgres", log_path=logs / "postgres.log", root=self.state / "postgres", port=ports.postgres
        )
        self.nats = NatsServer(
            name="nats",
            log_path=logs / "nats.log",
            root=self.state / "nats",
            port=ports.nats,
            monitor_port=ports.nats_monitor,
        )
        self.mosquitto = MosquittoServer(
            name="mosquitto", log_path=logs / "mosquitto.log", root=self.state / "mosquitto", port=ports.mqtt
        )
        #: Prometheus scraping every service with the SLO rules (``kestrel run --prometheus``); 0: none.
        self.prometheus = (
            PrometheusServer(name="prometheus", log_path=logs / "prometheus.log", root=self.state / "prometheus",
                             port=prometheus_port)
            if prometheus_port else None
        )  # fmt: skip
        self.services: list[Service] = []
        self.supervisor = Supervisor()
        self.stopping = False
        self.secrets: dict[str, str] = {}

    def check_ports(self) -> None:
        for name, port in vars(self.ports).items():
            ensure_port_free(name.replace("_", "-"), port)

    def _env(self, token: str) -> dict[str, str]:
        return service_env(self, token)

    # ------------------------------------------------------------------------------------ provisioning

    def _kestrel(self, *args: str) -> None:
        """Run a ``kestrel`` CLI command against this stack (the PKI lives behind the CLI's plugin)."""
        passphrase = self.state / "pki-passphrase"
        env = dict(os.environ)
        env.update(
            {
                "KESTREL_DATABASE_URL": self.postgres.url,
                "KESTREL_STATE_DIR": str(self.state),
                "KESTREL_PKI_PASSPHRASE": passphrase.read_text().strip(),
            }
        )
        result = subprocess.run(
            [sys.executable, "-m", "kestrel", *args], env=env, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise ServerFailed(f"`kestrel {' '.join(args)}` failed: {result.stderr.strip()[-300:]}")

    def _provision(self) -> None:
        """PKI (root, demo tenant CA, broker certificate, first device's certificate), the simulator's JWT
        key, and fresh secrets for the backend principals and the broker key."""
        passphrase = self.state / "pki-passphrase"
        if not passphrase.exists():
            passphrase.write_text(secrets.token_urlsafe(32) + "\n")
            passphrase.chmod(0o600)
        with psycopg.connect(self.postgres.url, row_factory=dict_row) as conn:
            authorities = {r["ca_id"] for r in conn.execute("SELECT ca_id FROM pki_authorities")}
        if "root" not in authorities:
            self._kestrel("pki", "init")
        if f"tenant:{DEMO_TENANT}" not in authorities:
            self._kestrel("pki", "tenant-ca", DEMO_TENANT)
        tls = self.state / "tls"
        if expires_within(tls / "server.crt", dt.timedelta(days=7)):
            self._kestrel("pki", "server-cert", "--host", "localhost", "--ip", LOOPBACK, "--out-dir", str(tls))
        devices = self.state / "devices"
        if not (devices / f"{FIRST_DEVICE}.crt").exists():
            self._kestrel("pki", "issue", FIRST_DEVICE, "--out-dir", str(devices))
        key_file, kid_file = self.state / "simulator-jwt.key", self.state / "simulator-jwt.kid"
        if not kid_file.exists():
            key = ed25519.Ed25519PrivateKey.generate()
            key_file.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
            key_file.chmod(0o600)
            public = key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            kid_file.write_text(seed.add_jwt_key(self.postgres.url, DEMO_TENANT, public) + "\n")
        self.secrets = {
            "ingest": seed.create_service_principal(self.postgres.url, "ingest", "ingest", rotate=True),
            "authsvc": seed.create_service_principal(self.postgres.url, "authsvc", "control", rotate=True),
            "devicesvc": seed.create_service_principal(self.postgres.url, "devicesvc", "devices", rotate=True),
            "provisioner": seed.create_service_principal(self.postgres.url, "provisioner", "provisioning", rotate=True),
            "rules": seed.create_service_principal(self.postgres.url, "rules", "rules", rotate=True),
            "broker-key": "bk_" + secrets.token_urlsafe(32),
        }
        self.mosquitto.auth = BrokerAuth(
            authn_url=f"http://{LOOPBACK}:{self.ports.authsvc}/mqtt/authn",
            broker_key=self.secrets["broker-key"],
            server_cert=tls / "server.crt",
            server_key=tls / "server.key",
            ca_file=tls / "ca.pem",
            mtls_port=self.ports.mqtt_tls,
            jwt_port=self.ports.mqtt_jwt,
            # Devices wait until the bridge and devicesvc have subscribed (after a restart too): ADR-0004.
            require_subscriptions=(*TELEMETRY_FILTERS, *DEVICE_UPLINK_FILTERS),
        )

    def _service(self, name: str, argv: list[str], env: dict[str, str]) -> Service:
        service = Service(name=name, log_path=self.state / "logs" / f"{name}.log", argv=argv, env=env)
        service.start()
        self.services.append(service)
        self.supervisor.add(name, service, service.start)
        return service

    def start(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self.state.chmod(0o755)
        self.check_ports()
        for server in (self.postgres, self.nats):
            print(f"  starting {server.name} ...", flush=True)
            server.start()
            self.supervisor.add(server.name, server, server.start)
        migrate(self.postgres.url)
        seed.create_tenant(self.postgres.url, DEMO_TENANT, "Demo tenant", exist_ok=True)
        sims = device_ids("sim", self.devices)
        seed.create_devices(self.postgres.url, DEMO_TENANT, [FIRST_DEVICE, *sims], exist_ok=True)
        print("  provisioning PKI and credentials ...", flush=True)
        self._provision()
        token = read_or_create_token(self.state / "admin-token")
        signing_key = self.state / "api-signing.key"  # signs OAuth access tokens (Ed25519)
        if not signing_key.exists():
            signing_key.write_bytes(
                ed25519.Ed25519PrivateKey.generate().private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
            signing_key.chmod(0o600)
        demo_token = self.state / "demo-token"  # an admin-scoped API token of the demo tenant, for curl
        if not demo_token.exists():
            _, value = seed.create_api_token(
                self.postgres.url, DEMO_TENANT, list(SCOPES), name="embedded default", days=365
            )
            demo_token.write_text(value + "\n")
            demo_token.chmod(0o600)
        env = self._env(token)
        env_file = self.state / "kestrel.env"
        env_file.write_text(
            f"KESTREL_DATABASE_URL={self.postgres.url}\nKESTREL_API_URL=http://{LOOPBACK}:{self.ports.api}\n"
            f"KESTREL_MQTT_PORT={self.ports.mqtt}\nKESTREL_MQTT_TLS_PORT={self.ports.mqtt_tls}\n"
            f"KESTREL_MQTT_JWT_PORT={self.ports.mqtt_jwt}\n"
        )
        env_file.chmod(0o600)
        py = sys.executable
        authsvc = self._service("authsvc", [py, "-m", "authsvc"], env)
        self._wait_for(authsvc, f"http://{LOOPBACK}:{self.ports.authsvc}/healthz", 60.0)
        print(f"  starting {self.mosquitto.name} ...", flush=True)
        self.mosquitto.start()
        self.supervisor.add(self.mosquitto.name, self.mosquitto, self.mosquitto.start)
        self._service("writer", [py, "-m", "ingest", "writer"], env)
        self._service("bridge", [py, "-m", "ingest", "bridge"], env)
        self._service("api", [py, "-m", "api"], env)
        self._service("devicesvc", [py, "-m", "devicesvc"], env)
        self._service("rules", [py, "-m", "rules"], env)
        # The provisioner alone holds the CA passphrase (ADR-0013); the other services never see it.
        pki = {"KESTREL_PKI_PASSPHRASE": (self.state / "pki-passphrase").read_text().strip()}
        self._service("provisioner", [py, "-m", "pki", "provisioner"], env | pki)
        if self.simulator and self.devices:
            sim = [py, "-m", "kestrel", "simulate", "--port", str(self.ports.mqtt), "--tenant", DEMO_TENANT]
            sim += ["--devices", str(self.devices), "--rate", str(self.rate)]
            sim += ["--jwt-key", str(self.state / "simulator-jwt.key")]
            sim += ["--jwt-kid", (self.state / "simulator-jwt.kid").read_text().strip()]
            self._service("simulator", sim, env)
        self._wait_ready()
        if self.prometheus is not None:
            self._start_prometheus()
        self.supervisor.serve(self.ports.supervisor)

    def _start_prometheus(self) -> None:
        assert self.prometheus is not None
        p = self.ports
        self.prometheus.targets = {
            "api": f"{LOOPBACK}:{p.api}", "authsvc": f"{LOOPBACK}:{p.authsvc}",
            "bridge": f"{LOOPBACK}:{p.bridge_metrics}", "writer": f"{LOOPBACK}:{p.writer_metrics}",
            "devicesvc": f"{LOOPBACK}:{p.writer_metrics + 1}", "provisioner": f"{LOOPBACK}:{p.writer_metrics + 2}",
            "rules": f"{LOOPBACK}:{p.rules_metrics}",
        }  # fmt: skip
        print(f"  starting {self.prometheus.name} ...", flush=True)
        self.prometheus.start()
        self.supervisor.add(self.prometheus.name, self.prometheus, self.prometheus.start)

    @staticmethod
    def _wait_for(service: Service, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not http_ok(url):
            if not service.alive():
                raise service.fail("exited during start-up")
            if time.monotonic() > deadline:
                raise service.fail(f"not ready after {timeout:.0f}s")
            time.sleep(0.1)

    def _wait_ready(self, timeout: float = 60.0) -> None:
        """Announce nothing before it answers: the API is ready, the bridge and writer serve metrics."""
        checks = {
            "api": f"http://{LOOPBACK}:{self.ports.api}/readyz",
            "bridge": f"http://{LOOPBACK}:{self.ports.bridge_metrics}/metrics",
            "writer": f"http://{LOOPBACK}:{self.ports.writer_metrics}/metrics",
            "rules": f"http://{LOOPBACK}:{self.ports.rules_metrics}/metrics",
        }
        for name, url in checks.items():
            self._wait_for(next(s for s in self.services if s.name == name), url, timeout)

    def banner(self) -> str:
        p = self.ports
        devices = self.state / "devices"
        return "\n".join(
            [
                "",
                "Kestrel is running (embedded default, loopback only). Ctrl-C stops everything.",
                f"  MQTT devices    mqtts://localhost:{p.mqtt_tls}     (mTLS: device certificates)",
                f"                  mqtts://localhost:{p.mqtt_jwt}     (TLS: JWT as password)",
                f"  MQTT loopback   mqtt://{LOOPBACK}:{p.mqtt}          (development; authenticated too)",
                f"  Console         http://{LOOPBACK}:{p.api}/console/   "
                f"(sign in with the token in {self.state}/demo-token)",
                f"  REST API        http://{LOOPBACK}:{p.api}/api/v1   (OpenAPI: /schema, /schema/openapi.json)",
                f"  Streams         http://{LOOPBACK}:{p.api}/api/v1/stream (SSE)  ws://{LOOPBACK}:{p.api}/api/v1/ws"
                "  (README: Real-time streams)",
                f"  NATS JetStream  nats://{LOOPBACK}:{p.nats}          (monitoring http://{LOOPBACK}:{p.nats_monitor})",
                f"  PostgreSQL      {LOOPBACK}:{p.postgres}            "
                f"(database kestrel; URL in {self.state}/kestrel.env)",
                f"  authsvc         http://{LOOPBACK}:{p.authsvc}/mqtt/authn",
                f"  Metrics         http://{LOOPBACK}:{p.api}/metrics  :{p.bridge_metrics} (bridge)  "
                f":{p.writer_metrics} (writer)",
                "  Devices         devicesvc (presence, shadows, commands), provisioner (JIT claims);"
                " try `kestrel agent` (README: Operate a fleet)",
                f"  Rules           rule workers (alarms, notifications; metrics :{p.rules_metrics});"
                " try `kestrel rule` (README: Rules, alarms and notifications)",
                *(
                    [f"  Prometheus      {self.prometheus.url}  (every service scraped, SLO rules and alerts loaded)"]
                    if self.prometheus
                    else []
                ),
                f"  Logs            {self.state}/logs/",
                f"  CLI             kestrel --state-dir {self.state} ...   (or KESTREL_STATE_DIR={self.state})",
                f"  Supervisor      http://{LOOPBACK}:{p.supervisor}/healthz  (every process: state, restarts)",
                f"  Simulator       {self.devices} devices, {self.rate:g} msg/s in tenant '{DEMO_TENANT}' (JWT)"
                if self.simulator and self.devices
                else "  Simulator       off",
                "",
                f"Send a first message as device '{FIRST_DEVICE}' (its certificate is in {devices}/):",
                f"  mosquitto_pub -h localhost -p {p.mqtt_tls} --cafile {self.state}/tls/ca.pem "
                f"--cert {devices}/{FIRST_DEVICE}.crt --key {devices}/{FIRST_DEVICE}.key -i {FIRST_DEVICE} "
                f"-V mqttv5 -q 1 -t v1/{DEMO_TENANT}/d/{FIRST_DEVICE}/telemetry "
                "-m '{\"temp\": 21.5}'",
                "Read it back:",
                f'  curl -s -H "Authorization: Bearer $(cat {self.state}/demo-token)" '
                f"http://{LOOPBACK}:{p.api}/api/v1/devices/{FIRST_DEVICE}/telemetry",
                "",
            ]
        )

    def stop(self) -> None:
        self.stopping = True
        self.supervisor.close()
        if self.prometheus is not None:
            self.prometheus.stop()
        for service in reversed(self.services):
            service.stop(signal.SIGTERM, timeout=20)
        for server in (self.mosquitto, self.nats, self.postgres):
            server.stop()

    def wait(self) -> None:
        """Supervise every process until asked to stop: a dead one is restarted with back-off, and said so."""
        while not self.stopping:
            for line in self.supervisor.check_all():
                print(line, flush=True)
            time.sleep(0.5)


def run_embedded(
    state_dir: Path, ports: EmbeddedPorts, *, devices: int, rate: float, simulator: bool, prometheus_port: int = 0
) -> None:
    stack = EmbeddedStack(
        state_dir, ports, devices=devices, rate=rate, simulator=simulator, prometheus_port=prometheus_port
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stack.stopping = True  # the main loop notices and stops everything in order

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        stack.start()
        print(stack.banner(), flush=True)
        stack.wait()
        print("\nstopping ...", flush=True)
    finally:
        stack.stop()
    print("stopped; data kept in", stack.state)
