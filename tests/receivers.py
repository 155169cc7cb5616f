"""Real receivers for notification tests (issue 13), on loopback: an HTTP server that records what it is sent and
answers per path (``/ok`` 200, ``/fail`` 500, ``/hang`` never in time), and an SMTP server (aiosmtpd) that requires
STARTTLS and a login before it accepts mail."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from kestrel.devtools.servers import free_port


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class HttpReceiver:
    port: int
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def on(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]


@contextmanager
def http_receiver(hang_s: float = 10.0) -> Iterator[HttpReceiver]:
    receiver = HttpReceiver(free_port())

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with receiver.lock:
                receiver.received.append(Received(self.path, dict(self.headers.items()), body, time.monotonic()))
            if self.path.startswith("/hang"):
                time.sleep(hang_s)
            self.send_response(500 if self.path.startswith("/fail") else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", receiver.port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Mailbox:
    port: int
    user: str
    password: str
    messages: list[Message] = field(default_factory=list)
    #: Whether each accepted session had upgraded to TLS and logged in first.
    sessions: list[tuple[bool, bool]] = field(default_factory=list)


@contextmanager
def smtp_server(cert: Path, key: Path) -> Iterator[Mailbox]:
    """aiosmtpd requiring STARTTLS and AUTH (PLAIN/LOGIN, one account)."""
    box = Mailbox(free_port(), "kestrel", "mail-" + str(time.time_ns()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's name
            box.sessions.append((session.ssl is not None, bool(session.authenticated)))
            box.messages.append(message_from_bytes(envelope.content))
            return "250 OK"

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and data.login.decode() == box.user
            and data.password.decode() == box.password
        )
        return AuthResult(success=ok, handled=False)

    controller = Controller(
        Handler(), hostname="127.0.0.1", port=box.port, tls_context=context, require_starttls=True,
        auth_required=True, authenticator=authenticate,
    )  # fmt: skip
    controller.start()
    try:
        yield box
    finally:
        controller.stop()
