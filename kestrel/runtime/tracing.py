"""OpenTelemetry traces of a reading's way through ingestion, exported over OTLP/HTTP when configured (issue 15,
ADR-0028). Off by default: with no endpoint nothing here is built and the services pass the device's ``traceparent``
on as before.

A reading that arrives with a device's W3C ``traceparent`` (an MQTT 5 user property) is followed whenever that
context is sampled: the bridge's span is its child and replaces it in the NATS header, so that the writer's span
is the bridge's child; one trace then shows device → bridge → JetStream → PostgreSQL. A reading without one starts
a trace for ``sample_ratio`` of readings (0 by default: devices decide). Spans are batched and exported by the
SDK's background thread; a collector that is down costs dropped spans, never a reading.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Annotated, Any, Final

import msgspec
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from kestrel import __version__
from kestrel_core.settings import from_env

__all__ = ["Span", "Tracing", "TracingSettings", "service_tracing", "tracing"]
TRACEPARENT: Final = "traceparent"
_PROPAGATOR: Final = TraceContextTextMapPropagator()


class TracingSettings(msgspec.Struct, frozen=True, kw_only=True):
    """``KESTREL_OTLP_*``, read by every process that traces (the ingest bridge and writer, devicesvc)."""

    #: OTLP/HTTP traces endpoint (e.g. ``http://otel-collector:4318/v1/traces``); empty: no traces.
    endpoint: Annotated[str, msgspec.Meta(pattern=r"^(https?://\S+)?$")] = ""
    #: Share of readings without a device trace context that start a trace (0 to 1).
    sample_ratio: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.0
    #: How long one export may wait for the collector.
    timeout_s: Annotated[float, msgspec.Meta(gt=0.0)] = 10.0


class Tracing:
    """One service's tracer and exporter; ``None`` stands for "not configured" where services hold one."""

    def __init__(self, service: str, instance: str, settings: TracingSettings) -> None:
        resource = Resource.create(
            {"service.name": f"kestrel-{service}", "service.instance.id": instance, "service.version": __version__}
        )
        self.provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)))
        exporter = OTLPSpanExporter(endpoint=settings.endpoint, timeout=settings.timeout_s)
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("kestrel", __version__)
        self.roots = settings.sample_ratio > 0.0

    def start(
        self,
        name: str,
        traceparent: str | None,
        attributes: Mapping[str, Any],
        start_ns: int | None = None,
        *,
        root: bool = False,
    ) -> Span | None:
        """A span under ``traceparent``; without one, a new trace only at a ``root`` (the first hop: the bridge) when
        readings are sampled. None when no trace is wanted, so the hot path builds nothing."""
        if traceparent is None and not (root and self.roots):
            return None
        parent = _PROPAGATOR.extract({TRACEPARENT: traceparent}) if traceparent is not None else None
        return self.tracer.start_span(
            name, context=parent, kind=SpanKind.CONSUMER, attributes=dict(attributes), start_time=start_ns
        )

    @staticmethod
    def traceparent(span: Span) -> str | None:
        """The W3C header that makes the next hop's span a child of ``span``."""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        return carrier.get(TRACEPARENT)

    def close(self) -> None:
        """Export what is still batched (at shutdown)."""
        self.provider.shutdown()


def tracing(service: str, instance: str, settings: TracingSettings) -> Tracing | None:
    return Tracing(service, instance, settings) if settings.endpoint else None


@contextmanager
def service_tracing(service: str, instance: str) -> Iterator[Tracing | None]:
    """A composition root's tracing from ``KESTREL_OTLP_*`` (None when off), flushed when the service ends."""
    traces = tracing(service, instance, from_env(TracingSettings, "KESTREL_OTLP"))
    try:
        yield traces
    finally:
        if traces is not None:
            traces.close()
