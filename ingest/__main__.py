"""Composition root: ``python -m ingest bridge`` or ``python -m ingest writer``."""

from __future__ import annotations

import logging
import sys

from prometheus_client import CollectorRegistry, start_http_server

from ingest.bridge import BridgeSettings, run_bridge
from ingest.jetstream import ensure_streams
from ingest.writer import WriterSettings, run_writer
from kestrel.runtime.logs import announce
from kestrel.runtime.nats import connect_nats
from kestrel.runtime.service import run_service, stop_event
from kestrel.runtime.tracing import service_tracing
from kestrel.store import DatabaseSettings
from kestrel_core.settings import from_env

log = logging.getLogger("kestrel.ingest")


async def bridge_main() -> None:
    settings = from_env(BridgeSettings, "KESTREL_BRIDGE")
    announce("ingest-bridge")
    registry = CollectorRegistry()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, settings.metrics_host, registry=registry)
    stop = stop_event()
    with service_tracing("bridge", settings.client_id) as traces:  # bad KESTREL_OTLP_* fails before NATS waits
        nc = await connect_nats(settings.nats_url, settings.client_id)
        await ensure_streams(nc)
        await run_bridge(settings, stop, nc, registry, tracing=traces)
    await nc.drain()


async def writer_main() -> None:
    settings = from_env(WriterSettings, "KESTREL_WRITER")
    database = from_env(DatabaseSettings, "KESTREL_DATABASE")
    announce("ingest-writer")
    registry = CollectorRegistry()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, settings.metrics_host, registry=registry)
    stop = stop_event()
    with service_tracing("writer", settings.durable) as traces:
        nc = await connect_nats(settings.nats_url, "kestrel-ingest-writer")
        await ensure_streams(nc)
        await run_writer(settings, database.url.reveal(), stop, nc, registry, tracing=traces)
    await nc.drain()


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("bridge", "writer"):
        print("usage: python -m ingest {bridge|writer}", file=sys.stderr)
        return 2
    return run_service(f"ingest-{argv[0]}", bridge_main if argv[0] == "bridge" else writer_main)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
