"""End to end: real MQTT clients -> Mosquitto -> bridge processes -> JetStream -> writer process ->
PostgreSQL -> API process. Faults are injected into the real processes and loss is counted as in
reliability.md: lost = acknowledged by the broker but not stored (must be 0); duplicates = rows
minus distinct keys (must be 0); unknown = not acknowledged and not stored (reported)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import nats
import paho.mqtt.client as paho
import psycopg
import pytest

from kestrel.devtools.servers import MosquittoServer, NatsServer, PostgresServer, free_port, http_ok
from kestrel.devtools.simulate import Fleet
from kestrel_core import streams
from tests.conftest import Pipeline, ServiceProcess, Tenant, scrape, stored_rows, tenant_token, wait_until
from tests.jetstream_helpers import deadletters

pytestmark = pytest.mark.e2e
TOKEN = "platform-admin-e2e-token"


def now_ms() -> int:
    return int(time.time() * 1000)


def start_api(pipeline: Pipeline, api_database_url: str) -> ServiceProcess:
    port = free_port()
    env = dict(
        os.environ,
        KESTREL_API_DATABASE_URL=api_database_url,
        KESTREL_API_PORT=str(port),
        KESTREL_API_ADMIN_TOKEN=TOKEN,
    )
    proc = ServiceProcess(
        name="api", log_path=pipeline.root / "api.log", argv=[sys.executable, "-m", "api"], env=env, metrics_port=port
    )
    proc.start()
    pipeline.processes.append(proc)
    assert wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/readyz"), 20), "api did not become ready"
    return proc


def api_get(port: int, path: str, auth: dict[str, str]) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=auth)
    with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read())


def paho_publish(port: int, client_id: str, topic: str, payloads: list[bytes], qos: int = 1) -> None:
    """Publish with paho-mqtt over MQTT 5 and wait for every PUBACK."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        infos = [client.publish(topic, p, qos=qos) for p in payloads]
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def mosquitto_pub(port: int, topic: str, message: bytes, *, version: str = "mqttv311", qos: int = 1) -> None:
    subprocess.run(
        ["mosquitto_pub", "-p", str(port), "-V", version, "-q", str(qos), "-t", topic, "-s"],
        input=message,
        check=True,
        capture_output=True,
        timeout=10,
    )


def start_ingest(
    pipeline_factory: Callable[[NatsServer], Pipeline],
    nats: NatsServer,
    make_tenant: Callable[[int], Tenant],
    devices: int,
    **writer_settings: str,
) -> tuple[Tenant, Pipeline, ServiceProcess, ServiceProcess]:
    """A tenant of the test's own, with a writer and one bridge (client id ``bridge-<tenant>``) running."""
    tenant = make_tenant(devices)
    pipeline = pipeline_factory(nats)
    writer = pipeline.start_writer(**writer_settings)
    bridge = pipeline.start_bridge(f"bridge-{tenant.id}")
    return tenant, pipeline, writer, bridge


def test_publish_is_stored_and_served_by_the_api(
    pipeline_factory: Callable[[NatsServer], Pipeline],
    nats_server: NatsServer,
    mosquitto: MosquittoServer,
    make_tenant: Callable[[int], Tenant],
    api_database_url: str,
) -> None:
    tenant, pipeline, _writer, _bridge = start_ingest(pipeline_factory, nats_server, make_tenant, 3)
    api = start_api(pipeline, api_database_url)
    auth = tenant_token(pipeline.database_url, tenant.id, "telemetry:read")
    d5, d311, dbare = tenant.devices
    base = now_ms()
    paho_publish(
        mosquitto.port,
        d5,
        f"v1/{tenant.id}/d/{d5}/telemetry",
        [json.dumps({"ts": base + i, "seq": i, "metrics": {"temp": 20 + i}}).encode() for i in range(5)],
    )
    batch = [{"ts": base + i, "seq": i, "metrics": {"rpm": 1000 * i, "on": True}} for i in range(3)]
    mosquitto_pub(mosquitto.port, f"v1/{tenant.id}/d/{d311}/telemetry/engine", json.dumps(batch).encode())
    mosquitto_pub(
        mosquitto.port, f"v1/{tenant.id}/d/{dbare}/telemetry", b'{"temp": 21.5, "state": "ok"}', qos=0, version="mqttv5"
    )

    assert wait_until(lambda: len(stored_rows(pipeline.database_url, tenant.id)) == 9, 20)
    five = api_get(api.metrics_port, f"/api/v1/devices/{d5}/telemetry?metric=temp", auth)
    assert [p["value"] for p in five["points"]] == [20, 21, 22, 23, 24]
    assert [p["seq"] for p in five["points"]] == [0, 1, 2, 3, 4]
    engine = api_get(api.metrics_port, f"/api/v1/devices/{d311}/telemetry", auth)
    assert [p["stream"] for p in engine["points"]] == ["engine"] * 3
    assert engine["points"][2]["value"] == {"rpm": 2000, "on": True}
    bare = api_get(api.metrics_port, f"/api/v1/devices/{dbare}/telemetry", auth)
    assert bare["points"][0]["value"] == {"temp": 21.5, "state": "ok"}
    assert bare["points"][0]["seq"] is None


