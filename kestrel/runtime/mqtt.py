"""MQTT for backend services: QoS 1 with the PUBACK sent only after the work is done (ADR-0004)."""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from typing import Any

import gmqtt

log = logging.getLogger("kestrel.runtime.mqtt")

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
