"""The rule workers under faults (issue 13): two workers share the partitions; one is killed with SIGKILL mid-stream,
or NATS is, while devices flip an alarm with every reading. A ledger compares what the devices sent with what the
platform did: every transition exactly once in the alarm history, in the NATS alarm stream and at the webhook
(retries carry the same idempotency key, and are counted), none lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import psycopg
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from api.app import create_app
from api.settings import ApiSettings
from kestrel.devtools.servers import PostgresServer
from kestrel_core.messages.alarms import ALARM_STREAM
from kestrel_core.settings import Secret
from tests.conftest import _nats, api_url_for, tenant_token, wait_until
from tests.e2e.test_rules import publish, reading
from tests.prodstack import ProdStack, prod_stack
from tests.receivers import http_receiver

pytestmark = pytest.mark.e2e
V1 = "/api/v1"
DEVICES, READINGS = 6, 40
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture
def stack(postgres: PostgresServer, tmp_path: Any, request: pytest.FixtureRequest) -> Iterator[ProdStack]:
    # NATS writes acknowledged messages to its files asynchronously unless it syncs always: a SIGKILL can drop the
    # newest ones of any stream (ADR-0016), so the NATS fault runs with sync always, as production should.
    sync = "always" if request.node.callspec.params["fault"] is kill_nats else "default"
    nats_server = _nats(tmp_path / "nats", sync)
    nats_server.start()
    try:
        with prod_stack(postgres, nats_server, tmp_path, services=("authsvc", "bridge", "writer")) as s:
            s.start("rules")
            s.start("rules-2")
            assert wait_until(lambda: s.metric("rules", "kestrel_rules_partitions")
                              + s.metric("rules-2", "kestrel_rules_partitions") == 4, 20)  # fmt: skip
            yield s
    finally:
        nats_server.stop()


def kill_worker(s: ProdStack) -> None:
    s.kill("rules")
    assert wait_until(lambda: s.metric("rules-2", "kestrel_rules_partitions") == 4, 20), "no takeover"


def kill_nats(s: ProdStack) -> None:
    s.nats.stop(signal.SIGKILL)
    time.sleep(2)
    s.nats.start()


async def stream_counts(url: str, tenant: str, devices: list[str]) -> dict[str, tuple[int, int]]:
    """Per device: messages in TELEMETRY and in RULES_IN (where a lost reading went missing, when one does)."""
    nc = await nats.connect(url)
    try:
        js, counts = nc.jetstream(), {}
        for device in devices:
            found = []
            for stream, subject in (("TELEMETRY", f"v1.{tenant}.d.{device}.telemetry"),
                                    ("RULES_IN", f"rules.*.t.{tenant}.{device}")):  # fmt: skip
                sub = await js.pull_subscribe(subject, stream=stream)
                found.append(int((await sub.consumer_info()).num_pending))
                await sub.unsubscribe()
            counts[device] = (found[0], found[1])
        return counts
    finally:
        await nc.close()


async def rules_in_order(url: str, tenant: str, device: str) -> list[tuple[int, int]]:
    """The device's readings in RULES_IN as (stream sequence, reading seq), in stream order: whether a lost reading
    arrived after a newer one (and was dropped as late) or was skipped by the consumer."""
    nc = await nats.connect(url)
    try:
        sub = await nc.jetstream().pull_subscribe(f"rules.*.t.{tenant}.{device}", stream="RULES_IN")
        found: list[tuple[int, int]] = []
        with contextlib.suppress(TimeoutError):
            while True:
                for msg in await sub.fetch(100, timeout=1):
                    for point in json.loads(msg.data)["points"]:
                        found.append((msg.metadata.sequence.stream, point[1]))
        return found
    finally:
        await nc.close()


def stored(s: ProdStack, device: str) -> int:
    with psycopg.connect(s.url) as conn:
        row = conn.execute("SELECT count(*) FROM telemetry WHERE device_id = %s", (device,)).fetchone()
    return int(row[0]) if row else 0


async def alarm_stream_count(url: str, tenant: str) -> int:
    nc = await nats.connect(url)
    try:
        sub = await nc.jetstream().pull_subscribe(f"v1.{tenant}.d.*.alarm", stream=ALARM_STREAM)
        info = await sub.consumer_info()
        return int(info.num_pending)
    finally:
        await nc.close()


# Once an open defect: a NATS SIGKILL lost a reading per device of a partition in ~1 of 6 runs. The reading in flight
# at the kill was resent by the bridge only after its acknowledgement timeout (5 s), behind newer ones, and the
# worker skipped it as late. The bridge now resends what is unacknowledged, oldest first, as soon as it reconnects,
# and the worker evaluates a device's readings in time order within its reorder hold.
@pytest.mark.parametrize("fault", [kill_worker, kill_nats], ids=["worker-sigkill", "nats-sigkill"])
def test_no_transition_is_lost_or_repeated_when_a_worker_or_nats_dies(
    stack: ProdStack, fault: Callable[[ProdStack], None]
) -> None:
    s = stack
    tenant, devices = s.tenant(DEVICES, prefix="flip")
    auth = tenant_token(s.url, tenant)
    with (
        http_receiver() as receiver,
        TestClient[Litestar](
            create_app(ApiSettings(admin_token=Secret("x-" + str(time.time_ns()))), api_url_for(s.postgres, s.url))
        ) as api,
    ):
        hook = {"channel_id": "hook", "per_minute": 10_000, "config": {"kind": "webhook", "url": receiver.url("/ok")}}
        assert api.post(f"{V1}/channels", headers=auth, json=hook).status_code == 201
        temp = {"kind": "metric", "name": "temp"}
        rule = {"name": "flip", "metrics": ["temp"], "notify": ["hook"],
                "alarm": {"when": {"op": "compare", "cmp": "gt", "left": temp, "right": {"kind": "const", "value": 80}}}}  # fmt: skip
        assert api.post(f"{V1}/rules", headers=auth, json=rule).status_code == 201
        t0 = int(time.time() * 1000) - 120_000
        for device in devices:
            s.enrol(device)

        async def fleet() -> None:
            await asyncio.gather(*(
                publish(s, tenant, d, [reading(t0 + i * 100, i, temp=90 if i % 2 == 0 else 70) for i in range(READINGS)],
                        pause_s=0.05)
                for d in devices
            ))  # fmt: skip

        sender = threading.Thread(target=lambda: asyncio.run(fleet()))
        sender.start()
        time.sleep(0.8)  # mid-stream
        fault(s)
        sender.join(120)
        assert not sender.is_alive()

        def per_device() -> dict[str, list[str]]:
            with psycopg.connect(s.url) as conn:
                found = conn.execute(
                    "SELECT a.device_id, e.event FROM alarm_events e JOIN alarms a USING (alarm_id)"
                    " WHERE e.tenant_id = %s ORDER BY e.id", (tenant,)).fetchall()  # fmt: skip
            result: dict[str, list[str]] = {d: [] for d in devices}
            for device, event in found:
                result[device].append(event)
            return result

        expected = ["raised"] + ["cleared", "retriggered"] * ((READINGS - 2) // 2) + ["cleared"]
        if not wait_until(lambda: all(len(v) >= READINGS for v in per_device().values()), 90):
            diagnosis = {"transitions": {d: len(v) for d, v in per_device().items()},
                         "telemetry, rules_in": asyncio.run(stream_counts(s.nats.url, tenant, devices)),
                         "stored": {d: stored(s, d) for d in devices},
                         "rules_in order of the short devices": {
                             d: asyncio.run(rules_in_order(s.nats.url, tenant, d))
                             for d, v in per_device().items() if len(v) < READINGS}}  # fmt: skip
            ARTIFACTS.mkdir(exist_ok=True)
            report = ARTIFACTS / f"rules-faults-{fault.__name__}.txt"
            report.write_text(f"{diagnosis}\n--- rules\n{s.log('rules')}\n--- rules-2\n{s.log('rules-2')}\n")
            pytest.fail(f"transitions lost: {diagnosis} (logs in {report})")
        total = DEVICES * READINGS
        # The control for "nothing more": the deliveries of every transition were made before we count.
        assert wait_until(lambda: len({r.headers["Idempotency-Key"] for r in receiver.on("/ok")}) >= total, 90)
        assert per_device() == dict.fromkeys(devices, expected)
        with psycopg.connect(s.url) as conn:
            alarms = conn.execute("SELECT device_id, retriggers FROM alarms WHERE tenant_id = %s", (tenant,)).fetchall()
            deliveries = conn.execute("SELECT status, count(*) FROM deliveries WHERE tenant_id = %s GROUP BY status",
                                      (tenant,)).fetchall()  # fmt: skip
        assert sorted(alarms) == sorted((d, READINGS // 2 - 1) for d in devices)  # one alarm each, re-triggered
        assert dict(deliveries) == {"delivered": total}
        keys = Counter(r.headers["Idempotency-Key"] for r in receiver.on("/ok"))
        assert len(keys) == total
        events = Counter((json.loads(r.body)["device"], json.loads(r.body)["event"], json.loads(r.body)["at"])
                         for r in receiver.on("/ok"))  # fmt: skip
        assert len(events) == total  # each transition one key; a repeat (at-least-once HTTP) reuses its key
        # The outbox publishes after the commits (retrying while NATS is away): wait for every event, then no more.
        assert wait_until(lambda: asyncio.run(alarm_stream_count(s.nats.url, tenant)) >= total, 60)
        assert asyncio.run(alarm_stream_count(s.nats.url, tenant)) == total
        print(f"\n{fault.__name__}: {total} transitions, webhook sends {sum(keys.values())} (repeats with the same key: "
              f"{sum(keys.values()) - len(keys)})")  # fmt: skip
