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
from typing import Final

import gmqtt
import msgspec
import psycopg
from prometheus_client import CollectorRegistry, Counter

from kestrel.runtime.mqtt import Ack, backend_client, connect
from kestrel_core.errors import InvalidInput, KestrelError
from kestrel_core.messages.twin import ProvisionDenied, ProvisionGranted, ProvisionRequest
from kestrel_core.retry import Backoff
from kestrel_core.settings import MqttSettings
from kestrel_core.topics import (
    PROVISION_REQUEST_FILTER,
    PROVISION_SHARE_GROUP,
    parse_uplink,
    provision_topics,
    shared_filter,
)
from pki.authority import DatabaseCA

log = logging.getLogger("kestrel.pki.provisioner")
#: Between attempts at a request whose answer failed for a passing reason.
RETRY: Final = Backoff(base_s=0.5, cap_s=10.0)


class ProvisionerSettings(MqttSettings, frozen=True, kw_only=True):
    """``KESTREL_PROVISIONER_*``."""

    client_id: str = "svc:provisioner:1"
    #: Shared subscription group: provisioners in the same group split the requests.
    share_group: str = PROVISION_SHARE_GROUP
    #: Lifetime of a provisioned device certificate.
    certificate_days: int = 365
    #: Larger provisioning requests are refused.
    max_csr_bytes: int = 16 * 1024
    #: Prometheus metrics (/metrics) listen here; port 0 turns them off.
    metrics_host: str = "127.0.0.1"
    #: The metrics port.
    metrics_port: int = 9104


class ProvisionerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("kestrel_provisioner_requests", "Provisioning requests by outcome (granted, denied,"
                                " dropped, retried)", ["outcome"], registry=registry)  # fmt: skip


def answer(
    topic: str, payload: bytes, ca: DatabaseCA, settings: ProvisionerSettings
) -> tuple[str, ProvisionGranted | ProvisionDenied]:
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
        return response_topic, ProvisionDenied(error=reason, detail=exc.detail)
    log.info("device provisioned", extra={"device": uplink.device, "claim": uplink.arg, "serial": issued.serial})
    return response_topic, ProvisionGranted(
        device_id=uplink.device,
        serial=issued.serial,
        certificate=issued.cert_pem,
        chain=issued.full_chain_pem,
        root=issued.root_pem,
    )


async def run_provisioner(
    settings: ProvisionerSettings,
    ca: DatabaseCA,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
    registry: CollectorRegistry | None = None,
) -> None:
    queue: asyncio.Queue[tuple[str, bytes, Ack]] = asyncio.Queue()
    metrics = ProvisionerMetrics(registry or CollectorRegistry())
    subscriptions = [gmqtt.Subscription(shared_filter(settings.share_group, PROVISION_REQUEST_FILTER), qos=1)]
    client = backend_client(
        "provisioner",
        settings,
        lambda topic, payload, _properties, ack: queue.put_nowait((topic, payload, ack)),
        subscriptions,
    )

    async def handle(topic: str, payload: bytes, ack: Ack) -> None:
        """Answer one request. A passing failure (the database or OpenBao unreachable) is tried again here: the
        broker would redeliver an unacknowledged request only on a new connection, and this one stays up."""
        failures = 0
        while True:
            try:
                response_topic, body = await asyncio.to_thread(answer, topic, payload, ca, settings)
            except InvalidInput as exc:  # off-grammar topic: nobody to answer; the ACL makes this unreachable
                log.warning("provisioning request on a bad topic dropped", extra={"reason": exc.reason})
                metrics.requests.labels("dropped").inc()
                ack()
                return
            except (psycopg.OperationalError, OSError) as exc:
                failures += 1
                metrics.requests.labels("retried").inc()
                log.warning("provisioning failed for a passing reason; trying again", extra={"error": str(exc)[:200]})
                await asyncio.sleep(RETRY.delay(failures))
                continue
            except Exception:
                log.exception("provisioning failed; the request stays unacknowledged")
                return
            client.publish(response_topic, msgspec.json.encode(body), qos=1)
            metrics.requests.labels("granted" if isinstance(body, ProvisionGranted) else "denied").inc()
            ack()
            return

    async def work() -> None:
        while True:
            await handle(*await queue.get())

    worker = asyncio.create_task(work(), name="provisioner-worker")
    await connect(client, settings)
    if ready is not None:
        ready.set()
    await stop.wait()
    deadline = time.monotonic() + 10
    while queue.qsize() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    with contextlib.suppress(TimeoutError):  # a broker that is gone gets no goodbye
        await asyncio.wait_for(client.disconnect(), 5)
    worker.cancel()
    log.info("provisioner stopped", extra={"left_unanswered": queue.qsize()})
