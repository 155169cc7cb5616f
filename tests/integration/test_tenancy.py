"""Tenancy as an attacker sees it: row-level security in the catalog and in practice, tokens, scopes, and every
route of the OpenAPI document tried with another tenant's ids. Every attempt is refused and changes nothing."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from litestar.testing import AsyncTestClient, TestClient

from api.__main__ import openapi_document
from api.app import create_app
from api.settings import ApiSettings
from kestrel.devtools import seed
from kestrel.devtools.servers import PostgresServer
from kestrel_core.settings import Secret
from tests.conftest import new_tenant, tenant_token

pytestmark = pytest.mark.integration
PLATFORM = "platform-admin-" + uuid.uuid4().hex
PLATFORM_AUTH = {"Authorization": f"Bearer {PLATFORM}"}


def refused(conn: psycopg.Connection[Any], *statements: str) -> None:
    """Each statement is refused for lack of privilege (the transaction rolled back after each)."""
    for statement in statements:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(statement.encode())  # names from the catalog or fixed here, no input
        conn.rollback()


def _settings(postgres: PostgresServer, **kwargs: Any) -> ApiSettings:
    return ApiSettings(platform_database_url=Secret(postgres.platform_url), **kwargs)


@pytest.fixture
def client(api_database_url: str, postgres: PostgresServer) -> Iterator[TestClient]:  # type: ignore[type-arg]
    with TestClient(create_app(_settings(postgres, admin_token=Secret(PLATFORM)), api_database_url)) as c:
        yield c


def _tenant(database_url: str, devices: int = 3) -> tuple[str, list[str]]:
    made = new_tenant(database_url, devices, prefix="tn")
    return made.id, made.devices


# ------------------------------------------------------------------------------------------- the database


def test_every_tenant_table_has_forced_rls_and_the_api_role_is_unprivileged(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped"
                " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition"
            )
        ]
        assert {"devices", "telemetry", "users", "api_tokens", "audit_log", "pki_certificates"} <= set(tables)
        for table in tables:
            enabled, forced = conn.execute(
                "SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE relname = %s", (table,)
            ).fetchone()  # type: ignore[misc]
            assert enabled and forced, f"{table} lacks forced row-level security"
            policies = conn.execute(
                "SELECT policyname FROM pg_policies WHERE tablename = %s AND 'kestrel_api' = ANY (roles)", (table,)
            ).fetchall()
            assert policies, f"{table} has no policy for kestrel_api"
        role = conn.execute(
            "SELECT rolsuper, rolbypassrls, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = 'kestrel_api'"
        ).fetchone()
        assert role == (False, False, False, False)
        owned = conn.execute("SELECT count(*) FROM pg_tables WHERE tableowner = 'kestrel_api'").fetchone()
        assert owned == (0,)


def test_without_a_tenant_context_the_api_role_sees_nothing(database_url: str, api_database_url: str) -> None:
    tenant, devices = _tenant(database_url)
    with psycopg.connect(api_database_url) as conn:
        assert conn.execute("SELECT count(*) FROM devices").fetchone() == (0,)
        conn.execute("SELECT set_config('kestrel.tenant', %s, true)", (tenant,))
        assert conn.execute("SELECT count(*) FROM devices").fetchone() == (len(devices),)
        conn.commit()  # the setting was transaction-local
        assert conn.execute("SELECT count(*) FROM devices").fetchone() == (0,)
        conn.execute("SELECT set_config('kestrel.tenant', %s, true)", (tenant,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # RLS WITH CHECK: no writing into B
            conn.execute(
                "INSERT INTO devices (device_id, tenant_id) VALUES (%s, 'someone-else')", (f"x-{uuid.uuid4().hex[:6]}",)
            )
        conn.rollback()
        conn.execute("SELECT set_config('kestrel.tenant', %s, true)", (tenant,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # the audit log is append-only
            conn.execute("UPDATE audit_log SET actor = 'me'")


def test_the_api_role_journals_revocations_it_cannot_read(database_url: str, api_database_url: str) -> None:
    """Suspending a device as kestrel_api writes the identity journal authsvc kicks from (migration 0013), through the
    trigger's definer rights; the role itself can neither read nor forge journal rows or move the kick cursor."""
    tenant, devices = _tenant(database_url)
    with psycopg.connect(api_database_url) as conn:
        conn.execute("SELECT set_config('kestrel.tenant', %s, true)", (tenant,))
        conn.execute("UPDATE devices SET status = 'suspended' WHERE device_id = %s", (devices[0],))
        conn.commit()
        refused(
            conn,
            "SELECT count(*) FROM identity_events",
            'INSERT INTO identity_events (event) VALUES (\'{"scope": "all", "status": "revoked"}\')',
            "UPDATE identity_cursors SET last_id = last_id + 1000",
        )
    with psycopg.connect(database_url) as conn:
        journalled = conn.execute(
            "SELECT event FROM identity_events WHERE event->>'device' = %s", (devices[0],)
        ).fetchall()
    assert [e for (e,) in journalled] == [
        {"scope": "device", "tenant": tenant, "device": devices[0], "status": "suspended", "table": "devices"}
    ]


