"""Wire model for device telemetry and the platform's internal envelope (ADR-0005).

Devices publish JSON on ``v1/{tenant}/d/{device}/telemetry[/{stream}]`` in one of three forms:

* a single reading  ``{"ts": 1764250000123, "seq": 42, "metrics": {"temp": 21.5}}``
* a batch           ``[{"ts": ..., "seq": ..., "metrics": {...}}, ...]``
* the bare form     ``{"temp": 21.5, "door_open": false}``

``ts`` is epoch milliseconds (integer) or an RFC 3339 string with a zone. Metric values are
numbers, booleans or short strings. Readings that carry ``ts`` are stored exactly once, keyed by
``(tenant, device, stream, ts, seq)``; ``seq`` is optional and stored as -1 when absent. The bare form
has no device identity: it is stamped with the bridge's receive time and stored at least once
(a bridge crash between the JetStream ack and the PUBACK can store it twice).

The bridge validates once (``normalize``) and publishes a ``TelemetryEnvelope`` whose metrics are
already-encoded JSON, so the writer streams them into a jsonb column without re-encoding.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Annotated, Final, Literal

import msgspec

from kestrel_core.errors import InvalidInput
from kestrel_core.topics import TelemetryTopic

MetricValue = bool | int | float | str
NO_SEQ: Final = -1
_METRIC_NAME = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}\Z")
_MAX_INT = 2**63 - 1
RESERVED_KEYS: Final = frozenset({"ts", "seq", "metrics"})


class Reading(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One timestamped set of metric values as a device sends it."""

    ts: int | Annotated[datetime, msgspec.Meta(tz=True)]
    seq: int | None = None
    metrics: dict[str, MetricValue]


class TelemetryLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Edge limits; anything beyond them is dead-lettered with a reason."""

    max_payload_bytes: int = 64 * 1024
    max_readings: int = 1000
    max_metrics: int = 256
    max_string_len: int = 256
    max_future_s: int = 300
    max_past_s: int = 30 * 86400


class Point(msgspec.Struct, frozen=True, array_like=True):
    """One row to store: device time (µs), sequence (-1 when absent), metrics as JSON bytes."""

    ts_us: int
    seq: int
    metrics: msgspec.Raw


class TelemetryEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    """What the bridge publishes to JetStream for one accepted MQTT message."""

    v: Literal[1] = 1
    tenant: str
    device: str
    stream: str = ""
    received_us: int
    identity: Literal["device", "server"]
    points: list[Point]


class Normalized(msgspec.Struct, frozen=True):
    """A validated message ready for JetStream: subject, dedup id and encoded envelope."""

    subject: str
    msg_id: str
    payload: bytes
    points: int


_typed_decoder: Final = msgspec.json.Decoder(Reading | list[Reading])
_bare_decoder: Final = msgspec.json.Decoder(dict[str, MetricValue])
_any_decoder: Final = msgspec.json.Decoder()
_encoder: Final = msgspec.json.Encoder()
_envelope_decoder: Final = msgspec.json.Decoder(TelemetryEnvelope)


def decode_envelope(data: bytes) -> TelemetryEnvelope:
    """Decode what the bridge published; ``InvalidInput("bad_envelope")`` if it is not one."""
    try:
        return _envelope_decoder.decode(data)
    except msgspec.MsgspecError as exc:
        raise InvalidInput("bad_envelope", f"not a telemetry envelope: {exc}") from exc


def encode(obj: object) -> bytes:
    return _encoder.encode(obj)


def _decode_device_payload(payload: bytes) -> tuple[list[Reading] | None, dict[str, MetricValue] | None]:
    try:
        return _decode_device_payload_unguarded(payload)
    except RecursionError as exc:  # msgspec guards its recursion: a 64 KiB payload can nest 32,000 levels
        raise InvalidInput("too_deep", "payload nests too deeply") from exc


def _decode_device_payload_unguarded(payload: bytes) -> tuple[list[Reading] | None, dict[str, MetricValue] | None]:
    try:
        parsed = _typed_decoder.decode(payload)
    except (msgspec.MsgspecError, UnicodeDecodeError) as typed_error:
        try:
            loose = _any_decoder.decode(payload)
        except msgspec.ValidationError as exc:  # a DecodeError subclass; e.g. 1e999 "Number out of range"
            raise InvalidInput("bad_value", f"payload holds an unrepresentable value: {exc}") from exc
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise InvalidInput("not_json", "payload is not valid UTF-8 JSON") from exc
        if isinstance(loose, dict) and not RESERVED_KEYS.intersection(loose):
            try:
                return None, _bare_decoder.decode(payload)
            except msgspec.ValidationError as exc:
                raise InvalidInput("bad_schema", f"bare telemetry: {exc}") from exc
        raise InvalidInput("bad_schema", str(typed_error)) from typed_error
    return ([parsed] if isinstance(parsed, Reading) else parsed), None


def _check_metrics(metrics: dict[str, MetricValue], limits: TelemetryLimits) -> None:
    if not metrics:
        raise InvalidInput("bad_schema", "a reading needs at least one metric")
    if len(metrics) > limits.max_metrics:
        raise InvalidInput("too_many_metrics", f"at most {limits.max_metrics} metrics per reading")
    for name, value in metrics.items():
        if not _METRIC_NAME.match(name):
            raise InvalidInput("bad_metric_name", f"metric name {name[:70]!r} is not allowed")
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInput("bad_value", f"metric {name!r} is not a finite number")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_INT:
            raise InvalidInput("bad_value", f"metric {name!r} is outside the 64-bit range")
        if isinstance(value, str):
            if len(value) > limits.max_string_len:
                raise InvalidInput("bad_value", f"metric {name!r} is longer than {limits.max_string_len}")
            if "\x00" in value:  # valid JSON, but PostgreSQL's jsonb cannot store U+0000
                raise InvalidInput("bad_value", f"metric {name!r} contains a NUL character")


def _ts_us(reading: Reading) -> int:
    if isinstance(reading.ts, datetime):
        return int(reading.ts.timestamp()) * 1_000_000 + reading.ts.microsecond
    return reading.ts * 1000


def normalize(topic: TelemetryTopic, payload: bytes, received_us: int, limits: TelemetryLimits) -> Normalized:
    """Validate a device payload and build the JetStream message for it.

    Raises ``InvalidInput`` with a stable ``reason`` for every kind of bad input.
    """
    if len(payload) > limits.max_payload_bytes:
        raise InvalidInput("payload_too_large", f"payload exceeds {limits.max_payload_bytes} bytes")
    readings, bare = _decode_device_payload(payload)
    lowest = received_us - limits.max_past_s * 1_000_000
    highest = received_us + limits.max_future_s * 1_000_000
    if bare is not None:
        _check_metrics(bare, limits)
        points = [Point(received_us, NO_SEQ, msgspec.Raw(_encoder.encode(bare)))]
        identity: Literal["device", "server"] = "server"
        msg_id = f"{topic.tenant}.{topic.device}.{topic.stream}.r{received_us}"
    else:
        assert readings is not None
        if not readings:
            raise InvalidInput("bad_schema", "a batch needs at least one reading")
        if len(readings) > limits.max_readings:
            raise InvalidInput("too_many_readings", f"at most {limits.max_readings} readings per message")
        points = []
        for reading in readings:
            _check_metrics(reading.metrics, limits)
            ts_us = _ts_us(reading)
            if not lowest <= ts_us <= highest:
                raise InvalidInput(
                    "ts_out_of_range",
                    "ts must be epoch milliseconds (or RFC 3339) within the last "
                    f"{limits.max_past_s}s and at most {limits.max_future_s}s ahead",
                )
            seq = NO_SEQ if reading.seq is None else reading.seq
            if reading.seq is not None and not 0 <= seq <= _MAX_INT:
                raise InvalidInput("bad_seq", "seq must be a non-negative 64-bit integer")
            points.append(Point(ts_us, seq, msgspec.Raw(_encoder.encode(reading.metrics))))
        identity = "device"
        first, last = points[0], points[-1]
        base = f"{topic.tenant}.{topic.device}.{topic.stream}.{first.ts_us}.{first.seq}"
        msg_id = base if len(points) == 1 else f"{base}.{last.ts_us}.{last.seq}.{len(points)}"
    envelope = TelemetryEnvelope(
        tenant=topic.tenant,
        device=topic.device,
        stream=topic.stream,
        received_us=received_us,
        identity=identity,
        points=points,
    )
    return Normalized(topic.subject, msg_id, _encoder.encode(envelope), len(points))
