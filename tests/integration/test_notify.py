"""Notification delivery against a real PostgreSQL, NATS and HTTP receiver, in process (issue 13): more deliveries due
than delivery slots all go out (the loop waits for a slot instead of spinning, which starved the slots' own tasks),
each signed and with its own idempotency key; webhooks to internal addresses are refused (SSRF) unless allowed."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

import nats
import psycopg
import pytest

from kestrel.devtools.servers import NatsServer
from kestrel.store.pool import checked_pool
from kestrel_core.rules.channels import SIGNATURE_HEADER, verify
from rules.notify import deliveries_loop
from rules.ports import Metrics, Rules
from rules.settings import RulesSettings
from tests.conftest import new_tenant
from tests.receivers import http_receiver

pytestmark = pytest.mark.integration
SECRET = "whsec_" + secrets.token_urlsafe(16)


def _queue(database_url: str, tenant: str, device: str, urls: dict[str, str], per_channel: int) -> None:
    """Channels (webhooks with SECRET) and ``per_channel`` pending deliveries on each, as the workers queue them."""
    alarm, rule = "a" + secrets.token_hex(12), "r" + secrets.token_hex(12)
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO alarms (alarm_id, tenant_id, rule_id, rule_name, device_id, severity, raised_at)"
                     " VALUES (%s, %s, %s, 'hot', %s, 'major', now())", (alarm, tenant, rule, device))  # fmt: skip
        for channel, url in urls.items():
            conn.execute("INSERT INTO channels (channel_id, tenant_id, kind, config, secret, per_minute)"
                         " VALUES (%s, %s, 'webhook', %s, %s, 1000)",
                         (channel, tenant, json.dumps({"kind": "webhook", "url": url}), SECRET))  # fmt: skip
            for i in range(per_channel):
                payload = {"tenant": tenant, "device": device, "alarm_id": alarm, "rule_id": rule,
                           "rule_name": "hot", "event": "raised", "severity": "major", "status": "active",
                           "acknowledged": False, "at": i, "actor": "rule", "values": {"n": i}}  # fmt: skip
                conn.execute("INSERT INTO deliveries (delivery_id, tenant_id, channel_id, alarm_id, payload)"
                             " VALUES (%s, %s, %s, %s, %s)",
                             ("n" + secrets.token_hex(12), tenant, channel, alarm, json.dumps(payload)))  # fmt: skip


def _statuses(database_url: str, tenant: str) -> dict[str, list[tuple[str, int, str | None]]]:
    with psycopg.connect(database_url) as conn:
        found = conn.execute("SELECT channel_id, status, attempts, last_error FROM deliveries WHERE tenant_id = %s",
                             (tenant,)).fetchall()  # fmt: skip
    result: dict[str, list[tuple[str, int, str | None]]] = {}
    for channel, status, attempts, error in found:
        result.setdefault(channel, []).append((status, attempts, error))
    return result


async def _deliver(database_url: str, nats_url: str, until: Any, **settings: Any) -> None:
    """The deliveries loop in process until ``until()`` holds (or 20 s)."""
    nc = await nats.connect(nats_url)
    async with checked_pool(database_url, min_size=1, max_size=4) as pool:
        from prometheus_client import CollectorRegistry  # noqa: PLC0415

        rules = Rules(RulesSettings(**settings), database_url, pool, nc, Metrics(CollectorRegistry()))
        task = asyncio.create_task(deliveries_loop(rules))
        deadline = time.monotonic() + 20
        while not await asyncio.to_thread(until) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await nc.close()


def test_more_deliveries_than_slots_all_go_out_signed(database_url: str, nats_server: NatsServer) -> None:
    tenant = new_tenant(database_url, 1, prefix="nq")
    with http_receiver() as receiver:
        _queue(database_url, tenant.id, tenant.devices[0], {"hook": receiver.url(f"/ok/{tenant.id}")}, 12)

        def done() -> bool:
            return all(s == "delivered" for s, _, _ in _statuses(database_url, tenant.id)["hook"])

        asyncio.run(_deliver(database_url, nats_server.url, done, delivery_concurrency=2, webhook_allow_private=True))
        assert done(), _statuses(database_url, tenant.id)
        got = receiver.on(f"/ok/{tenant.id}")
        assert len({r.headers["Idempotency-Key"] for r in got}) == 12
        assert all(verify(SECRET, r.headers[SIGNATURE_HEADER], r.body, now=int(time.time())) for r in got)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.0.0.1", "169.254.169.254", "[::1]"])
def test_webhooks_to_internal_addresses_are_refused_unless_allowed(
    database_url: str, nats_server: NatsServer, host: str
) -> None:
    tenant = new_tenant(database_url, 1, prefix="ns")
    with http_receiver() as receiver:
        url = receiver.url(f"/ok/{tenant.id}").replace("127.0.0.1", host)
        _queue(database_url, tenant.id, tenant.devices[0], {"internal": url}, 1)

        def decided() -> bool:
            return all(s != "pending" for s, _, _ in _statuses(database_url, tenant.id)["internal"])

        asyncio.run(_deliver(database_url, nats_server.url, decided, webhook_allow_private=False))
        assert _statuses(database_url, tenant.id)["internal"] == [("dead", 1, "forbidden_address: "
                                                                   + f"{host.strip('[]')} resolves to a non-public address")]  # fmt: skip
        # The control: the same kind of delivery, allowed, reaches the receiver (when the address is ours).
        if host in ("127.0.0.1", "localhost"):
            _queue(database_url, tenant.id, tenant.devices[0], {"allowed": receiver.url(f"/ok/{tenant.id}")}, 1)
            asyncio.run(_deliver(database_url, nats_server.url, lambda: len(receiver.on(f"/ok/{tenant.id}")) == 1,
                                 webhook_allow_private=True))  # fmt: skip
            assert len(receiver.on(f"/ok/{tenant.id}")) == 1
        assert all("internal" not in r.path for r in receiver.received)