def test_the_api_role_reads_telemetry_only_through_its_tenants_view(database_url: str, api_database_url: str) -> None:
    """Migration 0016: the view is the API's only way to telemetry (as on TimescaleDB, where the hypertable cannot
    carry row-level security); the table itself, partitions included, is closed to kestrel_api."""
    tenant, devices = _tenant(database_url)
    other, others = _tenant(database_url)
    with psycopg.connect(database_url) as conn:
        for t, d in ((tenant, devices[0]), (other, others[0])):
            conn.execute(
                "INSERT INTO telemetry (tenant_id, device_id, stream, ts, seq, metrics, received_at)"
                " VALUES (%s, %s, '', now(), 1, '{}', now())",
                (t, d),
            )
        partitions = [r[0] for r in conn.execute("SELECT inhrelid::regclass::text FROM pg_inherits"
                                                 " WHERE inhparent = 'telemetry'::regclass")]  # fmt: skip
    with psycopg.connect(api_database_url) as conn:
        conn.execute("SELECT set_config('kestrel.tenant', %s, true)", (tenant,))
        assert conn.execute("SELECT tenant_id, device_id FROM tenant_telemetry").fetchall() == [(tenant, devices[0])]
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM tenant_telemetry").fetchone() == (0,)  # no tenant: nothing
        conn.rollback()
        refused(conn, *(f"SELECT count(*) FROM {r}" for r in ("telemetry", "telemetry_hourly", *partitions)))  # noqa: S608


