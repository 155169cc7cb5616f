"""``kestrel rule``, ``kestrel alarm`` and ``kestrel channel`` as an operator runs them (issue 13): a rule from a YAML
file, its dry run on stored telemetry, alarms acknowledged, and one clear line with a non-zero exit for bad input."""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from tests.conftest import new_tenant
from tests.integration.test_cli import kestrel, one_line

pytestmark = pytest.mark.integration
RULE = """
name: boiler too hot
metrics: [temp]
alarm:
  severity: critical
  for_s: 60
  when: {op: compare, cmp: gt, left: {kind: metric, name: temp}, right: {kind: const, value: 80}}
  clear_when: {op: compare, cmp: lt, left: {kind: metric, name: temp}, right: {kind: const, value: 75}}
"""


def test_a_rule_from_yaml_its_dry_run_and_an_alarm_acknowledged(database_url: str, tmp_path: Path) -> None:
    tenant = new_tenant(database_url, 1, prefix="cli")
    device = tenant.devices[0]
    (tmp_path / "hot.yaml").write_text(RULE)
    created = kestrel("rule", "create", str(tmp_path / "hot.yaml"), "--tenant", tenant.id, database_url=database_url)
    assert created.returncode == 0, created.stderr
    rule_id = created.stdout.strip()
    listed = kestrel("rule", "list", "--tenant", tenant.id, database_url=database_url).stdout
    assert rule_id in listed and "v1" in listed and "boiler too hot" in listed
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    with psycopg.connect(database_url) as conn:
        for minute, temp in enumerate([70, 85, 86, 87, 74]):
            conn.execute(
                "INSERT INTO telemetry (tenant_id, device_id, stream, ts, seq, metrics, received_at)"
                " VALUES (%s, %s, '', %s, %s, %s, now())",
                (tenant.id, device, start + timedelta(minutes=minute), minute, json.dumps({"temp": temp})),
            )
    tested = kestrel("rule", "test", str(tmp_path / "hot.yaml"), "--tenant", tenant.id, "--from", start.isoformat(),
                     "--to", (start + timedelta(minutes=10)).isoformat(), database_url=database_url)  # fmt: skip
    assert tested.returncode == 0, tested.stderr
    (outcome,) = json.loads(tested.stdout)["devices"]
    at = int((start + timedelta(minutes=2)).timestamp() * 1000)
    assert [(t["type"], t["at_ms"]) for t in outcome["transitions"]] == [("raised", at), ("cleared", at + 120_000)]
    alarm_id = "a" + secrets.token_hex(12)
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO alarms (alarm_id, tenant_id, rule_id, rule_name, device_id, severity, raised_at)"
                     " VALUES (%s, %s, %s, 'boiler too hot', %s, 'critical', now())", (alarm_id, tenant.id, rule_id, device))  # fmt: skip
    assert kestrel("alarm", "ack", alarm_id, "--tenant", tenant.id, database_url=database_url).returncode == 0
    shown = json.loads(kestrel("alarm", "list", "--tenant", tenant.id, "--json", database_url=database_url).stdout)
    assert shown[0]["acknowledged"] and shown[0]["acknowledged_by"].startswith("cli:")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("name: x\nalarm: {when: {op: compare, cmp: gtx}}\n", "alarm.when"),
        ("- just a list\n", "a rule is a mapping"),
        ("name: [unclosed\n", "bad.yaml"),
        (
            "name: x\nalarm: {when: {op: absent, seconds: 5}}\nscope: {devices: [nobody-here]}\n",
            "the tenant has no device nobody-here",
        ),
    ],
)
def test_a_bad_rule_file_is_one_clear_line_and_exit_2(
    database_url: str, tmp_path: Path, content: str, fragment: str
) -> None:
    tenant = new_tenant(database_url, 1, prefix="clb")
    (tmp_path / "bad.yaml").write_text(content)
    refused = kestrel("rule", "create", str(tmp_path / "bad.yaml"), "--tenant", tenant.id, database_url=database_url)
    assert refused.returncode == 2
    assert fragment in one_line(refused.stderr)


def test_a_webhook_channel_prints_its_secret_once(database_url: str) -> None:
    tenant = new_tenant(database_url, 1, prefix="clc")
    made = kestrel("channel", "create", "ops", '{"kind": "webhook", "url": "https://hooks.example.com/k"}',
                   "--tenant", tenant.id, database_url=database_url)  # fmt: skip
    assert made.returncode == 0 and made.stdout.startswith("whsec_"), made.stderr
    bad = kestrel("channel", "create", "x", '{"kind": "pager"}', "--tenant", tenant.id, database_url=database_url)
    assert bad.returncode == 2 and "pager" in one_line(bad.stderr)
