"""Plumbing every backend service shares: MQTT QoS 1 with PUBACK after the work is done, a NATS connection that
retries, and a stop event for SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import struct
from collections.abc import Callable, Coroutine
from typing import Any

import gmqtt
import nats
from nats.aio.client import Client as NATS

log = logging.getLogger("kestrel.backend")

Ack = Callable[[], None]


def _noop() -> None:
    return None


_PUBACK = struct.Struct("!BBH")  # PUBACK, remaining length 2, packet id: success, valid in MQTT 5 and 3.1.1


def install_manual_ack(client: gmqtt.Client, handle: Callable[[str, bytes, Any, Ack], None]) -> None:
    """Route gmqtt's QoS 1 deliveries to ``handle`` with a PUBACK callback (gmqtt 0.8, pinned).

    gmqtt's own manual mode runs a task per message and writes each PUBACK separately on whatever
    connection is current when the task ends. Here a PUBACK is a plain callback; PUBACKs completed in
    one event-loop turn leave in a single write; and a PUBACK is dropped if its connection is gone (replaced,
    or closed under us by a broker restart): the broker redelivers that message (persistent session) and may
    have reused its packet id. A failed write never stops later flushes (it once did: the consumer then
    acknowledged nothing after a broker restart, and the broker held every later message, issue 10).
    """
    handler = client._package_handler  # noqa: SLF001 - documented hook point of the pinned version
    loop = asyncio.get_running_loop()
    ready: dict[Any, list[int]] = {}

    def flush() -> None:
        batches = list(ready.items())
        ready.clear()  # first: a failed write must never stop later PUBACKs from being scheduled
        for connection, mids in batches:
            if handler._connection is not connection:  # noqa: SLF001
                continue  # replaced: the broker redelivers these on the new connection
            try:
                connection.send_package(b"".join([_PUBACK.pack(0x40, 2, mid) for mid in mids]))
            except (RuntimeError, OSError):  # the transport closed under us (broker restart): same as replaced
                log.info("PUBACKs dropped with a closed connection; the broker redelivers", extra={"count": len(mids)})

    def on_qos1(mid: int, packet: bytes, topic: str, properties: Any) -> None:
        connection = handler._connection  # noqa: SLF001

        def puback() -> None:
            if not ready:
                loop.call_soon(flush)
            ready.setdefault(connection, []).append(mid)

        handle(topic, packet, properties, puback)

    handler._handle_qos_1_publish_packet = on_qos1  # noqa: SLF001
    client.on_message = lambda c, topic, payload, qos, properties: handle(topic, payload, properties, _noop)  # QoS 0


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


def stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def run_service(name: str, amain: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """A service's process: JSON logs, uvloop, and one clear line (exit 2) for a bad setting."""
    import sys  # noqa: PLC0415

    import uvloop  # noqa: PLC0415

    from kestrel.errors import InvalidInput  # noqa: PLC0415
    from kestrel.logs import configure_logging  # noqa: PLC0415

    configure_logging(name)
    try:
        uvloop.run(amain())
    except InvalidInput as exc:
        print(f"kestrel {name}: {exc.detail}", file=sys.stderr)
        return 2
    return 0
