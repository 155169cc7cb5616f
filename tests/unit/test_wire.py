"""Device payload validation: every accepted form and every rejection reason (ADR-0005)."""

from __future__ import annotations

import json
import time

import msgspec
import pytest

from kestrel_core.errors import InvalidInput
from kestrel_core.messages.telemetry import NO_SEQ, TelemetryLimits, decode_envelope, normalize
from kestrel_core.topics import telemetry_topic

TOPIC = telemetry_topic("acme", "dev-1")
NOW_US = int(time.time() * 1_000_000)
NOW_MS = NOW_US // 1000
LIMITS = TelemetryLimits()


def norm(payload: object, *, raw: bytes | None = None, limits: TelemetryLimits = LIMITS):  # type: ignore[no-untyped-def]
    return normalize(TOPIC, raw if raw is not None else json.dumps(payload).encode(), NOW_US, limits)


def test_single_reading_keeps_device_identity() -> None:
    out = norm({"ts": NOW_MS, "seq": 7, "metrics": {"temp": 21.5, "ok": True, "mode": "eco", "n": 3}})
    env = decode_envelope(out.payload)
    assert env.identity == "device"
    assert out.subject == "v1.acme.d.dev-1.telemetry"
    assert out.msg_id == f"acme.dev-1..{NOW_MS * 1000}.7"
    [point] = env.points
    assert (point.ts_us, point.seq) == (NOW_MS * 1000, 7)
    assert msgspec.json.decode(point.metrics) == {"temp": 21.5, "ok": True, "mode": "eco", "n": 3}


def test_rfc3339_timestamp_and_missing_seq() -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(NOW_MS // 1000)) + ".250+00:00"
    env = decode_envelope(norm({"ts": stamp, "metrics": {"t": 1}}).payload)
    assert env.points[0].seq == NO_SEQ
    assert env.points[0].ts_us == (NOW_MS // 1000) * 1_000_000 + 250_000


def test_batch_identity_covers_first_and_last() -> None:
    out = norm([{"ts": NOW_MS + i, "seq": i, "metrics": {"t": i}} for i in range(3)])
    assert out.points == 3
    assert out.msg_id == f"acme.dev-1..{NOW_MS * 1000}.0.{(NOW_MS + 2) * 1000}.2.3"


def test_bare_form_gets_server_time_and_identity() -> None:
    out = norm({"temp": 21.5, "door_open": False})
    env = decode_envelope(out.payload)
    assert env.identity == "server"
    assert env.points[0].ts_us == NOW_US
    assert env.points[0].seq == NO_SEQ
    assert out.msg_id == f"acme.dev-1..r{NOW_US}"


def test_same_reading_twice_has_same_id() -> None:
    payload = {"ts": NOW_MS, "seq": 1, "metrics": {"t": 1}}
    assert norm(payload).msg_id == norm(payload).msg_id


REJECTED = [
    ("not json", None, b"{not json", "not_json"),
    ("not utf-8", None, b'{"t": "\xff"}', "not_json"),
    ("empty", None, b"", "not_json"),
    ("json string", "hello", None, "bad_schema"),
    ("json number", 42, None, "bad_schema"),
    ("nested object in bare", {"t": {"x": 1}}, None, "bad_schema"),
    ("null value", {"t": None}, None, "bad_schema"),
    ("list value", {"t": [1, 2]}, None, "bad_schema"),
    ("empty bare", {}, None, "bad_schema"),
    ("reading without metrics", {"ts": NOW_MS, "seq": 1}, None, "bad_schema"),
    ("reading with empty metrics", {"ts": NOW_MS, "metrics": {}}, None, "bad_schema"),
    ("reading with unknown field", {"ts": NOW_MS, "metrics": {"t": 1}, "x": 1}, None, "bad_schema"),
    ("ts as bool", {"ts": True, "metrics": {"t": 1}}, None, "bad_schema"),
    ("ts without zone", {"ts": "2026-11-27T10:00:00", "metrics": {"t": 1}}, None, "bad_schema"),
    ("seq as string", {"ts": NOW_MS, "seq": "1", "metrics": {"t": 1}}, None, "bad_schema"),
    ("negative seq", {"ts": NOW_MS, "seq": -5, "metrics": {"t": 1}}, None, "bad_seq"),
    ("empty batch", [], None, "bad_schema"),
    ("infinity", None, b'{"t": 1e999}', "bad_value"),
    ("nan literal", None, b'{"t": NaN}', "not_json"),
    ("int beyond 64 bits", None, b'{"t": 100000000000000000000}', "bad_value"),
    ("long string", {"t": "x" * 257}, None, "bad_value"),
    ("bad metric name", {"bad name": 1}, None, "bad_metric_name"),
    ("metric name with slash", {"a/b": 1}, None, "bad_metric_name"),
    ("too many metrics", {f"m{i}": i for i in range(257)}, None, "too_many_metrics"),
    ("ts in seconds, not ms", {"ts": NOW_MS // 1000, "metrics": {"t": 1}}, None, "ts_out_of_range"),
    ("ts far in the future", {"ts": NOW_MS + 3_600_000, "metrics": {"t": 1}}, None, "ts_out_of_range"),
    ("ts far in the past", {"ts": NOW_MS - 40 * 86_400_000, "metrics": {"t": 1}}, None, "ts_out_of_range"),
    (
        "too many readings",
        [{"ts": NOW_MS, "seq": i, "metrics": {"t": 1}} for i in range(1001)],
        None,
        "too_many_readings",
    ),
]


@pytest.mark.parametrize(("payload", "raw", "reason"), [r[1:] for r in REJECTED], ids=[r[0] for r in REJECTED])
def test_rejections_carry_a_reason(payload: object, raw: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidInput) as info:
        norm(payload, raw=raw)
    assert info.value.reason == reason
    assert info.value.detail


def test_nul_characters_are_refused_because_jsonb_cannot_store_them() -> None:
    with pytest.raises(InvalidInput) as info:
        norm({"t": "a\u0000b"})
    assert info.value.reason == "bad_value"


def test_oversize_payload() -> None:
    with pytest.raises(InvalidInput) as info:
        norm(None, raw=b'{"t": "' + b"x" * 70_000 + b'"}')
    assert info.value.reason == "payload_too_large"


def test_envelope_decoder_refuses_foreign_data() -> None:
    with pytest.raises(InvalidInput) as info:
        decode_envelope(b'{"hello": "world"}')
    assert info.value.reason == "bad_envelope"
