"""Pure helpers of the writer, the bridge and the API."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from api.telemetry import decode_cursor, encode_cursor
from ingest.storage import RawJson, to_rows
from ingest.writer import delivery_count
from kestrel.store.telemetry import parse_bucket
from kestrel_core.errors import InvalidInput
from kestrel_core.messages.telemetry import Point, TelemetryEnvelope
from kestrel_core.streams import HDR_TRACEPARENT, trace_headers


class FakeMsg:
    def __init__(self, reply: str) -> None:
        self.reply = reply


def test_to_rows_one_row_per_point() -> None:
    env = TelemetryEnvelope(
        tenant="t",
        device="d",
        stream="s",
        received_us=1_000_000,
        identity="device",
        points=[Point(2_000_000, 1, msgspec.Raw(b'{"a":1}')), Point(3_000_000, -1, msgspec.Raw(b"{}"))],
    )
    rows = to_rows(env)
    assert [r[:3] for r in rows] == [("t", "d", "s"), ("t", "d", "s")]
    assert rows[0][3] == datetime(1970, 1, 1, 0, 0, 2, tzinfo=UTC)
    assert rows[1][4] == -1
    assert isinstance(rows[0][5], RawJson)
    assert bytes(rows[0][5]) == b'{"a":1}'
    assert rows[0][6] == datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("reply", "count"),
    [
        ("$JS.ACK.TELEMETRY.writer.3.100.90.1764250000000000000.5", 3),
        ("$JS.ACK.domain.accounthash.TELEMETRY.writer.7.100.90.1764250000000000000.5.token", 7),
        ("_INBOX.garbage", 1),
    ],
)
def test_delivery_count_from_ack_subject(reply: str, count: int) -> None:
    assert delivery_count(FakeMsg(reply)) == count  # type: ignore[arg-type]


def test_cursor_round_trip_and_tamper() -> None:
    ts = datetime(2026, 11, 27, 12, 0, 0, 123456, tzinfo=UTC)
    cursor = decode_cursor(encode_cursor(ts, 42, "engine"))
    assert (cursor.ts, cursor.seq, cursor.stream) == (ts, 42, "engine")
    assert (cursor.ts - datetime(2000, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) == (
        ts - datetime(2000, 1, 1, tzinfo=UTC)
    ) // timedelta(microseconds=1)
    for bad in ("", "%%%", "bm90IGpzb24", encode_cursor(ts, 1, "x")[:-3]):
        with pytest.raises(InvalidInput):
            decode_cursor(bad)


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("5m", 300), ("1h", 3600), ("7d", 604800)])
def test_bucket_parsing(text: str, seconds: int) -> None:
    assert parse_bucket(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["0m", "5", "m", "1w", "-1h", "1.5h", "1000000s"])
def test_bucket_parsing_refuses(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_bucket(text)


def test_trace_headers_carry_only_a_well_formed_traceparent() -> None:
    good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert trace_headers({"user_property": [("schema", "2"), ("traceparent", good)]}) == {HDR_TRACEPARENT: good}
    for bad in (good.upper(), good + "-x", "ff" + good[2:], "", "00-xyz", good.replace("-", "_")):
        assert trace_headers({"user_property": [("traceparent", bad)]}) == {}, bad
    assert trace_headers({"user_property": [("traceparent",)]}) == {}
    assert trace_headers({"user_property": "traceparent"}) == {}
    assert trace_headers(None) == {} and trace_headers({}) == {}
