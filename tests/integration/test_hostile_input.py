"""Hostile input at the REST and GraphQL edge (issue 12, item 5): bulk and CSV imports past their limits, bad
encodings and duplicates, oversized tokens and headers, a query nested past GraphQL's limit. Each gets a precise
problem (never a 500), applies nothing, and is followed by the same request made right (the positive control)."""

from __future__ import annotations

import json

import psycopg
import pytest
from litestar.testing import TestClient

from tests.conftest import new_tenant, tenant_token

pytestmark = pytest.mark.integration


def devices_of(database_url: str, tenant: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM devices WHERE tenant_id = %s", (tenant,)).fetchone()
    assert row is not None
    return int(row[0])


def problem(response: object) -> dict[str, object]:
    body = response.json()  # type: ignore[attr-defined]
    assert response.headers["content-type"].startswith("application/problem+json"), body  # type: ignore[attr-defined]
    return dict(body)


def test_bulk_past_its_limit_creates_nothing(client: TestClient, database_url: str) -> None:  # type: ignore[type-arg]
    tenant = new_tenant(database_url, 0, prefix="hb")
    auth = tenant_token(database_url, tenant.id)
    too_many = [{"device_id": f"{tenant.id}-{i}"} for i in range(10_001)]
    response = client.post("/api/v1/devices/bulk", json=too_many, headers=auth)
    assert response.status_code in (400, 413, 422), response.text
    assert "10000" in json.dumps(problem(response)).replace(",", "")  # the limit is named
    # A bulk body is a set (an identical repeat is the same device); one id with two different bodies is refused.
    twice = [
        {"device_id": f"{tenant.id}-dup"},
        {"device_id": f"{tenant.id}-ok"},
        {"device_id": f"{tenant.id}-dup", "name": "b"},
    ]
    response = client.post("/api/v1/devices/bulk", json=twice, headers=auth)
    assert response.status_code == 400 and f"device id {tenant.id}-dup appears twice" in response.text, response.text
    assert devices_of(database_url, tenant.id) == 0  # neither request applied anything
    fine = client.post("/api/v1/devices/bulk", json=too_many[:10_000], headers=auth)
    assert fine.status_code == 201 and fine.json() == {"created": 10_000}, fine.text[:300]


@pytest.mark.parametrize(
    ("rows", "expect"),
    [
        (b"device_id,name\n{ok},first\n\xff\xfe-bad,x\n", "utf-8"),  # not UTF-8
        (b"device_id,name\n{ok},first\nsame,a\nsame,b\n", "device id same appears twice"),
        (b"device_id,name,colour\n{ok},first,red\n", "header"),  # a column nobody knows
        (b"name\nfirst\n", "device_id"),  # no device_id column
        (b"device_id\n{ok}\nnot a valid id!\n", "$[1].device_id"),  # the second row's id is off the grammar
    ],
    ids=["bad-encoding", "duplicate", "unknown-column", "no-id-column", "bad-id"],
)
def test_a_bad_csv_is_refused_whole(client: TestClient, database_url: str, rows: bytes, expect: str) -> None:  # type: ignore[type-arg]
    tenant = new_tenant(database_url, 0, prefix="hc")
    auth = tenant_token(database_url, tenant.id) | {"content-type": "text/csv"}
    ok = f"{tenant.id}-a".encode()
    response = client.post("/api/v1/devices/import", content=rows.replace(b"{ok}", ok), headers=auth)
    assert 400 <= response.status_code < 500, response.text
    assert expect.lower() in json.dumps(problem(response)).lower(), response.text
    assert devices_of(database_url, tenant.id) == 0  # the good row was not applied either
    fine = client.post("/api/v1/devices/import", content=b"device_id,name\n" + ok + b",first\n", headers=auth)
    assert fine.status_code in (200, 201), fine.text
    assert devices_of(database_url, tenant.id) == 1


def test_oversized_credentials_and_headers_are_refused_cleanly(client: TestClient, database_url: str) -> None:  # type: ignore[type-arg]
    tenant = new_tenant(database_url, 1, prefix="hh")
    auth = tenant_token(database_url, tenant.id)
    for headers in (
        {"authorization": "Bearer " + "k" * 60_000},  # a token far past any we issue
        {"authorization": "Bearer kst_" + "%00" * 100},  # not a token's alphabet
        {"authorization": "Basic " + "A" * 10_000},  # another scheme
    ):
        response = client.get("/api/v1/devices", headers=headers)
        assert response.status_code in (400, 401, 431), response.text[:300]
        assert response.status_code != 500
    response = client.get("/api/v1/devices", headers=auth | {"if-none-match": "x" * 60_000})
    assert response.status_code < 500, response.text[:300]
    assert client.get("/api/v1/devices", headers=auth).status_code == 200  # the control


def test_graphql_nesting_and_aliases_past_the_limit_are_refused(client: TestClient, database_url: str) -> None:  # type: ignore[type-arg]
    tenant = new_tenant(database_url, 1, prefix="hg")
    auth = tenant_token(database_url, tenant.id)
    deep = "{ devices { items { " + "presence { " * 30 + "online" + " }" * 30 + " } } }"
    aliases = "{ " + " ".join(f"a{i}: groups {{ groupId }}" for i in range(2000)) + " }"
    for query in (deep, aliases):
        response = client.post("/api/v1/graphql", json={"query": query}, headers=auth)
        assert response.status_code < 500, response.text[:300]
        assert response.json().get("errors"), response.text[:300]
    ok = client.post("/api/v1/graphql", json={"query": "{ groups { groupId } }"}, headers=auth)
    assert ok.status_code == 200 and not ok.json().get("errors"), ok.text
