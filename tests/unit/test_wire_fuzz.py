"""Property: whatever bytes a device sends, validation either accepts them or raises InvalidInput.

Anything else would crash the bridge's message handler (it has found two such cases already:
invalid UTF-8 and out-of-range numbers).
"""

from __future__ import annotations

import json
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from kestrel_core.errors import InvalidInput
from kestrel_core.messages.telemetry import TelemetryLimits, decode_envelope, normalize
from kestrel_core.topics import telemetry_topic

TOPIC = telemetry_topic("acme", "dev-1")
NOW_US = int(time.time() * 1_000_000)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _check(payload: bytes) -> None:
    try:
        out = normalize(TOPIC, payload, NOW_US, TelemetryLimits())
    except InvalidInput as exc:
        assert exc.reason
        return
    envelope = decode_envelope(out.payload)  # what we publish must decode on the writer's side
    assert envelope.points


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes(payload: bytes) -> None:
    _check(payload)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_arbitrary_json(value: object) -> None:
    _check(json.dumps(value).encode())


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["ts", "seq", "metrics", "x"]),
        json_values | st.integers(min_value=0, max_value=2**70),
        max_size=4,
    )
)
def test_reading_shaped_json(value: dict[str, object]) -> None:
    _check(json.dumps(value).encode())