def test_duplicates_are_stored_once(
    pipeline_factory: Callable[[NatsServer], Pipeline],
    nats_server: NatsServer,
    mosquitto: MosquittoServer,
    make_tenant: Callable[[int], Tenant],
) -> None:
    tenant, pipeline, _writer, _bridge = start_ingest(pipeline_factory, nats_server, make_tenant, 1)
    device = tenant.devices[0]
    payload = json.dumps({"ts": now_ms(), "seq": 77, "metrics": {"t": 1}}).encode()
    topic = f"v1/{tenant.id}/d/{device}/telemetry"
    subject = topic.replace("/", ".")
    paho_publish(mosquitto.port, device, topic, [payload] * 3)
    mosquitto_pub(mosquitto.port, topic, payload)
    paho_publish(mosquitto.port, device, topic, [json.dumps({"ts": now_ms(), "seq": 78, "metrics": {"t": 2}}).encode()])
    assert wait_until(lambda: len(stored_rows(pipeline.database_url, tenant.id)) == 2, 20)
    time.sleep(1.0)  # give a wrongly stored copy time to appear
    assert sorted(stored_rows(pipeline.database_url, tenant.id)) == [(device, 77), (device, 78)]
    # The copies were already dropped by JetStream (Nats-Msg-Id), not only by the storage key.
    assert asyncio.run(stream_messages(pipeline.nats_url, subject)) == 2


async def stream_messages(url: str, subject: str) -> int:
    """Messages the TELEMETRY stream holds on ``subject``."""
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(streams.TELEMETRY_STREAM, subjects_filter=subject)
        return int((info.state.subjects or {}).get(subject, 0))
    finally:
        await nc.close()


def test_malformed_payloads_are_dead_lettered_while_good_traffic_continues(
    pipeline_factory: Callable[[NatsServer], Pipeline],
    nats_server: NatsServer,
    mosquitto: MosquittoServer,
    make_tenant: Callable[[int], Tenant],
) -> None:
    tenant, pipeline, _writer, bridge = start_ingest(pipeline_factory, nats_server, make_tenant, 1)
    device = tenant.devices[0]
    topic = f"v1/{tenant.id}/d/{device}/telemetry"
    bad: list[tuple[str, bytes, str]] = [
        (topic, b"not json at all", "not_json"),
        (topic, b'{"temp": 1e999}', "bad_value"),
        (topic, b'{"temp": "x", "nested": {"a": 1}}', "bad_schema"),
        (topic, json.dumps({"ts": now_ms() + 86_400_000, "seq": 1, "metrics": {"t": 1}}).encode(), "ts_out_of_range"),
        (topic, json.dumps({"ts": 1_000, "seq": 1, "metrics": {"t": 1}}).encode(), "ts_out_of_range"),
        (topic, b'{"t": "' + b"x" * 70_000 + b'"}', "payload_too_large"),
        (topic, b"\xff\xfe\x00", "not_json"),
        (f"v1/{tenant.id}/d/{device}.evil/telemetry", b'{"t": 1}', "bad_topic"),
    ]
    good = 0
    for t, payload, _ in bad:
        mosquitto_pub(mosquitto.port, t, payload, version="mqttv5")
        paho_publish(
            mosquitto.port, device, topic, [json.dumps({"ts": now_ms(), "seq": good, "metrics": {"n": good}}).encode()]
        )
        good += 1
    assert wait_until(lambda: len(stored_rows(pipeline.database_url, tenant.id)) == good, 20)
    dead = asyncio.run(deadletters(pipeline.nats_url, topic_contains=f"v1/{tenant.id}/", expect=len(bad)))
    assert sorted(d[streams.HDR_REASON] for d in dead) == sorted(reason for *_, reason in bad)
    assert all(d[streams.HDR_DETAIL] for d in dead)
    assert scrape(bridge.metrics_port, "kestrel_bridge_rejected_total") >= len(bad)
    assert bridge.alive()


