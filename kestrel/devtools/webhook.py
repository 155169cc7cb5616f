"""``kestrel webhook-sink``: a local receiver for notification webhooks, to try rules on the embedded default. Prints
each notification with whether its ``Kestrel-Signature`` verifies against the channel's secret. Development only:
it listens on loopback."""

from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kestrel_core.rules.channels import SIGNATURE_HEADER, verify

LOOPBACK = "127.0.0.1"


def serve(port: int, secret: str) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(min(int(self.headers.get("Content-Length", "0")), 1 << 20))
            signature = self.headers.get(SIGNATURE_HEADER, "")
            valid = verify(secret, signature, body, now=int(time.time()))
            checked = "unchecked" if not secret else ("signature ok" if valid else "BAD SIGNATURE")
            try:
                shown: Any = json.loads(body)
            except ValueError:
                shown = body.decode(errors="replace")
            print(f"{self.headers.get('Idempotency-Key', '-')}  {checked}  {json.dumps(shown)}", flush=True)
            self.send_response(200 if checked != "BAD SIGNATURE" else 401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((LOOPBACK, port), Handler)
    print(f"listening on http://{LOOPBACK}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
