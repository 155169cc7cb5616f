"""Rules, channels and alarms through the API (issue 13), as the API's database role: versioned rules with refusals
that name the offending field, targets that must be the tenant's own (another tenant's device, group or channel is
as unknown as a missing one), the rules quota, a webhook secret shown once, and alarms acknowledged, cleared and
commented by people with who and when recorded."""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from tests.conftest import new_tenant, tenant_token

pytestmark = pytest.mark.integration
V1 = "/api/v1"


def hot_rule(**extra: Any) -> dict[str, Any]:
    return {
        "name": "boiler too hot",
        "metrics": ["temp"],
        "alarm": {
            "severity": "critical",
            "when": {"op": "compare", "cmp": "gt", "left": {"kind": "metric", "name": "temp"},
                     "right": {"kind": "const", "value": 80}},
            "for_s": 5,
        },
        **extra,
    }  # fmt: skip


def test_rules_are_versioned_enabled_disabled_and_audited(client: TestClient[Litestar], database_url: str) -> None:
    tenant = new_tenant(database_url, 2, prefix="ra")
    auth = tenant_token(database_url, tenant.id)
    created = client.post(f"{V1}/rules", json=hot_rule(scope={"devices": [tenant.devices[0]]}), headers=auth)
    assert created.status_code == 201, created.text
    rule = created.json()
    assert rule["version"] == 1 and rule["enabled"] and created.headers["ETag"] == '"v1"'
    stale = client.put(f"{V1}/rules/{rule['rule_id']}", json=hot_rule(name="renamed"),
                       headers={**auth, "If-Match": '"v7"'})  # fmt: skip
    assert stale.status_code == 412
    renamed = client.put(
        f"{V1}/rules/{rule['rule_id']}", json=hot_rule(name="renamed"), headers={**auth, "If-Match": '"v1"'}
    )
    assert renamed.status_code == 200 and renamed.json()["version"] == 2 and renamed.json()["name"] == "renamed"
    disabled = client.post(f"{V1}/rules/{rule['rule_id']}/disable", headers=auth).json()
    assert disabled["enabled"] is False and disabled["version"] == 3
    versions = client.get(f"{V1}/rules/{rule['rule_id']}/versions", headers=auth).json()
    assert [v["version"] for v in versions] == [3, 2, 1] and versions[2]["definition"]["name"] == "boiler too hot"
    audit = client.get(f"{V1}/audit", headers=auth).json()
    actions = [e["action"] for e in (audit["items"] if isinstance(audit, dict) else audit)]
    assert actions.count("rule.update") == 2 and "rule.create" in actions
    assert client.delete(f"{V1}/rules/{rule['rule_id']}", headers=auth).status_code == 204
    assert client.get(f"{V1}/rules/{rule['rule_id']}", headers=auth).status_code == 404


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        (hot_rule(alarm={"when": {"op": "compare", "cmp": "gtx", "left": {"kind": "metric", "name": "t"},
                                  "right": {"kind": "const", "value": 1}}}), "alarm.when.cmp"),
        (hot_rule(alarm={"when": {"op": "absent", "seconds": 0}}), "alarm.when.seconds"),
        (hot_rule(on_raise=[{"do": "shell", "cmd": "rm -rf /"}]), "on_raise[0]"),
        (hot_rule(scope={"devices": ["bad id!"]}), "scope.devices[0]"),
        (hot_rule(unknown_field=1), "unknown_field"),
        (hot_rule(name=""), "name"),
    ],
)  # fmt: skip
def test_invalid_rules_get_problem_details_naming_the_field(
    client: TestClient[Litestar],
    database_url: str,
    body: dict[str, Any],
    pointer: str,
) -> None:
    tenant = new_tenant(database_url, 1, prefix="rv")
    answer = client.post(f"{V1}/rules", json=body, headers=tenant_token(database_url, tenant.id))
    assert answer.status_code == 400, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    problem = answer.json()
    assert any(pointer in p["name"] or pointer in p["reason"] for p in problem["invalid-params"]), problem