def test_two_bridges_share_the_load(
    pipeline_factory: Callable[[NatsServer], Pipeline],
    nats_server: NatsServer,
    mosquitto: MosquittoServer,
    make_tenant: Callable[[int], Tenant],
) -> None:
    tenant = make_tenant(10)
    pipeline = pipeline_factory(nats_server)
    pipeline.start_writer()
    first = pipeline.start_bridge(f"bridge-a-{tenant.id}")
    second = pipeline.start_bridge(f"bridge-b-{tenant.id}")
    fleet = Fleet("127.0.0.1", mosquitto.port, tenant.id, tenant.devices, rate=400, record=True)
    stats = asyncio.run(fleet.run(count=40))
    assert stats.acked == 400
    assert wait_until(lambda: len(stored_rows(pipeline.database_url, tenant.id)) == 400, 30)
    a = scrape(first.metrics_port, "kestrel_bridge_messages_total")
    b = scrape(second.metrics_port, "kestrel_bridge_messages_total")
    assert a + b == 400
    assert a >= 100 and b >= 100, f"load not shared: {a} / {b}"


def count_loss(database_url: str, tenant: str, acked: dict[tuple[str, int], float]) -> tuple[int, int, int]:
    """(lost, duplicates, stored) per reliability.md."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT device_id, seq FROM telemetry WHERE tenant_id = %s", (tenant,)).fetchall()
    keys = {(d, s) for d, s in rows}
    lost = len([k for k in acked if k not in keys])
    return lost, len(rows) - len(keys), len(rows)


def assert_nothing_lost(pipeline: Pipeline, tenant: Tenant, acked: dict[tuple[str, int], float], label: str) -> None:
    """Wait until everything acknowledged is stored, then count: 0 lost and 0 duplicates (reliability.md)."""
    assert wait_until(lambda: count_loss(pipeline.database_url, tenant.id, acked)[2] >= len(acked), 90)
    time.sleep(1.0)  # give a wrongly stored extra copy time to appear
    lost, duplicates, stored = count_loss(pipeline.database_url, tenant.id, acked)
    print(f"{label}: acked={len(acked)} stored={stored} lost={lost} duplicates={duplicates}")
    assert (lost, duplicates) == (0, 0)


def run_fleet_with_fault(
    tenant: Tenant, port: int, fault: Callable[[], None], *, rate: float = 1500, duration: float = 8.0
) -> dict[tuple[str, int], float]:
    fleet = Fleet("127.0.0.1", port, tenant.id, tenant.devices, rate=rate, record=True)

    async def main() -> None:
        task = asyncio.create_task(fleet.run(duration=duration))
        await asyncio.sleep(duration / 3)
        await asyncio.to_thread(fault)
        await task

    asyncio.run(main())
    assert fleet.stats.acked > rate * duration * 0.5, fleet.stats
    return fleet.stats.acked_keys


@pytest.mark.slow
def test_writer_killed_mid_batch_loses_and_duplicates_nothing(
    pipeline_factory: Callable[[NatsServer], Pipeline],
    fresh_nats: NatsServer,
    mosquitto: MosquittoServer,
    make_tenant: Callable[[int], Tenant],
) -> None:
    tenant, pipeline, writer, _bridge = start_ingest(
        pipeline_factory, fresh_nats, make_tenant, 40, batch_size="2000", flush_interval_s="0.2", ack_wait_s="5"
    )

    def kill_and_restart() -> None:
        assert wait_until(lambda: scrape(writer.metrics_port, "kestrel_writer_messages_total") > 0, 10)
        writer.kill()  # SIGKILL: no drain, batches in flight are lost from memory
        time.sleep(1.5)
        pipeline.start_writer(name="writer-2", batch_size="2000", flush_interval_s="0.2", ack_wait_s="5")

    acked = run_fleet_with_fault(tenant, mosquitto.port, kill_and_restart)
    assert_nothing_lost(pipeline, tenant, acked, "writer SIGKILL")


@pytest.mark.slow
@pytest.mark.parametrize("fresh_nats", ["default", "always"], indirect=True, ids=["sync-default", "sync-always"])
def test_nats_restarted_under_load_loses_and_duplicates_nothing(
    pipeline_factory: Callable[[NatsServer], Pipeline],
    fresh_nats: NatsServer,
    mosquitto: MosquittoServer,
    make_tenant: Callable[[int], Tenant],
) -> None:
    tenant, pipeline, _writer, _bridge = start_ingest(pipeline_factory, fresh_nats, make_tenant, 40)

    def restart_nats() -> None:
        fresh_nats.stop(signal.SIGKILL)
        time.sleep(1.0)
        fresh_nats.start()

    acked = run_fleet_with_fault(tenant, mosquitto.port, restart_nats)
    assert_nothing_lost(pipeline, tenant, acked, f"NATS SIGKILL+restart ({fresh_nats.sync})")


@pytest.mark.slow
def test_bridge_killed_while_jetstream_is_down_loses_and_duplicates_nothing(
    pipeline_factory: Callable[[NatsServer], Pipeline],
    fresh_nats: NatsServer,
    mosquitto: MosquittoServer,
    make_tenant: Callable[[int], Tenant],
) -> None:
    """The bridge PUBACKs only after JetStream's ack. With JetStream down it holds a full receive window of
    unacknowledged messages; killing it then must lose none of them: the broker redelivers them to the
    persistent session, and the storage key absorbs copies JetStream may already have had. (With an early
    PUBACK this test loses up to the whole window.)"""
    tenant = make_tenant(40)
    pipeline = pipeline_factory(fresh_nats)
    pipeline.start_writer()
    client_id = f"bridge-{tenant.id}"
    bridge = pipeline.start_bridge(client_id)

    def kill_while_jetstream_is_down() -> None:
        fresh_nats.stop(signal.SIGKILL)
        time.sleep(1.5)  # the bridge now holds messages it cannot forward
        bridge.kill()
        fresh_nats.start()
        pipeline.start_bridge(client_id)  # same client id: resumes the persistent session

    acked = run_fleet_with_fault(tenant, mosquitto.port, kill_while_jetstream_is_down)
    assert_nothing_lost(pipeline, tenant, acked, "bridge SIGKILL with JetStream down")


@pytest.mark.slow
def test_database_restart_under_load_naks_then_stores_everything(
    pipeline_factory: Callable[[NatsServer], Pipeline],
    fresh_nats: NatsServer,
    mosquitto: MosquittoServer,
    postgres: PostgresServer,
    make_tenant: Callable[[int], Tenant],
) -> None:
    """PostgreSQL going away is transient: the writer naks with backoff and stores everything once it is back."""
    tenant, pipeline, writer, _bridge = start_ingest(pipeline_factory, fresh_nats, make_tenant, 40)

    def restart_database() -> None:
        postgres.stop()
        time.sleep(2.0)
        postgres.start()

    acked = run_fleet_with_fault(tenant, mosquitto.port, restart_database)
    assert_nothing_lost(pipeline, tenant, acked, "PostgreSQL restart")
    assert scrape(writer.metrics_port, "kestrel_writer_messages_total") > 0
    assert scrape(writer.metrics_port, "kestrel_writer_messages_total", outcome="nak") > 0, (
        "the writer never took the transient-error path"
    )


@pytest.mark.slow
def test_rolling_restart_drains_gracefully_and_loses_nothing(
    pipeline_factory: Callable[[NatsServer], Pipeline],
    fresh_nats: NatsServer,
    mosquitto: MosquittoServer,
    make_tenant: Callable[[int], Tenant],
) -> None:
    """SIGTERM (a deploy): each service drains, exits 0, and its replacement carries on with nothing lost."""
    tenant = make_tenant(40)
    pipeline = pipeline_factory(fresh_nats)
    writer = pipeline.start_writer()
    client_id = f"bridge-{tenant.id}"
    bridge = pipeline.start_bridge(client_id)
    exit_codes: dict[str, int | None] = {}

    def rolling_restart() -> None:
        for proc, restart in (
            (writer, lambda: pipeline.start_writer(name="writer-2")),
            (bridge, lambda: pipeline.start_bridge(client_id)),
        ):
            assert proc.proc is not None
            popen = proc.proc
            proc.send_signal(signal.SIGTERM)
            exit_codes[proc.name] = popen.wait(30)
            restart()

    acked = run_fleet_with_fault(tenant, mosquitto.port, rolling_restart)
    assert_nothing_lost(pipeline, tenant, acked, "rolling restart")
    assert exit_codes == {"writer": 0, client_id: 0}