def test_the_api_refuses_to_run_as_a_privileged_role(database_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KESTREL_")}
    env |= {"KESTREL_API_DATABASE_URL": database_url, "KESTREL_API_ADMIN_TOKEN": "x", "KESTREL_API_PORT": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "api"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "kestrel api: the API's database role owns tables or bypasses row-level security; connect it as kestrel_api"
        " (KESTREL_API_DATABASE_URL)"
    ]


def test_interleaved_tenants_through_a_small_pool_never_leak(database_url: str, api_database_url: str) -> None:
    a, a_devices = _tenant(database_url, 4)
    b, b_devices = _tenant(database_url, 5)
    auth = {a: tenant_token(database_url, a), b: tenant_token(database_url, b)}
    app = create_app(ApiSettings(admin_token=Secret(PLATFORM), pool_min=1, pool_max=2), api_database_url)

    async def scenario() -> list[tuple[str, set[str]]]:
        async with AsyncTestClient(app) as c:

            async def one(tenant: str) -> tuple[str, set[str]]:
                resp = await c.get("/api/v1/devices", headers=auth[tenant])
                assert resp.status_code == 200, resp.text
                return tenant, {d["device_id"] for d in resp.json()["items"]}

            return await asyncio.gather(*(one(a if i % 2 else b) for i in range(120)))

    for tenant, seen in asyncio.run(scenario()):
        assert seen == set(a_devices if tenant == a else b_devices)


# ------------------------------------------------------------------------------------------- tokens


def test_tokens_fail_closed(client: TestClient, database_url: str) -> None:  # type: ignore[type-arg]
    tenant, _ = _tenant(database_url)
    good = tenant_token(database_url, tenant)
    assert client.get("/api/v1/devices", headers=good).status_code == 200
    token = good["Authorization"].split()[1]
    token_id = token.split("_")[1]
    tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
    with psycopg.connect(database_url) as conn:
        expired_id, expired = seed.create_api_token(database_url, tenant, ["devices:read"])
        conn.execute(
            "UPDATE api_tokens SET expires_at = now() - interval '1 second' WHERE token_id = %s", (expired_id,)
        )
    cases = {
        "tampered secret": tampered,
        "unknown id": f"kst_{'0' * 16}_{token.split('_', 2)[2]}",
        "expired": expired,
        "not a token": "kst_garbage",
        "platform token on a tenant route": PLATFORM,
    }
    for name, value in cases.items():
        status = client.get("/api/v1/devices", headers={"Authorization": f"Bearer {value}"}).status_code
        assert status == (403 if name.startswith("platform") else 401), name
    assert client.delete(f"/api/v1/tokens/{token_id}", headers=good).status_code == 204  # revoked by itself
    assert client.get("/api/v1/devices", headers=good).status_code == 401
    other = tenant_token(database_url, tenant)
    client.patch(f"/api/v1/tenants/{tenant}", json={"status": "suspended"}, headers=PLATFORM_AUTH).raise_for_status()
    assert client.get("/api/v1/devices", headers=other).status_code == 401  # a suspended tenant's tokens stop


def test_scopes_roles_and_escalation(client: TestClient, database_url: str) -> None:  # type: ignore[type-arg]
    tenant, devices = _tenant(database_url)
    admin = tenant_token(database_url, tenant)
    viewer_user = client.post("/api/v1/users", json={"email": "v@example.com", "role": "viewer"}, headers=admin).json()
    # A token of a viewer never exceeds the viewer role, whatever scopes it was given.
    created = client.post(
        "/api/v1/tokens",
        json={"scopes": ["devices:read", "devices:write"], "user_id": viewer_user["user_id"]},
        headers=admin,
    ).json()
    viewer = {"Authorization": f"Bearer {created['token']}"}
    assert client.get("/api/v1/devices", headers=viewer).status_code == 200
    assert client.post("/api/v1/devices", json={"device_id": f"{tenant}-new"}, headers=viewer).status_code == 403
    assert client.patch(f"/api/v1/devices/{devices[0]}", json={"name": "x"}, headers=viewer).status_code == 403
    assert client.get("/api/v1/audit", headers=viewer).status_code == 403
    # Scoped token: cannot mint a token with more than it has.
    narrow = tenant_token(database_url, tenant, "devices:read", "tokens:write")
    resp = client.post("/api/v1/tokens", json={"scopes": ["devices:write"]}, headers=narrow)
    assert resp.status_code == 403
    assert client.post("/api/v1/tokens", json={"scopes": ["everything"]}, headers=admin).status_code == 400
    # Demoting a user narrows their existing tokens at once.
    operator = client.post("/api/v1/users", json={"email": "o@example.com", "role": "operator"}, headers=admin).json()
    op_token = client.post(
        "/api/v1/tokens",
        json={"scopes": ["devices:write", "devices:read"], "user_id": operator["user_id"]},
        headers=admin,
    ).json()["token"]
    op = {"Authorization": f"Bearer {op_token}"}
    assert client.patch(f"/api/v1/devices/{devices[1]}", json={"name": "renamed"}, headers=op).status_code == 200
    client.patch(f"/api/v1/users/{operator['user_id']}", json={"role": "viewer"}, headers=admin).raise_for_status()
    assert client.patch(f"/api/v1/devices/{devices[1]}", json={"name": "again"}, headers=op).status_code == 403
    client.patch(f"/api/v1/users/{operator['user_id']}", json={"status": "disabled"}, headers=admin).raise_for_status()
    assert client.get("/api/v1/devices", headers=op).status_code == 401


# ------------------------------------------------------------------------------------------- tenant B's ids


def _snapshot(database_url: str, tenant: str) -> dict[str, Any]:
    with psycopg.connect(database_url) as conn:
        return {
            table: sorted(map(str, conn.execute(f"SELECT * FROM {table} WHERE tenant_id = %s", (tenant,)).fetchall()))  # noqa: S608
            for table in (
                "tenants",
                "devices",
                "device_groups",
                "device_group_members",
                "users",
                "api_tokens",
                "oauth_clients",
                "device_shadows",
                "shadow_history",
                "commands",
                "command_events",
                "provisioning_claims",
                "rules",
                "rule_versions",
                "alarms",
                "alarm_comments",
                "alarm_events",
                "channels",
                "deliveries",
            )
        }


def _fill(path: str, ids: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: ids[m[1]], path)


QUERY_VALUES = {"metric": "temp", "agg": "avg"}  # valid values for required query parameters
RULE: dict[str, Any] = {
    "name": "hot",
    "alarm": {"when": {"op": "compare", "cmp": "gt", "left": {"kind": "metric", "name": "t"},
                       "right": {"kind": "const", "value": 1}}},
}  # fmt: skip
BODIES: dict[str, Any] = {
    "/api/v1/tenants": {"tenant_id": "stolen-tenant"},
    "/api/v1/tenants/{tenant_id}": {"status": "suspended"},
    "/api/v1/devices": {"device_id": "dev-from-a"},
    "/api/v1/devices/bulk": [{"device_id": "bulk-from-a"}],
    "/api/v1/devices/import": None,
    "/api/v1/devices/{device_id}": {"name": "pwned", "status": "suspended"},
    "/api/v1/groups": {"group_id": "g-from-a"},
    "/api/v1/users": {"email": "a@example.com", "role": "admin"},
    "/api/v1/users/{user_id}": {"role": "viewer"},
    "/api/v1/tokens": {"scopes": ["devices:read"]},
    "/api/v1/oauth-clients": {"scopes": ["devices:read"]},
    "/api/v1/devices/{device_id}/shadow": {"desired": {"pwned": True}},
    "/api/v1/devices/{device_id}/shadows/{name}": {"desired": {"pwned": True}},
    "/api/v1/devices/{device_id}/commands": {"name": "unlock"},
    "/api/v1/provisioning-claims": {"max_uses": 5},
    "/api/v1/rules": RULE,
    "/api/v1/rules/{rule_id}": RULE,
    "/api/v1/rules/dry-run": {"rule": RULE, "start": "2026-01-01T00:00:00Z", "duration_s": 60},
    "/api/v1/channels": {"channel_id": "hook", "config": {"kind": "webhook", "url": "https://h.example.com/"}},
    "/api/v1/alarms/{alarm_id}/comments": {"body": "pwned"},
}


def test_tenant_a_against_every_route_with_tenant_b_ids(client: TestClient, database_url: str) -> None:  # type: ignore[type-arg]
    a, _ = _tenant(database_url)
    b, b_devices = _tenant(database_url)
    auth_a, auth_b = tenant_token(database_url, a), tenant_token(database_url, b)
    # B's objects, made through the API as B.
    client.post("/api/v1/groups", json={"group_id": "b-group"}, headers=auth_b).raise_for_status()
    client.put(f"/api/v1/groups/b-group/devices/{b_devices[0]}", headers=auth_b).raise_for_status()
    b_user = client.post("/api/v1/users", json={"email": "b@example.com", "role": "admin"}, headers=auth_b).json()
    b_token = client.post("/api/v1/tokens", json={"scopes": ["devices:read"]}, headers=auth_b).json()
    b_client = client.post("/api/v1/oauth-clients", json={"scopes": ["devices:read"]}, headers=auth_b).json()
    for path in ("shadow", "shadows/config"):
        client.patch(
            f"/api/v1/devices/{b_devices[0]}/{path}", json={"desired": {"a": 1}}, headers=auth_b
        ).raise_for_status()
    b_command = client.post(f"/api/v1/devices/{b_devices[0]}/commands", json={"name": "x"}, headers=auth_b).json()
    b_claim = client.post("/api/v1/provisioning-claims", json={}, headers=auth_b).json()["claim"]
    b_rule = client.post("/api/v1/rules", json=RULE, headers=auth_b).json()
    channel = {"channel_id": "b-hook", "config": {"kind": "webhook", "url": "https://b.example.com/"}}
    client.post("/api/v1/channels", json=channel, headers=auth_b).raise_for_status()
    b_alarm = "a" + secrets.token_hex(12)
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO alarms (alarm_id, tenant_id, rule_id, rule_name, device_id, severity, raised_at)"
            " VALUES (%s, %s, %s, 'hot', %s, 'major', now())",
            (b_alarm, b, b_rule["rule_id"], b_devices[0]),
        )
    ids = {
        "tenant_id": b,
        "device_id": b_devices[0],
        "group_id": "b-group",
        "user_id": b_user["user_id"],
        "token_id": b_token["token_id"],
        "client_id": b_client["client_id"],
        "command_id": b_command["command_id"],
        "claim_id": b_claim["claim_id"],
        "rule_id": b_rule["rule_id"],
        "alarm_id": b_alarm,
        "channel_id": "b-hook",
        "name": "config",
    }
    before = _snapshot(database_url, b)
    doc = json.loads(openapi_document())
    tried = 0
    for path, item in doc["paths"].items():
        if not path.startswith("/api/v1"):
            continue
        for method in item:
            url = _fill(path, ids)
            body = BODIES.get(path)
            required = {
                p["name"]: QUERY_VALUES[p["name"]]
                for p in item[method].get("parameters", [])
                if p["in"] == "query" and p.get("required")
            }
            resp = client.request(
                method.upper(),
                url,
                params=required,
                headers=auth_a,
                json=body if method in ("post", "patch", "put") else None,
            )
            tried += 1
            if path == "/api/v1/stream":  # past every check it needs NATS, which this in-process API lacks; the
                # streams' isolation is attacked with hostile filters over real NATS in tests/e2e/test_streams.py
                assert resp.status_code == 503 and "NATS" in resp.text, resp.text
                continue
            if "{" in path:  # names one of B's objects: it does not exist for A
                assert resp.status_code == 404 or (path.startswith("/api/v1/tenants") and resp.status_code == 403), (
                    method,
                    path,
                    resp.status_code,
                    resp.text,
                )
            else:  # acts in A's own tenant (or is platform-only): never reaches B
                assert resp.status_code in (200, 201, 204, 400, 403, 404, 415), (
                    method,
                    path,
                    resp.status_code,
                    resp.text,
                )
    assert tried >= 20
    assert _snapshot(database_url, b) == before
    # ... and B's data is still B's, seen by B.
    listed = client.get("/api/v1/devices", headers=auth_b).json()["items"]
    assert {d["device_id"] for d in listed} == set(b_devices)
    assert all(d["name"] != "pwned" for d in listed)