def test_a_rule_cannot_target_another_tenants_devices_groups_or_channels(
    client: TestClient[Litestar], database_url: str
) -> None:
    mine, theirs = new_tenant(database_url, 1, prefix="rx"), new_tenant(database_url, 1, prefix="rx")
    auth, their_auth = tenant_token(database_url, mine.id), tenant_token(database_url, theirs.id)
    hook = {"channel_id": "ops", "config": {"kind": "webhook", "url": "https://hooks.example.com/x"}}
    assert client.post(f"{V1}/channels", json=hook, headers=their_auth).status_code == 201
    assert client.post(f"{V1}/groups", json={"group_id": "plant"}, headers=their_auth).status_code == 201
    for extra, reason in (({"scope": {"devices": [theirs.devices[0]]}}, "unknown_device"),
                          ({"scope": {"groups": ["plant"]}}, "unknown_group"),
                          ({"notify": ["ops"]}, "unknown_channel")):  # fmt: skip
        refused = client.post(f"{V1}/rules", json=hot_rule(**extra), headers=auth)
        assert refused.status_code == 400 and reason in refused.text, refused.text
    # Positive control: the same rule naming my own device is accepted.
    assert (
        client.post(f"{V1}/rules", json=hot_rule(scope={"devices": [mine.devices[0]]}), headers=auth).status_code == 201
    )
    # The dry run resolves a scope inside the caller's tenant: naming their device or group reads none of their data
    # (they have a hot reading in the range), naming mine reads mine (the control).
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    with psycopg.connect(database_url) as conn:
        for tenant, device in ((theirs.id, theirs.devices[0]), (mine.id, mine.devices[0])):
            conn.execute("INSERT INTO telemetry (tenant_id, device_id, stream, ts, seq, metrics, received_at)"
                         " VALUES (%s, %s, '', %s, 1, '{\"temp\": 99}', now())", (tenant, device, start + timedelta(minutes=10)))  # fmt: skip
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO device_group_members (tenant_id, group_id, device_id) VALUES (%s, 'plant', %s)",
                     (theirs.id, theirs.devices[0]))  # fmt: skip
    window = {"start": start.isoformat(), "duration_s": 3600}
    for scope, readings in (({"devices": [theirs.devices[0]]}, 0), ({"groups": ["plant"]}, 0),
                            ({"devices": [mine.devices[0]]}, 1)):  # fmt: skip
        dry = client.post(f"{V1}/rules/dry-run", headers=auth, json={"rule": hot_rule(scope=scope), **window})
        assert dry.status_code == 200 and dry.json()["readings"] == readings, (scope, dry.text)
    assert client.get(f"{V1}/rules", headers=their_auth).json() == []


def test_the_rules_quota_and_the_webhook_secret_shown_once(
    client: TestClient[Litestar],
    database_url: str,
    api_database_url: str,
) -> None:
    tenant = new_tenant(database_url, 1, prefix="rq")
    auth = tenant_token(database_url, tenant.id)
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE tenants SET max_rules = 2 WHERE tenant_id = %s", (tenant.id,))
    assert [client.post(f"{V1}/rules", json=hot_rule(), headers=auth).status_code for _ in range(3)] == [201, 201, 409]
    hook = client.post(f"{V1}/channels", headers=auth,
                       json={"channel_id": "hook", "config": {"kind": "webhook", "url": "https://h.example.com/"}})  # fmt: skip
    assert hook.status_code == 201 and hook.json()["secret"].startswith("whsec_")
    assert "secret" not in client.get(f"{V1}/channels/hook", headers=auth).json()
    assert hook.json()["secret"] not in client.get(f"{V1}/channels", headers=auth).text
    with psycopg.connect(api_database_url) as conn:
        conn.execute("SELECT set_config('kestrel.tenant', %s, false)", (tenant.id,))
        assert conn.execute("SELECT count(*) FROM channels").fetchone() == (1,)  # the control: the row is visible
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT secret FROM channels")
    bad = client.post(
        f"{V1}/channels", headers=auth, json={"channel_id": "m", "config": {"kind": "email", "to": ["x"]}}
    )
    assert bad.status_code == 400 and "config.to[0]" in bad.text


def _alarm(database_url: str, tenant: str, device: str) -> str:
    alarm_id = "a" + secrets.token_hex(12)
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO alarms (alarm_id, tenant_id, rule_id, rule_name, device_id, severity, raised_at)"
            " VALUES (%s, %s, %s, 'hot', %s, 'major', now())",
            (alarm_id, tenant, "r" + secrets.token_hex(12), device),
        )
    return alarm_id


