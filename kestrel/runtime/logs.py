"""Structured JSON logs on stderr, one object per line; ``extra={...}`` fields become keys."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from kestrel import __version__

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def configure_logging(service: str, level: str | None = None) -> None:
    """JSON lines at ``level``, else ``KESTREL_LOG_LEVEL`` (DEBUG, INFO, WARNING, ERROR; INFO when unset). DEBUG adds
    one line per reading at the bridge and the writer with its message id and trace context."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    wanted = (level or os.environ.get("KESTREL_LOG_LEVEL") or "INFO").upper()
    root.setLevel(wanted if wanted in LEVELS else "INFO")
    if wanted not in LEVELS:
        root.warning("KESTREL_LOG_LEVEL is not one of %s; logging at INFO", ", ".join(LEVELS))
    for noisy in ("nats", "gmqtt"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def announce(service: str) -> None:
    """A service's first log line, once its settings are valid: which code this is (CHANGELOG.md says what each
    version changed). A refused setting stays the one line on stderr."""
    logging.getLogger(f"kestrel.{service}").info("starting", extra={"version": __version__})