def test_mass_assignment_is_refused(client: TestClient, database_url: str) -> None:  # type: ignore[type-arg]
    a, a_devices = _tenant(database_url)
    b, _ = _tenant(database_url)
    auth = tenant_token(database_url, a)
    attempts = [
        ("post", "/api/v1/devices", {"device_id": "mass-1", "tenant_id": b}),
        ("post", "/api/v1/devices", {"device_id": "mass-2", "version": 99}),
        ("patch", f"/api/v1/devices/{a_devices[0]}", {"tenant_id": b}),
        ("patch", f"/api/v1/devices/{a_devices[0]}", {"status": "decommissioned"}),
        ("post", "/api/v1/users", {"email": "m@example.com", "role": "admin", "tenant_id": b}),
        ("post", "/api/v1/users", {"email": "m@example.com", "role": "superuser"}),
        ("post", "/api/v1/tokens", {"scopes": ["devices:read"], "tenant_id": b}),
        ("post", "/api/v1/groups", {"group_id": "g", "tenant_id": b}),
    ]
    for method, url, body in attempts:
        resp = client.request(method.upper(), url, json=body, headers=auth)
        assert resp.status_code == 400, (url, body, resp.text)
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT tenant_id FROM devices WHERE device_id = %s", (a_devices[0],)).fetchone() == (a,)
        assert conn.execute("SELECT count(*) FROM devices WHERE device_id LIKE 'mass-%'").fetchone() == (0,)


