"""The provisioner: just-in-time provisioning over MQTT (ADR-0013). ``python -m pki provisioner``.

A device holding a tenant's claim token connects as ``prov:{device}`` and publishes ``{"csr": PEM}`` on
``v1/{tenant}/provision/{claim}/{device}/request`` (the broker's ACL, from authsvc, binds tenant, claim and
device to that connection). The provisioner signs it (``DatabaseCA.provision``: one use of the claim, the device
registered, the certificate recorded, one transaction) and answers on ``…/response`` with ``{"status": "ok",
"device_id", "certificate", "chain"}`` or ``{"status": "error", "error", "detail"}``. The PUBACK goes out after
the answer was handed to the broker; a redelivered request for the same key gets the same certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import gmqtt
import msgspec

from kestrel.runtime.mqtt import Ack, install_manual_ack
from kestrel_core.errors import InvalidInput, KestrelError
from kestrel_core.settings import Secret
from kestrel_core.topics import (
    PROVISION_REQUEST_FILTER,
    PROVISION_SHARE_GROUP,
    parse_uplink,
    provision_topics,
    shared_filter,
)
from pki.authority import DatabaseCA

log = logging.getLogger("kestrel.pki.provisioner")


class ProvisionerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """``KESTREL_PROVISIONER_*``."""

    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    client_id: str = "svc:provisioner:1"
    mqtt_username: str = ""
    mqtt_password: Secret = msgspec.field(default_factory=lambda: Secret(""))
    share_group: str = PROVISION_SHARE_GROUP
    certificate_days: int = 365
    max_csr_bytes: int = 16 * 1024


class ProvisionRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    csr: str


def answer(topic: str, payload: bytes, ca: DatabaseCA, settings: ProvisionerSettings) -> tuple[str, dict[str, Any]]:
    """The response topic and body for one request (blocking: signs in the database, maybe in OpenBao)."""
    uplink = parse_uplink(topic)
    if uplink.kind != "provision":
        raise InvalidInput("bad_topic", "not a provisioning request topic")
    _, response_topic = provision_topics(uplink.tenant, uplink.arg, uplink.device)
    try:
        if len(payload) > settings.max_csr_bytes:
            raise InvalidInput("request_too_large", f"requests are limited to {settings.max_csr_bytes} bytes")
        try:
            request = msgspec.json.decode(payload, type=ProvisionRequest)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
            raise InvalidInput("bad_request", 'the request must be {"csr": "<PEM>"}') from exc
        issued = ca.provision(
            uplink.arg, uplink.tenant, uplink.device, request.csr.encode(), settings.certificate_days,
            f"provisioner:claim:{uplink.arg}",
        )  # fmt: skip
    except KestrelError as exc:
        reason = exc.reason if isinstance(exc, InvalidInput) else exc.kind
        log.info("provisioning refused", extra={"reason": reason, "device": uplink.device, "claim": uplink.arg})
        return response_topic, {"status": "error", "error": reason, "detail": exc.detail}
    log.info("device provisioned", extra={"device": uplink.device, "claim": uplink.arg, "serial": issued.serial})
    return response_topic, {
        "status": "ok",
        "device_id": uplink.device,
        "serial": issued.serial,
        "certificate": issued.cert_pem,
        "chain": issued.full_chain_pem,
        "root": issued.root_pem,
    }


async def run_provisioner(
    settings: ProvisionerSettings, ca: DatabaseCA, stop: asyncio.Event, ready: asyncio.Event | None = None
) -> None:
    client = gmqtt.Client(
        settings.client_id, clean_session=False, optimistic_acknowledgement=False, session_expiry_interval=86400
    )
    client.set_config({"reconnect_retries": -1, "reconnect_delay": 1})
    if settings.mqtt_username:
        client.set_auth_credentials(settings.mqtt_username, settings.mqtt_password.reveal() or None)
    queue: asyncio.Queue[tuple[str, bytes, Ack]] = asyncio.Queue()
    install_manual_ack(client, lambda topic, payload, _properties, ack: queue.put_nowait((topic, payload, ack)))

    async def work() -> None:
        while True:
            topic, payload, ack = await queue.get()
            try:
                response_topic, body = await asyncio.to_thread(answer, topic, payload, ca, settings)
            except InvalidInput as exc:  # off-grammar topic: nobody to answer; the ACL makes this unreachable
                log.warning("provisioning request on a bad topic dropped", extra={"reason": exc.reason})
                ack()
                continue
            except Exception:
                log.exception("provisioning failed; the request stays unacknowledged")
                continue
            client.publish(response_topic, msgspec.json.encode(body), qos=1)
            ack()

    def on_connect(c: Any, flags: Any, rc: Any, properties: Any) -> None:
        c.subscribe([gmqtt.Subscription(shared_filter(settings.share_group, PROVISION_REQUEST_FILTER), qos=1)])
        log.info("provisioner connected", extra={"client_id": settings.client_id})

    client.on_connect = on_connect
    worker = asyncio.create_task(work())
    await client.connect(settings.mqtt_host, settings.mqtt_port, keepalive=30, version=gmqtt.constants.MQTTv50)
    if ready is not None:
        ready.set()
    await stop.wait()
    deadline = time.monotonic() + 10
    while queue.qsize() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    with contextlib.suppress(TimeoutError):  # a broker that is gone gets no goodbye
        await asyncio.wait_for(client.disconnect(), 5)
    worker.cancel()
