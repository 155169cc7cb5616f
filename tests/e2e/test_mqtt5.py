"""MQTT 5 as the device contract claims it (issue 12, item 4), on the production path: devices over mTLS through our
Mosquitto plugin, every backend a principal. QoS 2, user properties (W3C traceparent) and content type, message expiry
of commands queued in the broker, correlation data, retained topics of decommissioned devices, MQTT 3.1.1 devices
under the same ACL, and the broker's packet limit. Every "did not happen" has a later message that did.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import paho.mqtt.client as paho
import psycopg
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from kestrel.devtools import seed
from kestrel.devtools.servers import PostgresServer
from kestrel.runtime.mqttclient import MqttError, MqttPublisher
from kestrel.store import commands, devices
from kestrel.store.session import operator, run_blocking
from kestrel_core import streams
from kestrel_device.client import DeviceClient
from tests.conftest import _nats, wait_until
from tests.jetstream_helpers import deadletters
from tests.prodstack import ProdStack, prod_stack

pytestmark = pytest.mark.e2e
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def stack(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProdStack]:
    root = tmp_path_factory.mktemp("mqtt5")
    nats_server = _nats(root / "nats")  # its own: the writer's durable consumer is not shared with other modules
    nats_server.start()
    try:
        with prod_stack(postgres, nats_server, root, services=("authsvc", "bridge", "writer", "devicesvc")) as s:
            yield s
    finally:
        nats_server.stop()


class PahoDevice:
    """A device on paho-mqtt (MQTT 5, mTLS): what it receives, with the properties, lands in ``received``."""

    def __init__(self, stack: ProdStack, tenant: str, device: str) -> None:
        self.base = f"v1/{tenant}/d/{device}"
        self.received: list[paho.MQTTMessage] = []
        self.arrived = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=device, protocol=paho.MQTTv5)
        self.client.tls_set_context(stack.enrol(device))
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect("127.0.0.1", stack.auth.mtls_port)
        self.client.loop_start()
        self.client.subscribe(f"{self.base}/cmd/+", qos=1)
        assert subscribed.wait(10), "no SUBACK"

    def _on_message(self, _client: Any, _userdata: Any, message: paho.MQTTMessage) -> None:
        self.received.append(message)
        self.arrived.set()

    def publish(self, topic: str, payload: bytes, qos: int = 1, **properties: Any) -> None:
        props = Properties(PacketTypes.PUBLISH)
        for name, value in properties.items():
            setattr(props, name, value)
        info = self.client.publish(topic, payload, qos=qos, properties=props)
        info.wait_for_publish(10)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def new_command(stack: ProdStack, tenant: str, device: str, name: str, expires_in_s: int, **params: Any) -> str:
    async def work(conn: Any) -> str:
        command = await commands.insert_command(
            conn, tenant, device, name, params, timeout_s=60,
            expires_at=datetime.now(UTC) + timedelta(seconds=expires_in_s), max_attempts=5, actor="test:mqtt5",
        )  # fmt: skip
        return command.command_id

    return run_blocking(stack.url, work, tenant=tenant)


def command_state(stack: ProdStack, command_id: str) -> tuple[str, list[str]]:
    with psycopg.connect(stack.url) as conn:
        status = conn.execute("SELECT status FROM commands WHERE command_id = %s", (command_id,)).fetchone()
        events = conn.execute(
            "SELECT event FROM command_events WHERE command_id = %s ORDER BY id", (command_id,)
        ).fetchall()
    assert status is not None
    return status[0], [e for (e,) in events]


def reading(seq: int) -> bytes:
    return json.dumps({"ts": int(time.time() * 1000), "seq": seq, "metrics": {"v": seq}}).encode()


# ---------------------------------------------------------------------------------------------------- telemetry


def test_qos2_readings_are_stored_exactly_once_and_carry_their_traceparent(stack: ProdStack) -> None:
    tenant, (device,) = stack.tenant(1, "q")
    dev = PahoDevice(stack, tenant, device)
    topic = f"{dev.base}/telemetry"
    try:
        first = reading(1)
        dev.publish(topic, first, qos=2, UserProperty=[("traceparent", TRACEPARENT)])
        dev.publish(topic, first, qos=2)  # the device sends it again (a lost PUBCOMP): a new message to the broker
        dev.publish(topic, reading(2), qos=2, UserProperty=[("traceparent", "not-a-trace")])
        for seq in range(3, 11):
            dev.publish(topic, reading(seq), qos=2)
    finally:
        dev.close()
    assert wait_until(lambda: {s for _, s in stack.stored(tenant)} == set(range(1, 11)), 20), stack.stored(tenant)
    assert sorted(s for _, s in stack.stored(tenant)) == list(range(1, 11))  # seq 1 once, although sent twice

    async def headers() -> list[dict[str, str]]:
        nc = await nats.connect(stack.nats.url)
        try:
            sub = await nc.jetstream().subscribe(topic.replace("/", "."), ordered_consumer=True)
            return [dict((await sub.next_msg(timeout=5)).headers or {}) for _ in range(2)]
        finally:
            await nc.close()

    with_trace, malformed = asyncio.run(headers())
    assert with_trace.get(streams.HDR_TRACEPARENT) == TRACEPARENT
    assert streams.HDR_TRACEPARENT not in malformed  # ignored, and the reading stored all the same


# ----------------------------------------------------------------------------------------------------- commands


def test_a_command_carries_its_mqtt5_properties_and_a_mismatched_correlation_is_refused(stack: ProdStack) -> None:
    tenant, (device,) = stack.tenant(1, "c")
    dev = PahoDevice(stack, tenant, device)
    try:
        command_id = new_command(stack, tenant, device, "reboot", 60, delay_s=1)
        assert dev.arrived.wait(20), "the command never arrived"
        message = dev.received[0]
        props = message.properties
        assert props is not None
        assert message.topic == f"{dev.base}/cmd/reboot"
        assert props.ResponseTopic == f"{dev.base}/cmd-res/{command_id}"
        assert props.CorrelationData == command_id.encode()
        assert props.ContentType == "application/json" and props.PayloadFormatIndicator == 1
        assert 0 < props.MessageExpiryInterval <= 60
        assert ("kestrel-attempt", "1") in props.UserProperty
        assert json.loads(message.payload)["params"] == {"delay_s": 1}

        answer = json.dumps({"status": "succeeded", "result": {"ok": True}}).encode()
        dev.publish(props.ResponseTopic, answer, CorrelationData=b"someone-elses-request")
        refused = asyncio.run(deadletters(stack.nats.url, topic_contains=f"{dev.base}/cmd-res/", expect=1))
        assert [d[streams.HDR_REASON] for d in refused] == ["correlation_mismatch"]
        dev.publish(props.ResponseTopic, answer, CorrelationData=props.CorrelationData)  # the control: accepted
        assert wait_until(lambda: command_state(stack, command_id)[0] == "succeeded", 20)
        _, events = command_state(stack, command_id)
        assert events.count("succeeded") == 1 and "duplicate_response" not in events
    finally:
        dev.close()


def test_a_command_that_expires_while_queued_in_the_broker_is_never_delivered(stack: ProdStack) -> None:
    """devicesvc sends while the device still counts as online (its link just died); the broker queues the command in
    the device's persistent session; its message expiry passes; the device comes back: the command is not run (the
    broker drops it, or, within the broker's one-second clock resolution, the SDK refuses it as expired on arrival),
    and the platform records ``expired``. The command sent after the device is back runs (the control)."""
    tenant, (device,) = stack.tenant(1, "x")
    ran: list[str] = []
    client = DeviceClient(tenant, device, "127.0.0.1", stack.auth.mtls_port, ssl=stack.enrol(device))

    async def run(params: dict[str, Any]) -> dict[str, Any]:
        ran.append(str(params["n"]))
        return {}

    client.on_command("run", run)

    async def scenario() -> str:
        await client.connect()
        client.drop()
        stale = await asyncio.to_thread(new_command, stack, tenant, device, "run", 3, n="stale")
        sent = await asyncio.to_thread(wait_until, lambda: command_state(stack, stale)[0] == "sent", 10)
        assert sent, f"devicesvc did not send while the device counted as online: {command_state(stack, stale)}"
        expired = await asyncio.to_thread(wait_until, lambda: command_state(stack, stale)[0] == "expired", 15)
        assert expired, command_state(stack, stale)
        await client.connect()
        fresh = await asyncio.to_thread(new_command, stack, tenant, device, "run", 60, n="fresh")
        done = await asyncio.to_thread(wait_until, lambda: command_state(stack, fresh)[0] == "succeeded", 20)
        assert done, command_state(stack, fresh)
        await client.disconnect()
        return stale

    stale = asyncio.run(scenario())
    assert ran == ["fresh"], f"the expired command reached the device: {ran}"
    status, events = command_state(stack, stale)  # resent while unanswered, never delivered
    assert status == "expired" and events[:2] == ["queued", "sent"] and "delivered" not in events, events


# ------------------------------------------------------------------------------------------------- retained state


def retained_statuses(stack: ProdStack, name: str, secret: str, topics: list[str]) -> dict[str, bytes]:
    """Subscribe to ``topics`` in order as a devicesvc-role principal and collect the retained messages: the broker
    sends them per subscription in order, so the last topic's arriving proves the earlier ones had their chance."""

    async def collect() -> dict[str, bytes]:
        client = MqttPublisher("127.0.0.1", stack.broker.port, f"svc:{name}:1", username=name, password=secret)
        await client.connect()
        try:
            for topic in topics:
                assert await client.subscribe(topic) < 0x80
            found: dict[str, bytes] = {}
            while topics[-1] not in found:
                topic, payload = await asyncio.wait_for(client.received.get(), 10)
                found[topic] = payload
            return found
        finally:
            await client.close()

    return asyncio.run(collect())


