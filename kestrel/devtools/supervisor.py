"""The embedded default's supervisor (issue 10): every process it started — the servers (PostgreSQL, NATS, Mosquitto)
as much as Kestrel's services — is restarted with back-off when it dies, with a line on the console, and reported
on a health endpoint, so a dead server is never silent behind a banner that says "running".
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kestrel.devtools.servers import LOOPBACK, ManagedProcess, ServerFailed

#: Back-off between restarts of one process: 1, 2, 4 ... 30 s.
MAX_BACKOFF_S = 30.0


@dataclass
class Supervised:
    """One process and how to bring it back."""

    name: str
    process: ManagedProcess
    start: Callable[[], None]
    restarts: int = 0
    state: str = "running"  # running | down | restarting
    last_exit: int | None = None
    since: float = field(default_factory=time.time)
    _next_try: float = 0.0

    def check(self) -> str | None:
        """Restart the process if it died and its back-off has passed; a line to print when something happened."""
        if self.process.alive():
            return None
        now = time.monotonic()
        line = None
        if self.state == "running":
            self.last_exit = self.process.proc.returncode if self.process.proc is not None else None
            self.state, self.since = "down", time.time()
            self._next_try = now + min(2.0**self.restarts, MAX_BACKOFF_S)
            line = f"{self.name} exited with {self.last_exit}; restarting (log {self.process.log_path})"
        if now < self._next_try:
            return line
        self.state = "restarting"
        self.restarts += 1
        try:
            self.process.stop()  # release its log file and any half-dead child
            self.start()
        except ServerFailed as exc:
            self.state = "down"
            self._next_try = time.monotonic() + min(2.0**self.restarts, MAX_BACKOFF_S)
            return f"{self.name} did not come back: {exc.detail}; trying again"
        self.state, self.since = "running", time.time()
        return f"{self.name} restarted (restart {self.restarts})"

    def snapshot(self) -> dict[str, Any]:
        pid = self.process.proc.pid if self.process.alive() and self.process.proc is not None else None
        return {"state": self.state, "pid": pid, "restarts": self.restarts, "last_exit": self.last_exit,
                "since": self.since}  # fmt: skip


class Supervisor:
    """Supervises processes in the caller's loop (``check_all``) and serves ``GET /healthz`` on loopback."""

    def __init__(self) -> None:
        self.entries: list[Supervised] = []
        self._http: ThreadingHTTPServer | None = None

    def add(self, name: str, process: ManagedProcess, start: Callable[[], None]) -> None:
        self.entries.append(Supervised(name, process, start))

    def check_all(self) -> list[str]:
        return [line for entry in list(self.entries) if (line := entry.check())]

    def health(self) -> tuple[int, dict[str, Any]]:
        processes = {entry.name: entry.snapshot() for entry in self.entries}
        healthy = all(p["state"] == "running" for p in processes.values())
        return (200 if healthy else 503), {"status": "ok" if healthy else "degraded", "processes": processes}

    def serve(self, port: int) -> None:
        supervisor = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/healthz":
                    self.send_error(404)
                    return
                status, body = supervisor.health()
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                return None

        self._http = ThreadingHTTPServer((LOOPBACK, port), Handler)
        threading.Thread(target=self._http.serve_forever, name="supervisor-health", daemon=True).start()

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
