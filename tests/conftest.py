"""Fixtures: real PostgreSQL, NATS JetStream and Mosquitto on free loopback ports in temp dirs.

Servers are started by the same launchers the embedded default uses (``kestrel.devtools.servers``) and are
stopped by PID afterwards. Each test isolates itself with its own tenant and device ids.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from kestrel.devtools import seed
from kestrel.devtools.servers import (
    ManagedProcess,
    MosquittoServer,
    NatsServer,
    OpenBaoServer,
    PortInUse,
    PostgresServer,
    ensure_port_free,
    free_port,
    http_ok,
)
from kestrel.store.migrate import migrate

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def servers_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="kestrel-test-"))
    root.chmod(0o755)  # the postgres and mosquitto users must traverse it
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres(servers_root: Path) -> Iterator[PostgresServer]:
    server = PostgresServer(
        name="postgres",
        log_path=servers_root / "postgres.log",
        root=servers_root / "pg",
        port=free_port(),
        shared_buffers="128MB",
    )
    server.start()
    migrate(server.url)
    yield server
    server.stop()


@pytest.fixture
def fresh_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of the test's own, for tests that crash and restart it."""
    root = tmp_path_factory.mktemp("pg")
    root.chmod(0o755)
    server = PostgresServer(name="postgres", log_path=root / "postgres.log", root=root / "pg", port=free_port(),
                            shared_buffers="64MB")  # fmt: skip
    server.start()
    migrate(server.url)
    yield server
    server.stop()


def isolated_database(postgres: PostgresServer, prefix: str) -> str:
    """A new, migrated database on the session's server, for tests that need their own root CA."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres.admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} OWNER kestrel")
    url = postgres.url.rsplit("/", 1)[0] + "/" + name
    migrate(url)
    return url


def api_url_for(postgres: PostgresServer, database_url: str) -> str:
    """The API role's connection to the database ``database_url`` names."""
    return postgres.api_url.rsplit("/", 1)[0] + "/" + database_url.rsplit("/", 1)[1]


def platform_url_for(postgres: PostgresServer, database_url: str) -> str:
    """The platform operations' role's connection to the database ``database_url`` names."""
    return postgres.platform_url.rsplit("/", 1)[0] + "/" + database_url.rsplit("/", 1)[1]


def start_api(
    postgres: PostgresServer, database_url: str, root: Path, admin_token: str, extra_env: dict[str, str] | None = None
) -> tuple[ServiceProcess, int]:
    """``python -m api`` (uvicorn, a free loopback port) on ``database_url`` as the API's and the platform's roles,
    with an OAuth signing key (and ``extra_env``); started and ready."""
    from api.auth.access_tokens import new_signing_key_pem  # noqa: PLC0415 - only the tests that run an API

    port = free_port()
    key = root / "signing.key"
    key.write_bytes(new_signing_key_pem())
    env = (
        {k: v for k, v in os.environ.items() if not k.startswith("KESTREL_")}
        | {
            "KESTREL_API_DATABASE_URL": api_url_for(postgres, database_url),
            "KESTREL_API_PLATFORM_DATABASE_URL": platform_url_for(postgres, database_url),
            "KESTREL_API_ADMIN_TOKEN": admin_token,
            "KESTREL_API_PORT": str(port),
            "KESTREL_API_SIGNING_KEY_FILE": str(key),
        }
        | (extra_env or {})
    )
    api = ServiceProcess(name="api", log_path=root / "api.log", argv=[sys.executable, "-m", "api"], env=env)
    api.start()
    if not wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/readyz"), 30):
        api.stop()
        raise AssertionError("api did not start")
    return api, port


@pytest.fixture
def api_database_url(postgres: PostgresServer) -> str:
    """The session database as the API's role (no table owned, no BYPASSRLS)."""
    return postgres.api_url


def tenant_token(database_url: str, tenant: str, *scopes: str) -> dict[str, str]:
    """Authorization headers with a fresh API token of ``tenant`` (every scope unless some are named)."""
    from kestrel_core.tokens import SCOPES  # noqa: PLC0415

    _, token = seed.create_api_token(database_url, tenant, list(scopes or SCOPES), name="test")
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def database_url(postgres: PostgresServer) -> str:
    return postgres.url