def test_decommissioning_clears_retained_topics_even_with_devicesvc_down(stack: ProdStack) -> None:
    tenant, (victim, sibling) = stack.tenant(2, "r")
    observer = f"observer-{uuid.uuid4().hex[:6]}"
    secret = seed.create_service_principal(stack.url, observer, "devices")
    topics = [f"v1/{tenant}/d/{victim}/status", f"v1/{tenant}/d/{sibling}/status"]
    clients = [
        DeviceClient(tenant, d, "127.0.0.1", stack.auth.mtls_port, ssl=stack.enrol(d)) for d in (victim, sibling)
    ]

    def cleared() -> bool:
        return topics[0] not in retained_statuses(stack, observer, secret, topics)

    async def scenario() -> None:
        for client in clients:
            await client.connect()
        before = await asyncio.to_thread(retained_statuses, stack, observer, secret, topics)
        assert topics[0] in before, "precondition: the device's retained status exists"
        await asyncio.to_thread(stack.kill, "devicesvc")
        await asyncio.to_thread(
            run_blocking, stack.url, lambda c: devices.decommission(c, operator(), tenant, victim), tenant=tenant
        )
        await asyncio.to_thread(stack.start, "devicesvc")
        gone = await asyncio.to_thread(wait_until, cleared, 20)
        assert gone, "the decommissioned device's retained status is still at the broker"
        await clients[1].disconnect()

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------------ ACL and packet limits


