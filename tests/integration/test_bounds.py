"""Every request body is bounded (issue 10, defects 4-6): its media type (415), its size per route (413), how deep it
nests (400). Each refusal is problem details, changes nothing, and is followed by a positive control: the same
request made right is served."""

from __future__ import annotations

import json

import psycopg
import pytest
from litestar.testing import TestClient

from tests.conftest import new_tenant, tenant_token

pytestmark = pytest.mark.integration


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def registered(database_url: str, device: str) -> bool:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT 1 FROM devices WHERE device_id = %s", (device,)).fetchone() is not None


# ------------------------------------------------------------------------------------------------ 415


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None], ids=str)
def test_json_in_another_media_type_is_415_and_creates_nothing(
    client: TestClient,  # type: ignore[type-arg]
    database_url: str,
    content_type: str | None,
) -> None:
    tenant = new_tenant(database_url, 0, prefix="bd").id
    auth = tenant_token(database_url, tenant)
    device = f"{tenant}-x"
    body = json.dumps({"device_id": device}).encode()
    headers = auth | ({"content-type": content_type} if content_type else {})
    refused = client.post("/api/v1/devices", content=body, headers=headers)
    assert refused.status_code == 415, refused.text
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert refused.headers["accept-post"] == "application/json"
    assert not registered(database_url, device)
    created = client.post("/api/v1/devices", content=body, headers=auth | {"content-type": "application/json"})
    assert created.status_code == 201 and registered(database_url, device)


def test_each_route_takes_its_own_media_types(client: TestClient, database_url: str) -> None:  # type: ignore[type-arg]
    tenant = new_tenant(database_url, 1, prefix="bd")
    auth = tenant_token(database_url, tenant.id)
    csv = f"device_id\n{tenant.id}-c\n"
    assert (
        client.post(
            "/api/v1/devices/import", content=csv, headers=auth | {"content-type": "application/json"}
        ).status_code
        == 415
    )
    assert (
        client.post("/api/v1/devices/import", content=csv, headers=auth | {"content-type": "text/csv"}).status_code
        == 201
    )
    patch = json.dumps({"desired": {"led": True}})
    shadow = f"/api/v1/devices/{tenant.devices[0]}/shadow"
    assert client.patch(shadow, content=patch, headers=auth | {"content-type": "text/plain"}).status_code == 415
    merge = client.patch(shadow, content=patch, headers=auth | {"content-type": "application/merge-patch+json"})
    assert merge.status_code == 200, merge.text
    query = json.dumps({"query": "{ groups { groupId } }"})
    assert (
        client.post("/api/v1/graphql", content=query, headers=auth | {"content-type": "text/plain"}).status_code == 415
    )
    assert (
        client.post("/api/v1/graphql", content=query, headers=auth | {"content-type": "application/json"}).status_code
        == 200
    )


# ------------------------------------------------------------------------------------------------ 413


def test_bodies_above_their_route_limit_are_413(client: TestClient, database_url: str) -> None:  # type: ignore[type-arg]
    tenant = new_tenant(database_url, 1, prefix="bd")
    auth = tenant_token(database_url, tenant.id)
    device = tenant.devices[0]
    commands = f"/api/v1/devices/{device}/commands"
    big = client.post(commands, json={"name": "huge", "params": {"blob": "x" * 5_000_000}}, headers=auth)
    assert big.status_code == 413, big.text
    over_params = client.post(commands, json={"name": "huge", "params": {"blob": "x" * 40_000}}, headers=auth)
    assert over_params.status_code == 413 and "params_too_large" in over_params.text  # under the body limit
    padded = json.dumps({"query": "{ groups { groupId } }" + " " * 5_000_000})
    gql = client.post("/api/v1/graphql", content=padded, headers=auth | {"content-type": "application/json"})
    assert gql.status_code == 413, gql.text
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM commands WHERE device_id = %s", (device,)).fetchone() == (0,)
    fine = client.post(commands, json={"name": "ok", "params": {"blob": "x" * 30_000}}, headers=auth)
    assert fine.status_code == 201, fine.text
    # Bulk routes take more: 2,000 devices in one request are registered.
    bulk = [{"device_id": f"{tenant.id}-b{i}", "name": "n" * 50} for i in range(2000)]
    assert client.post("/api/v1/devices/bulk", json=bulk, headers=auth).json() == {"created": 2000}


# ------------------------------------------------------------------------------------------------ depth


def test_deep_nesting_is_a_clear_refusal_never_500(client: TestClient, database_url: str) -> None:  # type: ignore[type-arg]
    tenant = new_tenant(database_url, 1, prefix="bd")
    auth = tenant_token(database_url, tenant.id) | {"content-type": "application/json"}
    device = tenant.devices[0]
    huge = client.post("/api/v1/devices", content=nested(100_000), headers=auth)  # 200 KB: over the body limit
    assert huge.status_code == 413, huge.text
    deep = client.post("/api/v1/devices", content=nested(30_000), headers=auth)  # 60 KB: decoded, too deep
    assert deep.status_code == 400 and "too_deep" in deep.text, deep.text
    desired = "{" + '"a":{' * 5000 + "}" * 5000 + "}"
    shadow = client.patch(f"/api/v1/devices/{device}/shadow", content='{"desired": ' + desired + "}", headers=auth)
    assert shadow.status_code == 400 and "too_deep" in shadow.text, shadow.text
    nine = {"desired": json.loads('{"a":' * 9 + "1" + "}" * 9)}  # deeper than a shadow may be (8)
    assert "shadow_too_deep" in client.patch(f"/api/v1/devices/{device}/shadow", json=nine, headers=auth).text
    query = json.dumps("query($v: JSON) { groups { groupId } }")
    variables = '{"query": ' + query + ', "variables": {"v": ' + nested(20_000) + "}}"
    gql = client.post("/api/v1/graphql", content=variables, headers=auth)
    assert gql.status_code < 500, gql.text
    deep_query = json.dumps({"query": "{" + " devices { items {" * 400 + "}" * 801})
    gql = client.post("/api/v1/graphql", content=deep_query, headers=auth)
    assert gql.status_code < 500 and gql.json().get("errors"), gql.text
    ok = client.patch(f"/api/v1/devices/{device}/shadow", json={"desired": {"a": {"b": 1}}}, headers=auth)
    assert ok.status_code == 200, ok.text
