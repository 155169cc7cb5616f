"""Launch the real servers Kestrel runs on: PostgreSQL, NATS JetStream, Mosquitto (and OpenBao for the tests).

Used by the embedded default (``kestrel run``) and by the test fixtures, so the tests start the servers exactly as
users do. Every server binds to loopback, keeps its state in a directory it is given, and is stopped by the PID it
was started with (ADR-0007). One module per server.
"""

from kestrel.devtools.servers.base import (
    LOOPBACK,
    ManagedProcess,
    PortInUse,
    ServerFailed,
    ensure_port_free,
    free_port,
    http_ok,
    reachable_root,
    wait_for_port,
)
from kestrel.devtools.servers.mosquitto import (
    PLUGIN_ENV,
    BrokerAuth,
    MosquittoServer,
    auth_plugin_path,
    mosquitto_binary,
)
from kestrel.devtools.servers.nats import NatsServer, nats_server_binary
from kestrel.devtools.servers.openbao import OpenBaoServer, openbao_binary
from kestrel.devtools.servers.postgres import PostgresServer, postgres_bindir
from kestrel.devtools.servers.prometheus import PrometheusServer, prometheus_binary

__all__ = [
    "LOOPBACK",
    "PLUGIN_ENV",
    "BrokerAuth",
    "ManagedProcess",
    "MosquittoServer",
    "NatsServer",
    "OpenBaoServer",
    "PortInUse",
    "PostgresServer",
    "PrometheusServer",
    "ServerFailed",
    "auth_plugin_path",
    "ensure_port_free",
    "free_port",
    "http_ok",
    "mosquitto_binary",
    "nats_server_binary",
    "openbao_binary",
    "postgres_bindir",
    "prometheus_binary",
    "reachable_root",
    "wait_for_port",
]
