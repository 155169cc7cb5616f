"""The running API fuzzed from its own OpenAPI document (schemathesis CLI, against a real uvicorn server on a
loopback port), once with each of two tenants' tokens and once with the platform token: no 5xx, every answer
conforms to the document, and the document states the rules the API enforces (schemathesis' "validation mismatch"
warning fails the run).

Deterministic (issue 16): one seed for every phase, the stateful one included, no example database carried between
runs, one worker, fresh tenants. A failure prints the seed and reproduces with the same command.
"""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from kestrel.devtools import seed
from kestrel.devtools.servers import NatsServer, PostgresServer
from kestrel.store.session import operator, run_blocking
from kestrel_core.tokens import secret_digest
from tests.conftest import isolated_database, start_api, tenant_token

pytestmark = pytest.mark.integration
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
SEEDS = {"tenant-a": 7, "tenant-b": 8, "platform": 9}
EXAMPLES = 40  # per operation (bulk: 160), raised for issue 12
PLATFORM = "platform-" + uuid.uuid4().hex


@dataclass(frozen=True)
class Target:
    which: str
    port: int
    database_url: str


@pytest.fixture(params=list(SEEDS))
def target(
    request: pytest.FixtureRequest, postgres: PostgresServer, nats_server: NatsServer, tmp_path: Path
) -> Iterator[Target]:
    """An API of its own on a database of its own for each run: device ids are global, so two runs sharing a
    database would collide on the ids their generators draw first (409s the fuzzer reads as a schema mismatch).
    Its streams end after 0.2 s (a stream's lifetime), so the fuzzer gets a whole answer from ``GET /stream``."""
    database_url = isolated_database(postgres, "fuzz")
    streams = {"KESTREL_API_NATS_URL": nats_server.url, "KESTREL_API_STREAM_MAX_S": "0.2"}
    api, port = start_api(postgres, database_url, tmp_path, PLATFORM, streams)
    yield Target(request.param, port, database_url)
    api.stop()


def _oauth_client(database_url: str, tenant: str) -> str:
    """Basic credentials of an OAuth client of ``tenant``, so the token endpoint is fuzzed past authentication."""
    client_id, secret = "kcl_" + secrets.token_hex(8), "kcs_" + secrets.token_urlsafe(32)
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO oauth_clients (client_id, tenant_id, name, scopes, secret_sha256) VALUES (%s, %s, %s, %s, %s)",
            (client_id, tenant, "fuzz", ["devices:read", "telemetry:read"], secret_digest(secret)),
        )
    return base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def _user(database_url: str, tenant: str) -> str:
    """A user of ``tenant`` for the user routes to change (positive examples reach the logic, not a 404)."""
    from kestrel.store import users  # noqa: PLC0415

    user = run_blocking(database_url, lambda c: users.create(c, operator(), tenant, "fuzzed@example.com", "viewer"))
    return str(user["user_id"])


def _config(auth: str, tenant: str, sacrificial_token: str, basic: str, user: str) -> str:
    """Every device route works on the tenant's first device and decommissioning on a device of its own, the user
    routes on a user made for them; token
    revocation on a token made for it (revoking the fuzzing token would leave only 401s); the token endpoint with a
    real client's credentials. Bulk creation gets more valid examples and no invalid ones (POST /devices has the same
    item schema and is fuzzed with both): most generated batches name a device another example registered (409), a
    group the tenant lacks or an id twice, which JSON Schema cannot forbid, and the run must see some succeed.
    A rule body (create, replace, dry run) is a recursive tagged union: the coverage phase's enumeration of it ran to
    48,000 cases for one operation, so those operations get the fuzzing and stateful phases only; and what makes most
    generated rules invalid (devices, groups and channels the tenant lacks, a dry run's range out of order or longer
    than 31 days) cannot be said in JSON Schema, so a mostly refused run is no schema mismatch there (a 5xx or a
    non-conforming answer still fails it)."""
    return f"""
headers = {{ Authorization = "{auth}" }}

[warnings]
fail-on = ["validation_mismatch"]

[generation]
max-examples = {EXAMPLES}

[parameters]
device_id = "{tenant}-0"

[[operations]]
include-path = "/api/v1/devices/{{device_id}}/decommission"
parameters = {{ device_id = "{tenant}-2" }}

[[operations]]
include-path = "/api/v1/tokens/{{token_id}}"
parameters = {{ token_id = "{sacrificial_token}" }}

[[operations]]
include-path = "/api/v1/users/{{user_id}}"
parameters = {{ user_id = "{user}" }}

[[operations]]
include-path = "/api/v1/devices/bulk"
generation = {{ max-examples = {EXAMPLES * 4}, mode = "positive" }}

[[operations]]
include-path = "/api/v1/oauth/token"
headers = {{ Authorization = "Basic {basic}" }}

[[operations]]
include-path-regex = "^/api/v1/rules(/dry-run|/[^/]+)?$"
include-method-regex = "^(POST|PUT)$"
warnings = {{ fail-on = false }}
phases = {{ coverage = {{ enabled = false }} }}

[[operations]]
include-path = "/api/v1/rules/dry-run"
generation = {{ mode = "positive" }}
"""


def test_schemathesis_finds_no_server_error_or_nonconformance(target: Target, tmp_path: Path) -> None:
    which, api_port, database_url = target.which, target.port, target.database_url
    tag = uuid.uuid4().hex[:6]
    tenant = f"fz-{which}-{tag}"
    seed.create_tenant(database_url, tenant)
    seed.create_devices(database_url, tenant, [f"{tenant}-{i}" for i in range(3)])
    with psycopg.connect(database_url) as conn:  # the group the generator names first ("0") exists, as do devices
        conn.execute("INSERT INTO device_groups (tenant_id, group_id) VALUES (%s, '0')", (tenant,))
    auth = tenant_token(database_url, tenant)["Authorization"] if which != "platform" else f"Bearer {PLATFORM}"
    sacrificial, _ = seed.create_api_token(database_url, tenant, ["devices:read"], name="revoked by the fuzzer")
    basic = _oauth_client(database_url, tenant)
    (tmp_path / "schemathesis.toml").write_text(_config(auth, tenant, sacrificial, basic, _user(database_url, tenant)))
    # Tenant routes are fuzzed with tenant tokens and the platform's with its token (each refusing the other is
    # tested in test_tenancy.py).
    scope = ["--include-tag", "tenants"] if which == "platform" else ["--exclude-path-regex", r"^/api/v1/tenants"]
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "--config-file", str(tmp_path / "schemathesis.toml"),
            "run", f"http://127.0.0.1:{api_port}/schema/openapi.json",
            *scope,
            "--checks", CHECKS,
            "--seed", str(SEEDS[which]),
            "--workers", "1",
            "--generation-database", "none",
            "--request-timeout", "10",
            "--report", "junit", "--report-dir", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("SCHEMATHESIS")} | {"NO_COLOR": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "Authentication failed" not in result.stdout, result.stdout[-3000:]
    assert "Schema validation mismatch" not in result.stdout, result.stdout[-3000:]
