"""What every launched server shares: loopback ports, a managed process with its log, a state directory the
server's user can reach (ADR-0007)."""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

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
