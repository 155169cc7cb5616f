"""MQTT for backend services: QoS 1 with the PUBACK sent only after the work is done (ADR-0004)."""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from typing import Any

import gmqtt

from kestrel_core.settings import MqttSettings

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


def backend_client(
    name: str,
    settings: MqttSettings,
    handle: Callable[[str, bytes, Any, Ack], None],
    subscriptions: list[gmqtt.Subscription],
    *,
    receive_maximum: int | None = None,
) -> gmqtt.Client:
    """A backend principal's client: persistent session, PUBACK after the work (``install_manual_ack``), reconnects
    forever, subscribes on every (re)connect (logging "``name`` connected") and says so loudly when the broker refuses
    a subscription."""
    extra = {} if receive_maximum is None else {"receive_maximum": receive_maximum}
    client = gmqtt.Client(
        settings.client_id,
        clean_session=False,
        optimistic_acknowledgement=False,
        session_expiry_interval=settings.session_expiry_s,
        **extra,
    )
    client.set_config({"reconnect_retries": -1, "reconnect_delay": 1})
    if settings.mqtt_username:
        client.set_auth_credentials(settings.mqtt_username, settings.mqtt_password.reveal() or None)
    install_manual_ack(client, handle)

    def on_connect(c: Any, flags: Any, rc: Any, properties: Any) -> None:
        c.subscribe(subscriptions)
        log.info(f"{name} connected", extra={"client_id": settings.client_id})

    def on_subscribe(c: Any, mid: Any, granted: Any, properties: Any) -> None:
        if any(code >= 0x80 for code in granted):
            # Nothing would ever arrive: say so rather than run idle (a principal without the role, or an ACL change).
            log.error(
                "the broker refused subscriptions", extra={"client_id": settings.client_id, "codes": list(granted)}
            )
        else:  # from here on the broker routes this service's messages to it (a deploy or a test may wait for this)
            log.info(f"{name} subscribed", extra={"client_id": settings.client_id})

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    return client


async def connect(client: gmqtt.Client, settings: MqttSettings) -> None:
    """MQTT 5, keep-alive 30 s."""
    await client.connect(settings.mqtt_host, settings.mqtt_port, keepalive=30, version=gmqtt.constants.MQTTv50)
