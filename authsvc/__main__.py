"""``python -m authsvc`` serves the brokers' authentication endpoint."""

from __future__ import annotations

import sys

import uvicorn

from authsvc.app import AuthsvcSettings, create_app
from kestrel.runtime.logs import announce, configure_logging
from kestrel.store import DatabaseSettings
from kestrel_core.errors import InvalidInput
from kestrel_core.settings import from_env


def main() -> int:
    configure_logging("authsvc")
    try:
        settings = from_env(AuthsvcSettings, "KESTREL_AUTHSVC")
        database = from_env(DatabaseSettings, "KESTREL_DATABASE")
    except InvalidInput as exc:
        print(f"kestrel authsvc: {exc.detail}", file=sys.stderr)
        return 2
    if not settings.broker_key:
        print("kestrel authsvc: KESTREL_AUTHSVC_BROKER_KEY is not set; brokers must authenticate", file=sys.stderr)
        return 2
    announce("authsvc")
    uvicorn.run(
        create_app(settings, database.url.reveal()),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        loop="uvloop",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
