"""Composition root: ``python -m ingest bridge`` or ``python -m ingest writer``."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import nats
import uvloop
from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry, start_http_server

from ingest.bridge import BridgeSettings, run_bridge
from ingest.jetstream import ensure_streams
from ingest.writer import WriterSettings, run_writer
from kestrel.db import DatabaseSettings
from kestrel.errors import InvalidInput
from kestrel.logs import configure_logging
from kestrel.settings import from_env

log = logging.getLogger("kestrel.ingest")


async def connect_nats(url: str, name: str) -> NATS:
    """Connect, retrying until NATS answers; afterwards nats-py reconnects by itself, forever."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats: %s", exc)

    delay = 0.2
    while True:
        try:
            return await nats.connect(
                url,
                name=name,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.25,
                connect_timeout=2,
                pending_size=64 * 1024 * 1024,
                error_cb=on_error,
            )
        except Exception as exc:  # noqa: BLE001 - any failure to reach NATS is retried
            log.warning("nats not reachable yet: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def bridge_main() -> None:
    settings = from_env(BridgeSettings, "KESTREL_BRIDGE")
    registry = CollectorRegistry()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, settings.metrics_host, registry=registry)
    stop = _stop_event()
    nc = await connect_nats(settings.nats_url, settings.client_id)
    await ensure_streams(nc)
    await run_bridge(settings, stop, nc, registry)
    await nc.drain()


async def writer_main() -> None:
    settings = from_env(WriterSettings, "KESTREL_WRITER")
    database = from_env(DatabaseSettings, "KESTREL_DATABASE")
    registry = CollectorRegistry()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, settings.metrics_host, registry=registry)
    stop = _stop_event()
    nc = await connect_nats(settings.nats_url, "kestrel-ingest-writer")
    await ensure_streams(nc)
    await run_writer(settings, database.url.reveal(), stop, nc, registry)
    await nc.drain()


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("bridge", "writer"):
        print("usage: python -m ingest {bridge|writer}", file=sys.stderr)
        return 2
    configure_logging(f"ingest-{argv[0]}")
    try:
        uvloop.run(bridge_main() if argv[0] == "bridge" else writer_main())
    except InvalidInput as exc:
        print(f"kestrel ingest {argv[0]}: {exc.detail}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
