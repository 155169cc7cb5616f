"""Composition root: ``python -m devicesvc``."""

from __future__ import annotations

import asyncio
import contextlib
import sys

from prometheus_client import CollectorRegistry, start_http_server

from devicesvc.service import run_devicesvc
from devicesvc.settings import DeviceSettings
from kestrel.runtime.logs import announce
from kestrel.runtime.nats import connect_nats
from kestrel.runtime.service import run_service, stop_event
from kestrel.runtime.tracing import service_tracing
from kestrel.store import DatabaseSettings
from kestrel_core.settings import from_env


async def amain() -> None:
    settings = from_env(DeviceSettings, "KESTREL_DEVICES")
    database = from_env(DatabaseSettings, "KESTREL_DATABASE")
    announce("devicesvc")
    registry = CollectorRegistry()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, settings.metrics_host, registry=registry)
    stop = stop_event()
    with service_tracing("devicesvc", settings.client_id) as traces:
        nc = await connect_nats(settings.nats_url, settings.client_id)
        await run_devicesvc(settings, database.url.reveal(), stop, nc, registry, tracing=traces)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(nc.drain(), 5)


def main(argv: list[str]) -> int:
    if argv:
        print("usage: python -m devicesvc (settings from KESTREL_DEVICES_* and KESTREL_DATABASE_URL)", file=sys.stderr)
        return 2
    return run_service("devicesvc", amain)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