def test_people_acknowledge_clear_and_comment_alarms_of_their_tenant_only(
    client: TestClient[Litestar], database_url: str
) -> None:
    mine, theirs = new_tenant(database_url, 1, prefix="al"), new_tenant(database_url, 1, prefix="al")
    auth, their_auth = tenant_token(database_url, mine.id), tenant_token(database_url, theirs.id)
    alarm_id = _alarm(database_url, mine.id, mine.devices[0])
    for path in ("acknowledge", "clear"):
        assert client.post(f"{V1}/alarms/{alarm_id}/{path}", headers=their_auth).status_code == 404
    assert client.get(f"{V1}/alarms", headers=their_auth).json() == []
    viewer = tenant_token(database_url, mine.id, "alarms:read")
    assert client.post(f"{V1}/alarms/{alarm_id}/acknowledge", headers=viewer).status_code == 403
    acked = client.post(f"{V1}/alarms/{alarm_id}/acknowledge", headers=auth).json()
    assert acked["acknowledged"] and acked["acknowledged_by"].startswith("token:") and acked["acknowledged_at"]
    assert (
        client.post(f"{V1}/alarms/{alarm_id}/comments", json={"body": "crew on site"}, headers=auth).status_code == 201
    )
    cleared = client.post(f"{V1}/alarms/{alarm_id}/clear", headers=auth).json()
    assert cleared["status"] == "cleared" and cleared["cleared_by"].startswith("token:")
    history = client.get(f"{V1}/alarms/{alarm_id}/history", headers=auth).json()
    assert [e["event"] for e in history["events"]] == ["acknowledged", "commented", "cleared"]
    assert history["comments"][0]["body"] == "crew on site"
    listed = client.get(f"{V1}/alarms", params={"status": "cleared", "acknowledged": "true"}, headers=auth).json()
    assert [a["alarm_id"] for a in listed] == [alarm_id]
    assert client.get(f"{V1}/alarms", params={"status": "active"}, headers=auth).json() == []


def test_graphql_reads_rules_and_alarms_of_the_callers_tenant(client: TestClient[Litestar], database_url: str) -> None:
    mine, theirs = new_tenant(database_url, 1, prefix="gq"), new_tenant(database_url, 1, prefix="gq")
    auth = tenant_token(database_url, mine.id)
    assert client.post(f"{V1}/rules", json=hot_rule(), headers=auth).status_code == 201
    _alarm(database_url, theirs.id, theirs.devices[0])  # another tenant's alarm: never listed
    alarm_id = _alarm(database_url, mine.id, mine.devices[0])
    query = '{ rules { name version enabled } alarms(status: "active") { alarmId deviceId severity acknowledged } }'
    answer = client.post(f"{V1}/graphql", json={"query": query}, headers=auth).json()
    assert answer["data"]["rules"] == [{"name": "boiler too hot", "version": 1, "enabled": True}]
    assert answer["data"]["alarms"] == [
        {"alarmId": alarm_id, "deviceId": mine.devices[0], "severity": "major", "acknowledged": False}
    ]
    denied = client.post(f"{V1}/graphql", json={"query": "{ alarms { alarmId } }"},
                         headers=tenant_token(database_url, mine.id, "devices:read")).json()  # fmt: skip
    assert denied["data"] is None and "alarms:read" in denied["errors"][0]["message"]


def test_the_rule_action_budget_is_one_per_tenant_and_second_whatever_the_connection(
    database_url: str, api_database_url: str
) -> None:
    """Two workers (two sessions) spending in the same second share the tenant's rate; the next second starts anew;
    another tenant has its own; the API's role cannot touch the budget."""
    tenant, other = new_tenant(database_url, 0, prefix="bud").id, new_tenant(database_url, 0, prefix="bud").id
    with psycopg.connect(database_url, autocommit=True) as a, psycopg.connect(database_url, autocommit=True) as b:
        a.execute("UPDATE tenants SET rule_actions_per_s = 4 WHERE tenant_id = %s", (tenant,))

        def second() -> int:
            row = a.execute("SELECT floor(extract(epoch FROM clock_timestamp()))::bigint").fetchone()
            assert row is not None
            return int(row[0])

        def spend(conn: psycopg.Connection[Any], who: str, want: int) -> int:
            row = conn.execute("SELECT kestrel_spend_rule_actions(%s, %s)", (who, want)).fetchone()
            assert row is not None
            return int(row[0])

        for _ in range(20):  # until the four calls fall within one second (a boundary may split one attempt)
            start = second()
            got = (spend(a, tenant, 3), spend(b, tenant, 3), spend(b, other, 3), spend(a, tenant, 1))
            if second() == start:
                break
        else:
            pytest.fail("no attempt fell within one second")
        assert got == (3, 1, 3, 0)  # the other tenant's default (50) is its own
        while second() == start:
            time.sleep(0.05)
        assert spend(b, tenant, 5) == 4
        assert spend(a, "no-such-tenant", 1) == 0
    with psycopg.connect(api_database_url) as api:
        for statement in ("SELECT * FROM rule_action_budget", f"SELECT kestrel_spend_rule_actions('{tenant}', 1)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                api.execute(statement.encode())
            api.rollback()
