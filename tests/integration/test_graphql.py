"""GraphQL over the same tenant scoping as REST: B's objects are invisible to A, scopes apply, abusive queries
(deep, many aliases, huge) and introspection are refused."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from litestar.testing import TestClient

from api.app import create_app
from api.settings import ApiSettings
from kestrel_core.settings import Secret
from tests.conftest import new_tenant, tenant_token

pytestmark = pytest.mark.integration
URL = "/api/v1/graphql"


@pytest.fixture
def client(api_database_url: str) -> Iterator[TestClient]:  # type: ignore[type-arg]
    with TestClient(create_app(ApiSettings(admin_token=Secret("p-" + uuid.uuid4().hex)), api_database_url)) as c:
        yield c


def _tenant(database_url: str, devices: int = 2) -> tuple[str, list[str]]:
    made = new_tenant(database_url, devices, prefix="gq")
    return made.id, made.devices


def gql(client: TestClient, auth: dict[str, str], query: str, **variables: Any) -> dict[str, Any]:  # type: ignore[type-arg]
    resp = client.post(URL, json={"query": query, "variables": variables}, headers=auth)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def test_devices_groups_and_aggregates_of_the_callers_tenant_only(client: TestClient, database_url: str) -> None:  # type: ignore[type-arg]
    a, a_devices = _tenant(database_url)
    b, b_devices = _tenant(database_url)
    now = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=30)
    with psycopg.connect(database_url) as conn:
        for device, tenant in ((a_devices[0], a), (b_devices[0], b)):
            for i in range(4):
                conn.execute(
                    "INSERT INTO telemetry (tenant_id, device_id, stream, ts, seq, metrics, received_at)"
                    " VALUES (%s, %s, '', %s, %s, %s, now())",
                    (tenant, device, now + timedelta(minutes=i), i, json.dumps({"temp": 10.0 * i})),
                )
    auth_a = tenant_token(database_url, a)
    body = gql(client, auth_a, "{ devices { items { deviceId status } nextCursor } groups { groupId } }")
    assert {d["deviceId"] for d in body["data"]["devices"]["items"]} == set(a_devices)
    q = 'query($id: String!) { device(deviceId: $id) { deviceId telemetry(metric: "temp", agg: "avg", bucket: "1h") { value samples } } }'
    mine = gql(client, auth_a, q, id=a_devices[0])["data"]["device"]
    assert sum(b["samples"] for b in mine["telemetry"]) == 4
    # B's device through A's token: as if it did not exist.
    assert gql(client, auth_a, q, id=b_devices[0])["data"]["device"] is None
    listed = gql(client, auth_a, '{ devices(after: "") { items { deviceId } } }')
    assert all(d["deviceId"] not in b_devices for d in (listed.get("data") or {}).get("devices", {}).get("items", []))


def test_scopes_tokens_and_abuse_limits(client: TestClient, database_url: str) -> None:  # type: ignore[type-arg]
    tenant, _ = _tenant(database_url)
    narrow = tenant_token(database_url, tenant, "devices:read")
    denied = gql(client, narrow, "{ groups { groupId } }")
    assert denied["data"] is None and "groups:read" in denied["errors"][0]["message"]
    assert client.post(URL, json={"query": "{ groups { groupId } }"}).status_code == 401
    bad = {"Authorization": "Bearer kst_0000000000000000_" + "A" * 43}
    assert client.post(URL, json={"query": "{ groups { groupId } }"}, headers=bad).status_code == 401
    auth = tenant_token(database_url, tenant)
    aliases = " ".join(f"a{i}: groups {{ groupId }}" for i in range(30))
    assert "errors" in gql(client, auth, "{ " + aliases + " }")
    huge = "{ devices { items { " + " ".join(["deviceId"] * 3000) + " } } }"
    assert "errors" in gql(client, auth, huge)
    introspection = gql(client, auth, "{ __schema { types { name } } }")
    assert introspection.get("data") is None and introspection["errors"]
    assert "errors" in gql(client, auth, "{ devices(first: 100000) { items { deviceId } } }")
    assert "errors" in gql(client, auth, "mutation { x }")


def test_presence_shadow_and_commands_of_a_device(client: TestClient, database_url: str) -> None:  # type: ignore[type-arg]
    a, a_devices = _tenant(database_url)
    auth_a = tenant_token(database_url, a)
    device = a_devices[0]
    patched = client.patch(f"/api/v1/devices/{device}/shadow", json={"desired": {"rate": 5}}, headers=auth_a)
    assert patched.status_code == 200, patched.text
    sent = client.post(f"/api/v1/devices/{device}/commands", json={"name": "reboot"}, headers=auth_a)
    assert sent.status_code == 201, sent.text
    q = """query($id: String!) { device(deviceId: $id) {
        presence { online connections lastSeen }
        shadow { version desired reported delta }
        named: shadow(name: "none") { version }
        commands(first: 5) { commandId name status attempts } } }"""
    body = gql(client, auth_a, q, id=device)["data"]["device"]
    assert body["presence"] == {"online": False, "connections": 0, "lastSeen": None}
    assert body["shadow"] == {"version": 1, "desired": {"rate": 5}, "reported": {}, "delta": {"rate": 5}}
    assert body["named"] is None
    assert [(c["name"], c["status"]) for c in body["commands"]] == [("reboot", "queued")]
    assert body["commands"][0]["commandId"] == sent.json()["command_id"]
    # The same device seen from another tenant: nothing.
    b, _ = _tenant(database_url)
    assert gql(client, tenant_token(database_url, b), q, id=device)["data"]["device"] is None
