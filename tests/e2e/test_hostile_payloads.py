"""Device payloads nested beyond what a decoder may recurse into are dead-lettered with a reason, and the service
that received them goes on (issue 10, defect 4): the bridge (telemetry) and devicesvc (reported state), on the
production path (mTLS devices through the plugin). Each refusal is followed by a positive control from the same
device, which must be stored: a worker that died on the first message would never store the second."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from kestrel.devtools.servers import NatsServer, PostgresServer
from kestrel.runtime.mqttclient import MqttPublisher
from tests.conftest import wait_until
from tests.jetstream_helpers import deadletters
from tests.prodstack import ProdStack, prod_stack

pytestmark = pytest.mark.e2e
DEEP = b"[" * 30_000 + b"]" * 30_000  # 60 KB: inside the 64 KiB payload limit, 30,000 levels deep


@pytest.fixture(scope="module")
def stack(
    postgres: PostgresServer, nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProdStack]:
    root: Path = tmp_path_factory.mktemp("hostile")
    with prod_stack(postgres, nats_server, root, services=("authsvc", "bridge", "writer", "devicesvc")) as s:
        yield s


def test_deep_payloads_are_dead_lettered_and_the_services_go_on(stack: ProdStack) -> None:
    tenant, (device,) = stack.tenant(1, "hp")
    base = f"v1/{tenant}/d/{device}"
    reading = json.dumps({"ts": int(time.time() * 1000), "seq": 1, "metrics": {"temp": 20.5}}).encode()
    deep_report = b'{"state": ' + b'{"a":' * 10_000 + b"1" + b"}" * 10_000 + b"}"

    async def publish() -> list[int]:
        client = MqttPublisher("127.0.0.1", stack.auth.mtls_port, device, tls=stack.enrol(device))
        for _ in range(100):  # the gate opens once the bridge and devicesvc have subscribed
            try:
                await client.connect()
                break
            except Exception:  # noqa: BLE001 - refused for now: retry as a device would
                await asyncio.sleep(0.2)
        codes = [
            await client.publish(f"{base}/telemetry", DEEP),
            await client.publish(f"{base}/state/reported", deep_report),
            await client.publish(f"{base}/telemetry", reading),
            await client.publish(f"{base}/state/reported", b'{"state": {"fw": "2.0"}}'),
        ]
        await client.close()
        return codes

    assert all(code < 0x80 for code in asyncio.run(publish()))
    letters = asyncio.run(deadletters(stack.nats.url, topic_contains=base, expect=2, timeout=30))
    assert sorted(letter["Kestrel-Reason"] for letter in letters) == ["too_deep", "too_deep"], letters

    def stored() -> bool:
        with psycopg.connect(stack.url) as conn:
            row = conn.execute("SELECT count(*) FROM telemetry WHERE device_id = %s", (device,)).fetchone()
            report = conn.execute(
                "SELECT reported FROM device_shadows WHERE device_id = %s AND name = ''", (device,)
            ).fetchone()
        return row == (1,) and report is not None and report[0] == {"fw": "2.0"}

    assert wait_until(stored, 30), "the message after the deep one was not stored"
    for name in ("bridge", "devicesvc"):
        assert stack.processes[name].alive(), f"{name} died"


def test_last_seen_follows_telemetry_not_the_connection(stack: ProdStack) -> None:
    """Issue 10, item 9: a device that connected long ago and publishes now was last seen now."""
    tenant, (device,) = stack.tenant(1, "ls")
    context = stack.enrol(device)

    async def publish_for(seconds: float) -> float:
        client = MqttPublisher("127.0.0.1", stack.auth.mtls_port, device, tls=context)
        await client.connect()
        await asyncio.sleep(seconds)  # connected, silent: last seen stays at the connection
        sent = time.time()
        reading = json.dumps({"ts": int(sent * 1000), "seq": 1, "metrics": {"temp": 20.5}}).encode()
        assert await client.publish(f"v1/{tenant}/d/{device}/telemetry", reading) < 0x80
        await client.close()
        return sent

    sent = asyncio.run(publish_for(3.0))

    def seen() -> float:
        with psycopg.connect(stack.url) as conn:
            row = conn.execute("SELECT extract(epoch FROM last_seen) FROM device_presence WHERE device_id = %s",
                               (device,)).fetchone()  # fmt: skip
        return float(row[0]) if row and row[0] is not None else 0.0

    assert wait_until(lambda: seen() >= sent - 0.5, 20), f"last seen {seen()} is before the reading at {sent}"