def _nats(root: Path, sync: str = "default") -> NatsServer:
    return NatsServer(
        name="nats", log_path=root / "nats.log", root=root, port=free_port(), monitor_port=free_port(), sync=sync
    )  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def nats_server(servers_root: Path) -> Iterator[NatsServer]:
    server = _nats(servers_root / "nats")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fresh_nats(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[NatsServer]:
    """A NATS server of the test's own (for tests that restart it); ``sync`` via indirect param."""
    sync = getattr(request, "param", "default")
    root = tmp_path_factory.mktemp("nats")
    server = _nats(root, sync)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def openbao(servers_root: Path) -> Iterator[OpenBaoServer]:
    """A real OpenBao (``bao server -dev``) for the Vault/OpenBao PKI backend."""
    for _ in range(20):
        port = free_port()
        try:
            ensure_port_free("openbao-cluster", port + 1)
        except PortInUse:
            continue
        break
    server = OpenBaoServer(name="openbao", log_path=servers_root / "openbao.log", port=port)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mosquitto(servers_root: Path) -> Iterator[MosquittoServer]:
    server = MosquittoServer(
        name="mosquitto", log_path=servers_root / "mosquitto.log", root=servers_root / "mq", port=free_port()
    )
    server.start()
    yield server
    server.stop()


@dataclass
class Tenant:
    """A tenant of the test's own with registered devices."""

    id: str
    devices: list[str]


def new_tenant(database_url: str, devices: int = 3, prefix: str = "t") -> Tenant:
    """A registered tenant with ``devices`` registered devices, ids unique to this call."""
    tag = uuid.uuid4().hex[:10]
    tenant = Tenant(f"{prefix}-{tag}", [f"{prefix}-{tag}-{i}" for i in range(devices)])
    seed.create_tenant(database_url, tenant.id)
    seed.create_devices(database_url, tenant.id, tenant.devices)
    return tenant


@pytest.fixture
def make_tenant(database_url: str) -> Callable[[int], Tenant]:
    def make(devices: int = 3) -> Tenant:
        return new_tenant(database_url, devices, prefix="t")

    return make


def stored_rows(database_url: str, tenant: str) -> list[tuple[str, int]]:
    with psycopg.connect(database_url) as conn:
        return [
            (d, s)
            for d, s in conn.execute("SELECT device_id, seq FROM telemetry WHERE tenant_id = %s", (tenant,)).fetchall()
        ]


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def scrape(port: int, metric: str, **labels: str) -> float:
    """Sum of a Prometheus family from a /metrics endpoint, over the samples carrying ``labels``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or line.split("{")[0].split(" ")[0] != metric:
            continue
        if all(w in line for w in wanted):
            total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass
class ServiceProcess(ManagedProcess):
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    metrics_port: int = 0

    def start(self) -> None:
        self._spawn(self.argv, env=self.env)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(10)


@dataclass
class Pipeline:
    """The ingest services as separate processes, wired to the given servers."""

    root: Path
    mqtt_port: int
    nats_url: str
    database_url: str
    share_group: str
    processes: list[ServiceProcess] = field(default_factory=list)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "KESTREL_DATABASE_URL": self.database_url,
                "KESTREL_BRIDGE_MQTT_PORT": str(self.mqtt_port),
                "KESTREL_BRIDGE_NATS_URL": self.nats_url,
                "KESTREL_BRIDGE_SHARE_GROUP": self.share_group,
                "KESTREL_WRITER_NATS_URL": self.nats_url,
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def _start(self, name: str, service: str, env: dict[str, str]) -> ServiceProcess:
        port = free_port()
        proc = ServiceProcess(
            name=name,
            log_path=self.root / f"{name}.log",
            argv=[sys.executable, "-m", "ingest", service],
            env=self._env() | env | {f"KESTREL_{service.upper()}_METRICS_PORT": str(port)},
            metrics_port=port,
        )
        proc.start()
        self.processes.append(proc)
        assert wait_until(lambda: _metrics_up(port), 20), f"{name} did not start"
        return proc

    def start_bridge(self, client_id: str) -> ServiceProcess:
        """A bridge, once subscribed: a reading published before would find no subscriber and be dropped."""
        bridge = self._start(client_id, "bridge", {"KESTREL_BRIDGE_CLIENT_ID": client_id})
        assert wait_until(lambda: "bridge subscribed" in bridge.log_path.read_text(), 20), f"{client_id} not subscribed"
        return bridge

    def start_writer(self, name: str = "writer", **settings: str) -> ServiceProcess:
        return self._start(name, "writer", {f"KESTREL_WRITER_{k.upper()}": v for k, v in settings.items()})

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop(signal.SIGTERM, timeout=20)


def _metrics_up(port: int) -> bool:
    return http_ok(f"http://127.0.0.1:{port}/metrics")


def clear_session(port: int, client_id: str) -> None:
    """End a bridge's persistent session so that it stops collecting messages after a test."""
    subprocess.run(
        [
            "mosquitto_sub",
            "-p",
            str(port),
            "-i",
            client_id,
            "-V",
            "mqttv5",
            "-t",
            "x/unused",
            "-C",
            "1",
            "-W",
            "1",
            "-x",
            "0",
        ],
        capture_output=True,
        check=False,
    )


@pytest.fixture
def pipeline_factory(
    tmp_path: Path, database_url: str, mosquitto: MosquittoServer
) -> Iterator[Callable[[NatsServer], Pipeline]]:
    made: list[Pipeline] = []

    def make(nats: NatsServer) -> Pipeline:
        pipeline = Pipeline(tmp_path, mosquitto.port, nats.url, database_url, f"ingest-{uuid.uuid4().hex[:8]}")
        made.append(pipeline)
        return pipeline

    yield make
    for pipeline in made:
        pipeline.stop()
        for proc in pipeline.processes:
            if proc.argv[-1] == "bridge":
                clear_session(pipeline.mqtt_port, proc.name)


def openssl_verify(chain: str, leaf: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`openssl verify -purpose sslclient` of ``leaf`` against a tenant-CA-then-root ``chain``."""
    certs = chain.split("-----END CERTIFICATE-----")
    (tmp_path / "tenant-ca.pem").write_text(certs[0] + "-----END CERTIFICATE-----\n")
    (tmp_path / "root.pem").write_text(certs[1].lstrip() + "-----END CERTIFICATE-----\n")
    return subprocess.run(
        [
            "openssl",
            "verify",
            "-purpose",
            "sslclient",
            "-CAfile",
            str(tmp_path / "root.pem"),
            "-untrusted",
            str(tmp_path / "tenant-ca.pem"),
            str(leaf),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
