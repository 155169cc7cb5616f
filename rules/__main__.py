"""Composition root: ``python -m rules``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

from prometheus_client import CollectorRegistry, start_http_server

from kestrel.runtime.logs import announce
from kestrel.runtime.nats import connect_nats
from kestrel.runtime.service import run_service, stop_event
from kestrel.store import DatabaseSettings
from kestrel_core.settings import from_env
from rules.service import run_rules
from rules.settings import RulesSettings


async def amain() -> None:
    settings = from_env(RulesSettings, "KESTREL_RULES")
    database = from_env(DatabaseSettings, "KESTREL_DATABASE")
    announce("rules")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per delivery is the deliveries' table's job
    registry = CollectorRegistry()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, settings.metrics_host, registry=registry)
    stop = stop_event()
    nc = await connect_nats(settings.nats_url, settings.worker)
    await run_rules(settings, database.url.reveal(), stop, nc, registry)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(nc.drain(), 5)


def main(argv: list[str]) -> int:
    if argv:
        print("usage: python -m rules (settings from KESTREL_RULES_* and KESTREL_DATABASE_URL)", file=sys.stderr)
        return 2
    return run_service("rules", amain)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
