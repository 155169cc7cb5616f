"""Headers the API reads are validated at the edge with the rule the database enforces (issue 16): a malformed
``Idempotency-Key`` or ``If-Match`` is a 400 with problem details, never a 500, and nothing is created."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from litestar.testing import TestClient

from api.app import create_app
from api.preconditions import IDEMPOTENCY_KEY_CHARS, IDEMPOTENCY_KEY_PATTERN, IF_MATCH_PATTERN
from api.settings import ApiSettings
from kestrel.devtools.servers import PostgresServer
from kestrel_core.settings import Secret
from tests.conftest import new_tenant, tenant_token

pytestmark = pytest.mark.integration


@pytest.fixture
def client(api_database_url: str, postgres: PostgresServer) -> Iterator[TestClient]:  # type: ignore[type-arg]
    settings = ApiSettings(
        admin_token=Secret("p-" + uuid.uuid4().hex), platform_database_url=Secret(postgres.platform_url)
    )
    with TestClient(create_app(settings, api_database_url)) as c:
        yield c


BAD_KEYS = [
    pytest.param("", id="empty"),  # the request schemathesis found: the database refused it with a 500
    pytest.param("x" * 201, id="too-long"),
    pytest.param("has space", id="space"),
    pytest.param('"unterminated', id="half-quoted"),
    pytest.param("k\u00e9y".encode("latin-1"), id="non-ascii"),
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_a_malformed_idempotency_key_is_400_and_creates_nothing(
    client: TestClient,  # type: ignore[type-arg]
    database_url: str,
    key: str | bytes,
) -> None:
    tenant = new_tenant(database_url, 0, prefix="pc").id
    auth = tenant_token(database_url, tenant)
    answer = client.post(
        "/api/v1/groups",
        json={"group_id": "0"},
        headers=auth | {"Idempotency-Key": key, "content-type": "application/json"},
    )
    assert answer.status_code == 400, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert answer.json()["invalid-params"][0]["name"] == "Idempotency-Key"
    # Positive control: the same request with a valid key is created, so the 400 was about the key alone.
    good = client.post("/api/v1/groups", json={"group_id": "0"}, headers=auth | {"Idempotency-Key": "k-1"})
    assert good.status_code == 201, good.text
    assert client.get("/api/v1/groups", headers=auth).json()[0]["group_id"] == "0"


def test_a_quoted_key_is_the_same_key(client: TestClient, database_url: str) -> None:  # type: ignore[type-arg]
    tenant = new_tenant(database_url, 0, prefix="pc").id
    auth = tenant_token(database_url, tenant)
    first = client.post("/api/v1/groups", json={"group_id": "g"}, headers=auth | {"Idempotency-Key": '"abc:1"'})
    again = client.post("/api/v1/groups", json={"group_id": "g"}, headers=auth | {"Idempotency-Key": "abc:1"})
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()


@pytest.mark.parametrize("value", ["null", "", '"x1"', "v1", '"v1', '"v1", "v2"'])
def test_a_malformed_if_match_is_400(client: TestClient, database_url: str, value: str) -> None:  # type: ignore[type-arg]
    tenant = new_tenant(database_url, 1, prefix="pc")
    auth = tenant_token(database_url, tenant.id)
    device = tenant.devices[0]
    answer = client.patch(f"/api/v1/devices/{device}", json={"name": "n"}, headers=auth | {"If-Match": value})
    assert answer.status_code == 400, answer.text
    assert client.get(f"/api/v1/devices/{device}", headers=auth).json()["name"] == ""
    etag = client.get(f"/api/v1/devices/{device}", headers=auth).headers["etag"]
    assert client.patch(f"/api/v1/devices/{device}", json={"name": "n"}, headers=auth | {"If-Match": etag}).is_success


def test_an_if_match_beyond_any_version_is_412_not_500(
    client: TestClient,  # type: ignore[type-arg]
    database_url: str,
) -> None:
    """Found by the fuzzer: a syntactically valid ETag naming a version beyond PostgreSQL's integer (500 before)."""
    tenant = new_tenant(database_url, 1, prefix="pc")
    auth = tenant_token(database_url, tenant.id)
    huge = 'W/"v548707646779"'
    answer = client.patch(f"/api/v1/devices/{tenant.devices[0]}", json={"name": "n"}, headers=auth | {"If-Match": huge})
    assert answer.status_code == 412, answer.text
    platform = {"Authorization": f"Bearer {client.app.state.admin_token}", "If-Match": huge}
    assert client.patch(f"/api/v1/tenants/{tenant.id}", json={"status": None}, headers=platform).status_code == 412


def test_the_database_enforces_the_same_key_rule(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        (definition,) = conn.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'idempotency_keys_key_check'"
        ).fetchone()  # type: ignore[misc]
    assert f"^{IDEMPOTENCY_KEY_CHARS}$" in definition
    for key in ("k", "a" * 200, "uuid:8e03978e-40d5-43e8-bc93-6894a57f9324", "b64+/="):
        assert re.fullmatch(IDEMPOTENCY_KEY_PATTERN, key)
    assert re.fullmatch(IF_MATCH_PATTERN, 'W/"v12"') and re.fullmatch(IF_MATCH_PATTERN, "*")


def test_the_openapi_document_states_the_header_rules() -> None:
    from api.__main__ import openapi_document  # noqa: PLC0415

    doc = openapi_document()
    assert IDEMPOTENCY_KEY_PATTERN.replace("\\", "\\\\").replace('"', '\\"') in doc
    assert IF_MATCH_PATTERN.replace("\\", "\\\\").replace('"', '\\"') in doc
