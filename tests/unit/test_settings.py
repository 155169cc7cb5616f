from __future__ import annotations

import msgspec
import pytest

from kestrel.runtime.tracing import TracingSettings, tracing
from kestrel.store import DatabaseSettings
from kestrel_core.errors import InvalidInput
from kestrel_core.settings import Secret, from_env


class Sample(msgspec.Struct, frozen=True, kw_only=True):
    port: int = 1
    name: str = "x"
    token: Secret = msgspec.field(default_factory=lambda: Secret(""))


def test_reads_prefixed_variables_and_converts_types() -> None:
    s = from_env(Sample, "KESTREL_T", {"KESTREL_T_PORT": "8080", "KESTREL_T_TOKEN": "s3cret", "OTHER_PORT": "1"})
    assert s.port == 8080
    assert s.token.reveal() == "s3cret"


def test_secrets_never_print() -> None:
    s = from_env(DatabaseSettings, "KESTREL_DATABASE", {"KESTREL_DATABASE_URL": "postgresql://u:hunter2@h/db"})
    assert "hunter2" not in repr(s)
    assert "hunter2" not in str(s.url)
    assert s.url.reveal().endswith("@h/db")


def test_bad_value_names_the_prefix() -> None:
    with pytest.raises(InvalidInput) as info:
        from_env(Sample, "KESTREL_T", {"KESTREL_T_PORT": "eighty"})
    assert info.value.reason == "bad_setting"
    assert "KESTREL_T" in info.value.detail


def test_stream_replicas_come_from_the_environment_and_a_bad_value_is_one_clear_error() -> None:
    from kestrel.runtime.nats import stream_replicas  # noqa: PLC0415

    assert stream_replicas({}) == 1
    assert stream_replicas({"KESTREL_NATS_REPLICAS": "3"}) == 3
    for bad in ("0", "6", "three", "-1", ""):
        with pytest.raises(InvalidInput, match="KESTREL_NATS_REPLICAS must be 1 to 5"):
            stream_replicas({"KESTREL_NATS_REPLICAS": bad})


def test_the_telemetry_retention_comes_from_the_environment_within_bounds() -> None:
    from kestrel.runtime.nats import telemetry_retention_s  # noqa: PLC0415

    assert telemetry_retention_s({}) == 7 * 86400
    assert telemetry_retention_s({"KESTREL_TELEMETRY_RETENTION_S": "86400"}) == 86400
    for bad in ("60", "99999999999", "1d", ""):
        with pytest.raises(InvalidInput, match="KESTREL_TELEMETRY_RETENTION_S must be"):
            telemetry_retention_s({"KESTREL_TELEMETRY_RETENTION_S": bad})


def test_traces_are_off_by_default_and_bad_tracing_settings_are_refused() -> None:
    assert tracing("bridge", "b-1", from_env(TracingSettings, "KESTREL_OTLP", {})) is None
    good = {"KESTREL_OTLP_ENDPOINT": "http://127.0.0.1:4318/v1/traces", "KESTREL_OTLP_SAMPLE_RATIO": "0.25"}
    settings = from_env(TracingSettings, "KESTREL_OTLP", good)
    assert settings.sample_ratio == 0.25
    traces = tracing("bridge", "b-1", settings)
    assert traces is not None
    assert traces.start("x", None, {}, root=True) is not None  # a ratio above 0 starts traces at the first hop
    assert traces.start("x", None, {}) is None  # and only there: a later hop without a context starts none
    traces.close()
    for name, value in (("ENDPOINT", "collector:4318"), ("SAMPLE_RATIO", "1.5"), ("SAMPLE_RATIO", "-0.1")):
        with pytest.raises(InvalidInput, match="KESTREL_OTLP_"):
            from_env(TracingSettings, "KESTREL_OTLP", good | {f"KESTREL_OTLP_{name}": value})