def test_an_mqtt311_device_is_confined_by_the_same_acl(stack: ProdStack) -> None:
    tenant, (device, sibling) = stack.tenant(2, "v")
    context = stack.enrol(device)

    async def scenario() -> None:
        client = MqttPublisher("127.0.0.1", stack.auth.mtls_port, device, version=4, tls=context)
        await client.connect()
        await client.publish(f"v1/{tenant}/d/{sibling}/telemetry", reading(1))  # 3.1.1 has no refusal code: dropped
        assert await client.subscribe(f"v1/{tenant}/d/{sibling}/cmd/+") == 0x80
        assert await client.subscribe(f"v1/{tenant}/d/{device}/cmd/+") == 1  # its own: granted (the control)
        await client.publish(f"v1/{tenant}/d/{device}/telemetry", reading(2))
        await client.close()

    asyncio.run(scenario())
    assert wait_until(lambda: (device, 2) in stack.stored(tenant), 20), "the allowed reading was not stored"
    assert stack.stored(tenant) == [(device, 2)]  # the sibling's topic carried nothing


def test_a_packet_above_the_broker_limit_ends_that_session_only(stack: ProdStack) -> None:
    tenant, (big, small) = stack.tenant(2, "m")
    contexts = {d: stack.enrol(d) for d in (big, small)}

    async def scenario() -> None:
        offender = MqttPublisher("127.0.0.1", stack.auth.mtls_port, big, tls=contexts[big])
        bystander = MqttPublisher("127.0.0.1", stack.auth.mtls_port, small, tls=contexts[small])
        await offender.connect()
        await bystander.connect()
        huge = json.dumps({"ts": int(time.time() * 1000), "seq": 1, "metrics": {"blob": "x" * 1_100_000}}).encode()
        with pytest.raises(MqttError):
            await offender.publish(f"v1/{tenant}/d/{big}/telemetry", huge)
        await asyncio.wait_for(offender.closed.wait(), 10)
        assert await bystander.publish(f"v1/{tenant}/d/{small}/telemetry", reading(7)) == 0
        await bystander.close()

    asyncio.run(scenario())
    assert wait_until(lambda: (small, 7) in stack.stored(tenant), 20)
    assert stack.stored(tenant) == [(small, 7)]
    assert stack.broker.alive()


def test_an_oversized_token_is_refused_for_good_and_others_get_in(stack: ProdStack) -> None:
    tenant, (device, other) = stack.tenant(2, "j")
    _kid, token = stack.jwt(tenant, other)

    async def scenario() -> None:
        for password in ("e" * 65_000, "x.y.z" * 13_000):  # near MQTT's 65,535-byte limit for a password
            client = MqttPublisher(
                "127.0.0.1", stack.auth.jwt_port, device, tls=stack.tls(), username=device, password=password
            )
            with pytest.raises(MqttError) as refused:
                await client.connect(connect_timeout=10)
            assert refused.value.reason_code in (0x86, 0x87), hex(refused.value.reason_code)  # not "try again"
        good = MqttPublisher("127.0.0.1", stack.auth.jwt_port, other, tls=stack.tls(), username=other, password=token)
        await good.connect()  # the control
        await good.close()

    asyncio.run(scenario())
    assert stack.broker.alive()
