"""End to end: real MQTT clients -> Mosquitto -> bridge processes -> JetStream -> writer process -> PostgreSQL -> API
process, on the development broker (no plugin), for what the pipeline does with the data itself: storage and serving,
deduplication, dead letters, bridges sharing the load. Faults are injected on the production path (devices over mTLS
through the plugin, every service a principal) in test_faults.py."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import nats
import paho.mqtt.client as paho
import pytest

from kestrel.devtools.servers import MosquittoServer, NatsServer, free_port, http_ok
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
    # The positive control: 78 went through the same bridge, stream and writer after every copy of 77, in order, so
    # once 78 is stored each copy has been handled (dropped, or stored and then visible here).
    assert wait_until(lambda: (device, 78) in stored_rows(pipeline.database_url, tenant.id), 20)
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


def _log_lines(process: ServiceProcess, message: str) -> list[dict[str, Any]]:
    found = []
    for line in process.log_path.read_text().splitlines():
        if line.startswith("{") and f'"msg": "{message}"' in line:
            found.append(json.loads(line))
    return found


def test_a_message_id_and_the_devices_trace_context_follow_a_reading_from_the_bridge_to_the_database(
    pipeline_factory: Callable[[NatsServer], Pipeline],
    nats_server: NatsServer,
    mosquitto: MosquittoServer,
    make_tenant: Callable[[int], Tenant],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With KESTREL_LOG_LEVEL=DEBUG the bridge logs each reading's message id (the stored row's identity) and the
    device's W3C traceparent as it receives it and as JetStream stores it, and the writer logs the same two when the
    row is committed: one grep follows a reading through the pipeline."""
    monkeypatch.setenv("KESTREL_LOG_LEVEL", "DEBUG")
    tenant, pipeline, writer, bridge = start_ingest(pipeline_factory, nats_server, make_tenant, 1)
    (device,) = tenant.devices
    ts, trace = now_ms(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=device, protocol=paho.MQTTv5)
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    try:
        properties = paho.Properties(paho.PacketTypes.PUBLISH)
        properties.UserProperty = [("traceparent", trace)]
        info = client.publish(f"v1/{tenant.id}/d/{device}/telemetry",
                              json.dumps({"ts": ts, "seq": 7, "metrics": {"temp": 1}}).encode(), qos=1,
                              properties=properties)  # fmt: skip
        info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()
    assert wait_until(lambda: len(stored_rows(pipeline.database_url, tenant.id)) == 1, 20)
    msg_id = f"{tenant.id}.{device}..{ts * 1000}.7"  # tenant.device.stream.ts_us.seq: the row's identity
    assert wait_until(lambda: _log_lines(writer, "telemetry stored"), 10)
    for process, message in ((bridge, "telemetry received"), (bridge, "telemetry in jetstream"),
                             (writer, "telemetry stored")):  # fmt: skip
        lines = [line for line in _log_lines(process, message) if line.get("msg_id") == msg_id]
        assert lines and lines[0].get("traceparent") == trace, (message, _log_lines(process, message)[-3:])