# ------------------------------------------------------------------------------------------- behaviour


def test_devices_groups_etags_idempotency_bulk_and_audit(client: TestClient, database_url: str) -> None:  # type: ignore[type-arg]
    tenant, devices = _tenant(database_url, 1)
    auth = tenant_token(database_url, tenant)
    created = client.post(
        "/api/v1/devices",
        json={"device_id": f"{tenant}-x", "tags": ["floor:2"]},
        headers=auth | {"Idempotency-Key": "k1"},
    )
    assert created.status_code == 201, created.text
    again = client.post(
        "/api/v1/devices",
        json={"device_id": f"{tenant}-x", "tags": ["floor:2"]},
        headers=auth | {"Idempotency-Key": "k1"},
    )
    assert again.status_code == 201 and again.json() == created.json()
    other_body = client.post(
        "/api/v1/devices", json={"device_id": f"{tenant}-y"}, headers=auth | {"Idempotency-Key": "k1"}
    )
    assert other_body.status_code == 409
    got = client.get(f"/api/v1/devices/{tenant}-x", headers=auth)
    etag = got.headers["etag"]
    ok = client.patch(f"/api/v1/devices/{tenant}-x", json={"name": "boiler"}, headers=auth | {"If-Match": etag})
    assert ok.status_code == 200 and ok.headers["etag"] != etag
    stale = client.patch(f"/api/v1/devices/{tenant}-x", json={"name": "lost"}, headers=auth | {"If-Match": etag})
    assert stale.status_code == 412
    csv_body = "device_id,name,tags\n" + "\n".join(f"{tenant}-c{i},c{i},a;b" for i in range(3))
    bulk = client.post("/api/v1/devices/import", content=csv_body, headers=auth | {"content-type": "text/csv"})
    assert bulk.json() == {"created": 3}, bulk.text
    dup = client.post(
        "/api/v1/devices/bulk", json=[{"device_id": f"{tenant}-j"}, {"device_id": devices[0]}], headers=auth
    )
    assert dup.status_code == 409  # all or none
    assert client.get(f"/api/v1/devices/{tenant}-j", headers=auth).status_code == 404
    client.post("/api/v1/groups", json={"group_id": "g1"}, headers=auth).raise_for_status()
    client.put(f"/api/v1/groups/g1/devices/{tenant}-c0", headers=auth).raise_for_status()
    in_group = client.get("/api/v1/devices", params={"group": "g1"}, headers=auth).json()["items"]
    assert [d["device_id"] for d in in_group] == [f"{tenant}-c0"]
    tagged = client.get("/api/v1/devices", params={"tag": "a"}, headers=auth).json()["items"]
    assert len(tagged) == 3
    entries = client.get("/api/v1/audit", headers=auth).json()["items"]
    actions = [e["action"] for e in entries if not e["actor"].startswith("cli:")]
    assert {"device.create", "device.update", "device.bulk_create", "group.create", "group.add_device"} <= set(actions)
    assert actions.count("device.create") == 1  # the replay wrote nothing
    # The operator's registration of the tenant's first device (the same write path) is audited as the operator.
    operator = {(e["action"], e["target"].partition(":")[0]) for e in entries if e["actor"].startswith("cli:")}
    assert operator == {("tenant.create", "tenant"), ("device.create", "device"), ("token.create", "token")}
    assert f"device:{devices[0]}" in {e["target"] for e in entries if e["actor"].startswith("cli:")}


