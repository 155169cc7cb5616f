"""The topic grammar as one table of cases (ADR-0002)."""

from __future__ import annotations

import pytest

from kestrel_core.errors import InvalidInput
from kestrel_core.topics import TelemetryTopic, parse_telemetry_topic, shared_filter, telemetry_topic

GOOD = [
    ("v1/acme/d/dev-1/telemetry", TelemetryTopic("acme", "dev-1", "")),
    ("v1/acme/d/dev_1/telemetry/engine", TelemetryTopic("acme", "dev_1", "engine")),
    ("v1/A-Z_09/d/x/telemetry", TelemetryTopic("A-Z_09", "x", "")),
    (f"v1/{'t' * 64}/d/{'d' * 64}/telemetry", TelemetryTopic("t" * 64, "d" * 64, "")),
]

BAD = [
    ("wrong version", "v2/acme/d/dev-1/telemetry"),
    ("missing device segment", "v1/acme/dev-1/telemetry"),
    ("not telemetry", "v1/acme/d/dev-1/events"),
    ("too deep", "v1/acme/d/dev-1/telemetry/a/b"),
    ("empty tenant", "v1//d/dev-1/telemetry"),
    ("plus wildcard", "v1/+/d/dev-1/telemetry"),
    ("hash wildcard", "v1/acme/d/#/telemetry"),
    ("dollar", "v1/$SYS/d/dev-1/telemetry"),
    ("dot (NATS separator)", "v1/ac.me/d/dev-1/telemetry"),
    ("star (NATS wildcard)", "v1/acme/d/dev*/telemetry"),
    ("gt (NATS wildcard)", "v1/acme/d/dev>/telemetry"),
    ("space", "v1/acme/d/dev 1/telemetry"),
    ("control char", "v1/acme/d/dev\x001/telemetry"),
    ("unicode", "v1/acmé/d/dev-1/telemetry"),
    ("id too long", f"v1/{'t' * 65}/d/dev-1/telemetry"),
    ("trailing slash", "v1/acme/d/dev-1/telemetry/"),
    ("leading slash", "/v1/acme/d/dev-1/telemetry"),
]


@pytest.mark.parametrize(("topic", "expected"), GOOD, ids=[g[0] for g in GOOD])
def test_parses_valid_topics(topic: str, expected: TelemetryTopic) -> None:
    parsed = parse_telemetry_topic(topic)
    assert parsed == expected
    assert parsed.mqtt == topic


@pytest.mark.parametrize("topic", [b[1] for b in BAD], ids=[b[0] for b in BAD])
def test_rejects_off_grammar_topics(topic: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_telemetry_topic(topic)
    assert info.value.reason == "bad_topic"


def test_subject_mirrors_topic_with_dots() -> None:
    assert telemetry_topic("acme", "dev-1", "engine").subject == "v1.acme.d.dev-1.telemetry.engine"
    assert telemetry_topic("acme", "dev-1").subject == "v1.acme.d.dev-1.telemetry"


@pytest.mark.parametrize(("tenant", "device"), [("a/b", "d"), ("a", "d+"), ("", "d"), ("a", "d.e")])
def test_builder_refuses_bad_ids(tenant: str, device: str) -> None:
    with pytest.raises(InvalidInput):
        telemetry_topic(tenant, device)


def test_shared_filter_form() -> None:
    assert shared_filter("ingest", "v1/+/d/+/telemetry") == "$share/ingest/v1/+/d/+/telemetry"
    with pytest.raises(InvalidInput):
        shared_filter("in/gest", "v1/#")
