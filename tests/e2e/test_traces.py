"""OpenTelemetry traces over OTLP (issue 15, item 6; ADR-0028), on the production path: a device over mTLS through
our Mosquitto plugin sends readings with and without a W3C traceparent; the bridge and the writer, configured with
``KESTREL_OTLP_ENDPOINT``, export their spans over OTLP/HTTP to a receiver on loopback that decodes them with the
OTLP protobuf schema. One trace must show device → bridge → writer, the context travelling in the NATS header."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import paho.mqtt.client as paho
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from kestrel.devtools.servers import PostgresServer
from kestrel_core import streams
from tests.conftest import _nats, wait_until
from tests.prodstack import ProdStack, prod_stack
from tests.receivers import HttpReceiver, http_receiver

pytestmark = pytest.mark.e2e
PATH = "/v1/traces"


def traceparent(trace_id: str, span_id: str, sampled: bool = True) -> str:
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


@dataclass(frozen=True)
class Exported:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent: str
    attributes: dict[str, Any]


def exported(receiver: HttpReceiver) -> list[Exported]:
    spans = []
    for request in receiver.on(PATH):
        decoded = ExportTraceServiceRequest.FromString(request.body)
        for resource_spans in decoded.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    attributes = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}
                    spans.append(Exported(resource["service.name"], span.name, span.trace_id.hex(), span.span_id.hex(),
                                          span.parent_span_id.hex(), attributes))  # fmt: skip
    return spans


@pytest.fixture(scope="module")
def traced(
    postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProdStack, HttpReceiver]]:
    root: Path = tmp_path_factory.mktemp("traces")
    nats_server = _nats(root / "nats")
    nats_server.start()
    try:
        with http_receiver() as receiver:
            otlp = {"KESTREL_OTLP_ENDPOINT": receiver.url(PATH), "OTEL_BSP_SCHEDULE_DELAY": "200"}
            env = {"bridge": otlp, "writer": otlp, "devicesvc": otlp}
            services = ("authsvc", "bridge", "writer", "devicesvc")
            with prod_stack(postgres, nats_server, root, services=services, extra_env=env) as s:
                yield s, receiver
    finally:
        nats_server.stop()


def publish(
    stack: ProdStack, tenant: str, device: str, readings: list[tuple[int, str | None]], kind: str = "telemetry"
) -> None:
    """Readings (seq, traceparent or None) over mTLS, each acknowledged before the next; with ``kind``
    ``state/reported``, reported states ``{"n": seq}`` instead."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=device, protocol=paho.MQTTv5)
    client.tls_set_context(stack.enrol(device))
    client.connect("127.0.0.1", stack.auth.mtls_port)
    client.loop_start()
    try:
        for seq, trace in readings:
            properties = Properties(PacketTypes.PUBLISH)
            if trace is not None:
                properties.UserProperty = [("traceparent", trace)]
            now = int(time.time() * 1000)
            document = {"ts": now, "seq": seq, "metrics": {"temp": seq}} if kind == "telemetry" else {
                "ts": now, "state": {"n": seq}}  # fmt: skip
            info = client.publish(f"v1/{tenant}/d/{device}/{kind}", json.dumps(document).encode(), qos=1,
                                  properties=properties)  # fmt: skip
            info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_devices_trace_shows_the_bridge_and_the_writer_and_only_sampled_readings_are_traced(
    traced: tuple[ProdStack, HttpReceiver],
) -> None:
    stack, receiver = traced
    tenant, (device,) = stack.tenant(1, "tr")
    first, unsampled, control = (
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "5c0a92f3577b34da6a3ce929d0e0e473",
        "6d1b03a4688c45eb4b3da7a3ce929d0e",
    )
    device_span = "00f067aa0ba902b7"
    publish(stack, tenant, device, [
        (1, traceparent(first, device_span)),
        (2, None),  # no context, and readings without one are not sampled (KESTREL_OTLP_SAMPLE_RATIO = 0)
        (3, traceparent(unsampled, device_span, sampled=False)),  # the device did not sample it
        (4, traceparent(control, device_span)),  # the positive control, sent last
    ])  # fmt: skip
    assert wait_until(lambda: {s for _, s in stack.stored(tenant)} == {1, 2, 3, 4}, 20)

    def control_exported() -> bool:
        return {s.service for s in exported(receiver) if s.trace_id == control} == {"kestrel-bridge", "kestrel-writer"}

    assert wait_until(control_exported, 20), exported(receiver)
    spans = [s for s in exported(receiver) if s.service in ("kestrel-bridge", "kestrel-writer")]
    assert {s.trace_id for s in spans} == {first, control}, spans  # nothing for readings 2 and 3
    (bridge,) = [s for s in spans if s.trace_id == first and s.service == "kestrel-bridge"]
    (writer,) = [s for s in spans if s.trace_id == first and s.service == "kestrel-writer"]
    assert bridge.parent == device_span and writer.parent == bridge.span_id
    msg_id = bridge.attributes["kestrel.msg_id"]
    assert msg_id.startswith(f"{tenant}.{device}.") and writer.attributes["kestrel.msg_id"] == msg_id

    async def header_of_first() -> str | None:
        nc = await nats.connect(stack.nats.url)
        try:
            sub = await nc.jetstream().subscribe(f"v1.{tenant}.d.{device}.telemetry", ordered_consumer=True)
            return (await sub.next_msg(timeout=5)).headers.get(streams.HDR_TRACEPARENT)  # type: ignore[union-attr]
        finally:
            await nc.close()

    # JetStream holds the bridge's context, so that the writer's span is the bridge's child in the same trace.
    assert asyncio.run(header_of_first()) == traceparent(first, bridge.span_id)


def test_a_reported_state_with_a_trace_context_is_traced_through_devicesvc(
    traced: tuple[ProdStack, HttpReceiver],
) -> None:
    stack, receiver = traced
    tenant, (device,) = stack.tenant(1, "trs")
    report, control, device_span = (
        "7e2c14b5799d56fb5c4fa0b3d1f1a830",
        "8f3d25c68aae67ac6d5fb1c4e2a2b941",
        "11f067aa0ba902b7",
    )
    publish(stack, tenant, device, [(1, None), (2, traceparent(report, device_span)), (3, None),
                                    (4, traceparent(control, device_span))], kind="state/reported")  # fmt: skip

    def control_exported() -> bool:
        return any(s.trace_id == control and s.service == "kestrel-devicesvc" for s in exported(receiver))

    assert wait_until(control_exported, 20), exported(receiver)
    mine = [s for s in exported(receiver) if s.service == "kestrel-devicesvc"]
    assert {s.trace_id for s in mine} == {report, control}, mine  # reports 1 and 3 start no trace
    (span,) = [s for s in mine if s.trace_id == report]
    assert span.name == "kestrel.devicesvc report" and span.parent == device_span
    assert span.attributes["kestrel.device"] == device and span.attributes["kestrel.tenant"] == tenant