def test_device_quota_and_platform_tenant_management(client: TestClient, database_url: str) -> None:  # type: ignore[type-arg]
    tenant = f"tq-{uuid.uuid4().hex[:8]}"
    made = client.post("/api/v1/tenants", json={"tenant_id": tenant, "max_devices": 2}, headers=PLATFORM_AUTH)
    assert made.status_code == 201, made.text
    assert client.post("/api/v1/tenants", json={"tenant_id": tenant}, headers=PLATFORM_AUTH).status_code == 409
    assert tenant in {t["tenant_id"] for t in client.get("/api/v1/tenants", headers=PLATFORM_AUTH).json()}
    auth = tenant_token(database_url, tenant)
    assert client.get("/api/v1/tenants", headers=auth).status_code == 403
    assert client.get(f"/api/v1/tenants/{tenant}", headers=auth).status_code == 200  # its own
    bulk = client.post("/api/v1/devices/bulk", json=[{"device_id": f"{tenant}-{i}"} for i in range(3)], headers=auth)
    assert bulk.status_code == 409 and "quota" in bulk.json()["detail"]
    assert (
        client.post(
            "/api/v1/devices/bulk", json=[{"device_id": f"{tenant}-{i}"} for i in range(2)], headers=auth
        ).status_code
        == 201
    )
    etag = client.get(f"/api/v1/tenants/{tenant}", headers=PLATFORM_AUTH).headers["etag"]
    raised = client.patch(
        f"/api/v1/tenants/{tenant}", json={"max_devices": 3}, headers=PLATFORM_AUTH | {"If-Match": etag}
    )
    assert raised.status_code == 200
    stale = client.patch(
        f"/api/v1/tenants/{tenant}", json={"max_devices": 9}, headers=PLATFORM_AUTH | {"If-Match": etag}
    )
    assert stale.status_code == 412
    assert client.post("/api/v1/devices", json={"device_id": f"{tenant}-2"}, headers=auth).status_code == 201


