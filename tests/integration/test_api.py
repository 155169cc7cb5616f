"""The REST API against a real PostgreSQL, in-process through Litestar's test client."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from litestar.testing import TestClient

import kestrel
from api.app import create_app
from api.settings import ApiSettings
from kestrel_core.settings import Secret
from tests.conftest import Tenant, tenant_token

pytestmark = pytest.mark.integration
TOKEN = "platform-admin-test-token-value"
T0 = datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC).replace(
    year=datetime.now(UTC).year, month=datetime.now(UTC).month, day=datetime.now(UTC).day
) - timedelta(hours=3)


@pytest.fixture
def client(api_database_url: str) -> Iterator[TestClient]:  # type: ignore[type-arg]
    app = create_app(ApiSettings(admin_token=Secret(TOKEN)), api_database_url)
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def fleet(make_tenant: Callable[[int], Tenant], database_url: str) -> Tenant:
    """Device 0 reports temp = minute index every minute for 10 minutes; mode alternates; ok is a bool."""
    tenant = make_tenant(3)
    with psycopg.connect(database_url) as conn:
        for minute in range(10):
            metrics = {"temp": float(minute), "mode": "eco" if minute % 2 else "boost", "ok": minute != 4}
            conn.execute(
                "INSERT INTO telemetry (tenant_id, device_id, stream, ts, seq, metrics, received_at)"
                " VALUES (%s, %s, '', %s, %s, %s, now())",
                (tenant.id, tenant.devices[0], T0 + timedelta(minutes=minute), minute, json.dumps(metrics)),
            )
        conn.execute(
            "INSERT INTO telemetry (tenant_id, device_id, stream, ts, seq, metrics, received_at)"
            " VALUES (%s, %s, '', %s, -1, '{\"hum\": 40}', now())",
            (tenant.id, tenant.devices[0], T0 + timedelta(minutes=10)),
        )
    return tenant


@pytest.fixture
def auth(fleet: Tenant, database_url: str) -> dict[str, str]:
    return tenant_token(database_url, fleet.id)


def assert_problem(resp, status: int, kind: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["status"] == status
    assert body["type"] == f"urn:kestrel:problem:{kind}"
    assert body["title"]
    return body  # type: ignore[no-any-return]


def window(**extra: str) -> dict[str, str]:
    return {"from": T0.isoformat(), "to": (T0 + timedelta(hours=1)).isoformat()} | extra


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}],
    ids=["none", "wrong", "no-scheme", "basic"],
)
def test_api_requires_the_token(client: TestClient, headers: dict[str, str]) -> None:  # type: ignore[type-arg]
    resp = client.get("/api/v1/devices", headers=headers)
    assert_problem(resp, 401, "unauthenticated")
    assert resp.headers["www-authenticate"].startswith("Bearer")


def test_empty_admin_token_fails_closed(api_database_url: str) -> None:
    with TestClient(create_app(ApiSettings(), api_database_url)) as c:
        assert_problem(c.get("/api/v1/devices", headers={"Authorization": "Bearer "}), 401, "unauthenticated")


def test_list_devices_by_tenant_with_cursor(client: TestClient, auth: dict[str, str], fleet: Tenant) -> None:  # type: ignore[type-arg]
    first = client.get("/api/v1/devices", params={"limit": 2}, headers=auth).json()
    assert [d["device_id"] for d in first["items"]] == sorted(fleet.devices)[:2]
    rest = client.get("/api/v1/devices", params={"limit": 2, "cursor": first["next_cursor"]}, headers=auth).json()
    assert [d["device_id"] for d in rest["items"]] == sorted(fleet.devices)[2:]
    assert rest["next_cursor"] is None


def test_get_device_and_404(client: TestClient, auth: dict[str, str], fleet: Tenant) -> None:  # type: ignore[type-arg]
    body = client.get(f"/api/v1/devices/{fleet.devices[1]}", headers=auth).json()
    assert body["device_id"] == fleet.devices[1]
    assert body["status"] == "registered"  # no credential yet (ADR-0013 lifecycle)
    assert_problem(client.get("/api/v1/devices/nope-nope", headers=auth), 404, "not_found")
    assert_problem(client.get("/api/v1/devices/nope-nope/telemetry", headers=auth), 404, "not_found")


def test_bad_device_id_is_400(
    client: TestClient,
    auth: dict[str, str],
) -> None:  # type: ignore[type-arg]
    body = assert_problem(client.get("/api/v1/devices/bad.id", headers=auth), 400, "invalid_input")
    assert body["invalid-params"][0]["name"] == "device_id"


def test_raw_points_with_cursor_pagination(client: TestClient, auth: dict[str, str], fleet: Tenant) -> None:  # type: ignore[type-arg]
    url = f"/api/v1/devices/{fleet.devices[0]}/telemetry"
    seen: list[float] = []
    cursor = None
    for _ in range(10):
        params = window(metric="temp", limit="4") | ({"cursor": cursor} if cursor else {})
        page = client.get(url, params=params, headers=auth).json()
        seen += [p["value"] for p in page["points"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [float(m) for m in range(10)]


def test_raw_points_without_metric_return_every_metric(client: TestClient, auth: dict[str, str], fleet: Tenant) -> None:  # type: ignore[type-arg]
    page = client.get(f"/api/v1/devices/{fleet.devices[0]}/telemetry", params=window(), headers=auth).json()
    assert len(page["points"]) == 11
    assert page["points"][0]["value"] == {"temp": 0.0, "mode": "boost", "ok": True}
    assert page["points"][-1]["seq"] is None
    assert page["points"][-1]["value"] == {"hum": 40}


@pytest.mark.parametrize(
    ("metric", "agg", "expected"),
    [
        ("temp", "avg", [2.0, 7.0]),
        ("temp", "min", [0.0, 5.0]),
        ("temp", "max", [4.0, 9.0]),
        ("temp", "sum", [10.0, 35.0]),
        ("temp", "count", [5, 5]),
        ("temp", "first", [0.0, 5.0]),
        ("temp", "last", [4.0, 9.0]),
        ("mode", "last", ["boost", "eco"]),
        ("ok", "first", [True, True]),
        ("ok", "count", [5, 5]),
        ("mode", "avg", [None, None]),
    ],
)
def test_aggregates_per_bucket(
    client: TestClient,
    auth: dict[str, str],
    fleet: Tenant,
    metric: str,
    agg: str,  # type: ignore[type-arg]
    expected: list[object],
) -> None:
    body = client.get(
        f"/api/v1/devices/{fleet.devices[0]}/telemetry",
        params=window(metric=metric, bucket="5m", agg=agg),
        headers=auth,
    ).json()
    assert [b["value"] for b in body["buckets"]] == expected
    assert [b["samples"] for b in body["buckets"]] == [5, 5]
    assert body["buckets"][0]["bucket"].startswith(T0.strftime("%Y-%m-%dT%H:%M"))


@pytest.mark.parametrize(
    ("params", "kind"),
    [
        ({"bucket": "5m"}, "invalid_input.bad_aggregation"),
        ({"agg": "avg", "bucket": "5m"}, "invalid_input.bad_aggregation"),
        ({"metric": "temp", "agg": "median", "bucket": "5m"}, "invalid_input"),
        ({"metric": "temp", "agg": "avg", "bucket": "5w"}, "invalid_input"),
        (
            {"metric": "temp", "agg": "avg", "bucket": "1s", "from": "2020-01-01T00:00:00Z"},
            "invalid_input.too_many_buckets",
        ),
        ({"from": "2026-11-27T10:00:00Z", "to": "2026-11-27T09:00:00Z"}, "invalid_input.bad_time"),
        ({"from": "yesterday"}, "invalid_input"),
        ({"cursor": "not-a-cursor"}, "invalid_input.bad_cursor"),
        ({"limit": "0"}, "invalid_input"),
        ({"limit": "100000"}, "invalid_input"),
        ({"metric": "bad name"}, "invalid_input"),
    ],
)
def test_bad_queries_are_400_problems(
    client: TestClient,
    auth: dict[str, str],
    fleet: Tenant,
    params: dict[str, str],  # type: ignore[type-arg]
    kind: str,
) -> None:
    resp = client.get(f"/api/v1/devices/{fleet.devices[0]}/telemetry", params=params, headers=auth)
    assert_problem(resp, 400, kind)


def test_health_and_unknown_routes(
    client: TestClient,
    auth: dict[str, str],
) -> None:  # type: ignore[type-arg]
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/readyz").json()["status"] == "ready"
    # The version, without credentials: the package's, as `kestrel --version` says it.
    assert client.get("/api/v1/version").json() == {"version": kestrel.__version__}
    assert client.get("/healthz").json()["version"] == kestrel.__version__
    assert_problem(client.get("/api/v1/nothing-here", headers=auth), 404, "not_found")
    assert_problem(client.put("/api/v1/devices", headers=auth), 405, "method_not_allowed")


def test_readyz_fails_when_database_is_unreachable() -> None:
    app = create_app(ApiSettings(admin_token=Secret(TOKEN)), "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1")
    with TestClient(app) as c:
        assert_problem(c.get("/readyz"), 503, "unavailable")
