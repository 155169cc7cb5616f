"""authsvc's Python rule evaluation (for /mqtt/authz) has the plugin's semantics (acl_test.c mirrors these)."""

from __future__ import annotations

import pytest

from authsvc.acl import decide, strip_share, topic_matches
from authsvc.decide import device_acl, service_acl


@pytest.mark.parametrize(
    ("name", "rule", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/b", "a/+", True),
        ("a/b/c", "a/#", True),
        ("a", "a/#", True),
        ("a/b", "#", True),
        ("a/b/c", "a/+", False),
        ("a", "a/+", False),
        ("a/b", "a/b/c", False),
        ("a/+", "a/+", True),
        ("a/+", "a/#", True),
        ("a/+", "a/b", False),
        ("a/#", "a/+", False),
        ("a/#", "a/b", False),
        ("a/#", "a/#", True),
        ("#", "a/#", False),
        ("+/#", "a/#", False),
        ("$SYS/x", "#", False),
        ("$SYS/x", "+/x", False),
        ("$CONTROL/kestrel/v1", "#", False),
        ("$CONTROL/kestrel/v1", "$CONTROL/kestrel/v1", True),
        ("a//b", "a/+/b", True),
        ("a//b", "a/b", False),
        ("/a", "+/a", True),
    ],
)
def test_topic_matching(name: str, rule: str, expected: bool) -> None:
    assert topic_matches(name, rule) is expected


def test_share_prefix() -> None:
    assert strip_share("$share/g/a/b") == "a/b"
    assert strip_share("a/b") == "a/b"
    assert strip_share("$share/g") is None
    assert strip_share("$share//a") is None
    assert strip_share("$share/g/") is None


def test_device_rules() -> None:
    rules = device_acl("t", "d")
    assert decide(rules, "publish", "v1/t/d/d/telemetry", 1) is True
    assert decide(rules, "publish", "v1/t/d/other/telemetry", 1) is False
    assert decide(rules, "subscribe", "v1/t/d/d/cmd/+", 1) is True
    assert decide(rules, "subscribe", "v1/t/d/d/cmd/+", 2) is False  # QoS 2 not granted
    assert decide(rules, "subscribe", "$share/ingest/v1/+/d/+/telemetry", 1) is False
    assert decide(rules, "subscribe", "$SYS/#", 0) is None  # no rule: the broker's no_match (deny) decides
    assert decide(rules, "subscribe", "$share/broken", 0) is False


def test_service_rules() -> None:
    ingest = service_acl("ingest")
    assert decide(ingest, "subscribe", "$share/ingest/v1/+/d/+/telemetry", 1) is True
    assert decide(ingest, "subscribe", "v1/+/d/+/cmd/+", 1) is False
    assert decide(ingest, "publish", "v1/t/d/d/telemetry", 1) is False
    control = service_acl("control")
    assert decide(control, "publish", "$CONTROL/kestrel/v1", 1) is True
    assert decide(control, "subscribe", "$CONTROL/kestrel/v1", 1) is None
    assert decide(service_acl("unknown-role"), "publish", "a", 0) is False


def test_devices_read_their_tenants_out_topics_and_the_rule_workers_publish_only_there() -> None:
    device = device_acl("t", "d")
    assert decide(device, "subscribe", "v1/t/out/#", 1) is True
    assert decide(device, "subscribe", "v1/t/out/alarms/boiler", 1) is True
    assert decide(device, "subscribe", "v1/u/out/#", 1) is False  # another tenant's
    assert decide(device, "subscribe", "v1/+/out/#", 1) is False  # every tenant's
    assert decide(device, "publish", "v1/t/out/alarms", 1) is False  # only the rules publish there
    rules = service_acl("rules")
    assert decide(rules, "publish", "v1/t/out/alarms/boiler", 1) is True
    assert decide(rules, "publish", "v1/t/d/d/cmd/reboot", 1) is False
    assert decide(rules, "publish", "v1/t/d/d/telemetry", 1) is False
    assert decide(rules, "subscribe", "v1/t/out/#", 1) is False