def test_api_requests_over_the_tenants_quota_get_429(client: TestClient, database_url: str) -> None:  # type: ignore[type-arg]
    limited, _ = _tenant(database_url, 1)
    other, _ = _tenant(database_url, 1)
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE tenants SET api_requests_per_s = 3 WHERE tenant_id = %s", (limited,))
    auth, other_auth = tenant_token(database_url, limited), tenant_token(database_url, other)
    statuses = [client.get("/api/v1/devices", headers=auth).status_code for _ in range(12)]
    assert statuses.count(200) >= 3 and 429 in statuses
    refused = client.get("/api/v1/devices", headers=auth)
    if refused.status_code == 429:
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["type"] == "urn:kestrel:problem:rate_limited"
    # another tenant is not slowed down
    assert all(client.get("/api/v1/devices", headers=other_auth).status_code == 200 for _ in range(12))


def test_aggregates_over_a_group_and_latest_values(client: TestClient, database_url: str) -> None:  # type: ignore[type-arg]
    tenant, devices = _tenant(database_url, 3)
    other, other_devices = _tenant(database_url, 1)
    auth = tenant_token(database_url, tenant)
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    with psycopg.connect(database_url) as conn:
        for t, device, temp in (
            (tenant, devices[0], 10.0),
            (tenant, devices[1], 30.0),
            (tenant, devices[2], 999.0),
            (other, other_devices[0], 500.0),
        ):
            conn.execute(
                "INSERT INTO telemetry (tenant_id, device_id, stream, ts, seq, metrics, received_at)"
                " VALUES (%s, %s, '', %s, 1, %s, now())",
                (t, device, start + timedelta(minutes=5), json.dumps({"temp": temp})),
            )
    client.post("/api/v1/groups", json={"group_id": "hall"}, headers=auth).raise_for_status()
    for device in devices[:2]:
        client.put(f"/api/v1/groups/hall/devices/{device}", headers=auth).raise_for_status()
    window = {"from": start.isoformat(), "to": (start + timedelta(hours=1)).isoformat()}
    body = client.get(
        "/api/v1/groups/hall/telemetry", params={"metric": "temp", "agg": "avg", **window}, headers=auth
    ).json()
    assert [(b["value"], b["samples"], b["devices"]) for b in body["buckets"]] == [(20.0, 2, 2)]  # not device 2
    latest = client.get(
        "/api/v1/telemetry/latest", params={"group": "hall", "metric": "temp", "within_hours": 6}, headers=auth
    ).json()
    assert sorted((i["device_id"], i["value"]) for i in latest["items"]) == [(devices[0], 10.0), (devices[1], 30.0)]
    everything = client.get("/api/v1/telemetry/latest", params={"within_hours": 6}, headers=auth).json()["items"]
    assert other_devices[0] not in {i["device_id"] for i in everything}
    other_auth = tenant_token(database_url, other)
    assert (
        client.get(
            "/api/v1/groups/hall/telemetry", params={"metric": "temp", "agg": "avg"}, headers=other_auth
        ).status_code
        == 404
    )


