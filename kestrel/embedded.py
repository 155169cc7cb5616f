"""The embedded default (``kestrel run``): every server and service on loopback, supervised (ADR-0007).

State lives under one directory (``.kestrel/`` by default): the PostgreSQL cluster, the JetStream
store, Mosquitto's persistence, logs, the admin token and ``kestrel.env`` for later CLI calls.
Running it again keeps the data. Ctrl-C (or SIGTERM) stops services first, then servers, each by PID.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from kestrel.db import registry
from kestrel.db.migrate import migrate
from kestrel.servers import (
    LOOPBACK,
    ManagedProcess,
    MosquittoServer,
    NatsServer,
    PostgresServer,
    ensure_port_free,
    http_ok,
)
from kestrel.simulate import device_ids

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


@dataclass
class Service(ManagedProcess):
    """A Kestrel service process, restarted with back-off if it dies while the stack runs."""

    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    restarts: int = 0
    _next_restart: float = 0.0

    def start(self) -> None:
        self._spawn(self.argv, env=self.env)

    def supervise(self) -> str | None:
        """Restart the process if it exited; return a line to print when that happened."""
        if self.alive() or self.proc is None:
            return None
        if time.monotonic() < self._next_restart:
            return None
        code = self.proc.returncode
        self.stop()
        self.restarts += 1
        self._next_restart = time.monotonic() + min(2**self.restarts, 30)
        self.start()
        return f"{self.name} exited with {code}; restarted (see {self.log_path})"


def _read_or_create_token(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    token = "kst_admin_" + secrets.token_urlsafe(32)
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token


class EmbeddedStack:
    def __init__(
        self, state_dir: Path, ports: EmbeddedPorts, *, devices: int, rate: float, simulator: bool = True
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
        self.services: list[Service] = []
        self.stopping = False

    def check_ports(self) -> None:
        for name, port in vars(self.ports).items():
            ensure_port_free(name.replace("_", "-"), port)

    def _env(self, token: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "KESTREL_DATABASE_URL": self.postgres.url,
                "KESTREL_BRIDGE_MQTT_PORT": str(self.ports.mqtt),
                "KESTREL_BRIDGE_NATS_URL": self.nats.url,
                "KESTREL_BRIDGE_METRICS_PORT": str(self.ports.bridge_metrics),
                "KESTREL_WRITER_NATS_URL": self.nats.url,
                "KESTREL_WRITER_METRICS_PORT": str(self.ports.writer_metrics),
                "KESTREL_API_PORT": str(self.ports.api),
                "KESTREL_API_ADMIN_TOKEN": token,
            }
        )
        return env

    def start(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self.state.chmod(0o755)
        self.check_ports()
        for server in (self.postgres, self.nats, self.mosquitto):
            print(f"  starting {server.name} ...", flush=True)
            server.start()
        migrate(self.postgres.url)
        registry.create_tenant(self.postgres.url, DEMO_TENANT, "Demo tenant", exist_ok=True)
        sims = device_ids("sim", self.devices)
        registry.create_devices(self.postgres.url, DEMO_TENANT, [FIRST_DEVICE, *sims], exist_ok=True)
        token = _read_or_create_token(self.state / "admin-token")
        env = self._env(token)
        env_file = self.state / "kestrel.env"
        env_file.write_text(
            f"KESTREL_DATABASE_URL={self.postgres.url}\nKESTREL_API_URL=http://{LOOPBACK}:{self.ports.api}\n"
        )
        env_file.chmod(0o600)
        py = sys.executable
        logs = self.state / "logs"
        specs = [
            ("writer", [py, "-m", "ingest", "writer"]),
            ("bridge", [py, "-m", "ingest", "bridge"]),
            ("api", [py, "-m", "api"]),
        ]
        if self.simulator and self.devices:
            specs.append(
                (
                    "simulator",
                    [
                        py,
                        "-m",
                        "kestrel",
                        "simulate",
                        "--port",
                        str(self.ports.mqtt),
                        "--tenant",
                        DEMO_TENANT,
                        "--devices",
                        str(self.devices),
                        "--rate",
                        str(self.rate),
                    ],
                )
            )
        for name, argv in specs:
            service = Service(name=name, log_path=logs / f"{name}.log", argv=argv, env=env)
            service.start()
            self.services.append(service)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        """Announce nothing before it answers: the API is ready, the bridge and writer serve metrics."""
        checks = {
            "api": f"http://{LOOPBACK}:{self.ports.api}/readyz",
            "bridge": f"http://{LOOPBACK}:{self.ports.bridge_metrics}/metrics",
            "writer": f"http://{LOOPBACK}:{self.ports.writer_metrics}/metrics",
        }
        deadline = time.monotonic() + timeout
        for name, url in checks.items():
            service = next(s for s in self.services if s.name == name)
            while not http_ok(url):
                if not service.alive():
                    raise service.fail("exited during start-up")
                if time.monotonic() > deadline:
                    raise service.fail(f"not ready after {timeout:.0f}s")
                time.sleep(0.1)

    def banner(self) -> str:
        p = self.ports
        return "\n".join(
            [
                "",
                "Kestrel is running (embedded default, loopback only). Ctrl-C stops everything.",
                f"  MQTT broker     mqtt://{LOOPBACK}:{p.mqtt}          (Mosquitto)",
                f"  REST API        http://{LOOPBACK}:{p.api}/api/v1   (OpenAPI: /schema, /schema/openapi.json)",
                f"  NATS JetStream  nats://{LOOPBACK}:{p.nats}          (monitoring http://{LOOPBACK}:{p.nats_monitor})",
                f"  PostgreSQL      {LOOPBACK}:{p.postgres}            "
                f"(database kestrel; URL in {self.state}/kestrel.env)",
                f"  Metrics         http://{LOOPBACK}:{p.api}/metrics  :{p.bridge_metrics} (bridge)  "
                f":{p.writer_metrics} (writer)",
                f"  Logs            {self.state}/logs/",
                f"  Simulator       {self.devices} devices, {self.rate:g} msg/s in tenant '{DEMO_TENANT}'"
                if self.simulator and self.devices
                else "  Simulator       off",
                "",
                "Send a first message:",
                f"  mosquitto_pub -h {LOOPBACK} -p {p.mqtt} -V mqttv5 -q 1 "
                f"-t v1/{DEMO_TENANT}/d/{FIRST_DEVICE}/telemetry "
                "-m '{\"temp\": 21.5}'",
                "Read it back:",
                f'  curl -s -H "Authorization: Bearer $(cat {self.state}/admin-token)" '
                f"http://{LOOPBACK}:{p.api}/api/v1/devices/{FIRST_DEVICE}/telemetry",
                "",
            ]
        )

    def stop(self) -> None:
        self.stopping = True
        for service in reversed(self.services):
            service.stop(signal.SIGTERM, timeout=20)
        for server in (self.mosquitto, self.nats, self.postgres):
            server.stop()

    def wait(self) -> None:
        while not self.stopping:
            for service in self.services:
                if line := service.supervise():
                    print(line, flush=True)
            time.sleep(0.5)


def run_embedded(state_dir: Path, ports: EmbeddedPorts, *, devices: int, rate: float, simulator: bool) -> None:
    stack = EmbeddedStack(state_dir, ports, devices=devices, rate=rate, simulator=simulator)

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
