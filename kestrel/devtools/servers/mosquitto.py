"""Mosquitto, plain or with Kestrel's auth plugin (mTLS and TLS+JWT listeners)."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from kestrel.devtools.servers.base import (
    LOOPBACK,
    ManagedProcess,
    ServerFailed,
    _chown,
    ensure_port_free,
    reachable_root,
    wait_for_port,
)


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
    path = Path(__file__).resolve().parents[3] / "broker" / "mosquitto" / "build" / "kestrel_auth.so"
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