def test_idempotent_creates_of_groups_and_users(client: TestClient, database_url: str) -> None:  # type: ignore[type-arg]
    tenant, _ = _tenant(database_url, 1)
    auth = tenant_token(database_url, tenant)
    first = client.post(
        "/api/v1/users", json={"email": "i@example.com", "role": "viewer"}, headers=auth | {"Idempotency-Key": "u1"}
    )
    again = client.post(
        "/api/v1/users", json={"email": "i@example.com", "role": "viewer"}, headers=auth | {"Idempotency-Key": "u1"}
    )
    assert first.status_code == again.status_code == 201 and first.json() == again.json()
    reused = client.post("/api/v1/groups", json={"group_id": "g"}, headers=auth | {"Idempotency-Key": "u1"})
    assert reused.status_code == 409  # the same key for another kind of request
    g1 = client.post("/api/v1/groups", json={"group_id": "g"}, headers=auth | {"Idempotency-Key": "g1"})
    g2 = client.post("/api/v1/groups", json={"group_id": "g"}, headers=auth | {"Idempotency-Key": "g1"})
    assert g1.status_code == g2.status_code == 201 and g1.json() == g2.json()
    assert len(client.get("/api/v1/users", headers=auth).json()) == 1


def test_the_platform_token_works_whatever_its_format(api_database_url: str, postgres: PostgresServer) -> None:
    """Older embedded state dirs hold a platform token that looks like an API token (kst_…)."""
    legacy = "kst_admin_" + uuid.uuid4().hex
    with TestClient(create_app(_settings(postgres, admin_token=Secret(legacy)), api_database_url)) as c:
        assert c.get("/api/v1/tenants", headers={"Authorization": f"Bearer {legacy}"}).status_code == 200
        assert c.get("/api/v1/tenants", headers={"Authorization": f"Bearer {legacy}x"}).status_code == 401


def test_the_api_role_cannot_run_platform_operations(postgres: PostgresServer) -> None:
    """Least privilege (issue 10): an SQL injection in a tenant request runs as kestrel_api, which may not execute
    the tenant functions; kestrel_platform may call them and read nothing else."""
    with psycopg.connect(postgres.api_url) as conn:
        refused(
            conn,
            "SELECT * FROM kestrel_platform_tenants()",
            "SELECT * FROM kestrel_platform_create_tenant('evil', '', NULL, NULL, NULL, 'sqli', 'x')",
            "SELECT * FROM kestrel_platform_update_tenant('evil', NULL, '{}'::jsonb, 'sqli', 'x')",
        )
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SET ROLE kestrel_platform")
    with psycopg.connect(postgres.platform_url) as conn:
        assert conn.execute("SELECT count(*) FROM kestrel_platform_tenants()").fetchone()[0] >= 0  # type: ignore[index]
        refused(conn, *(f"SELECT 1 FROM {t} LIMIT 1" for t in ("tenants", "devices", "api_tokens", "audit_log")))  # noqa: S608
