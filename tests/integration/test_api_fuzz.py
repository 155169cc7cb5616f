"""The running API fuzzed from its own OpenAPI document (schemathesis CLI, against a real uvicorn server on a
loopback port), once with each of two tenants' tokens: no 5xx, and every answer conforms to the document."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kestrel.db import registry
from kestrel.servers import free_port, http_ok
from tests.conftest import ServiceProcess, tenant_token, wait_until

pytestmark = pytest.mark.integration
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


PLATFORM = "platform-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def api_port(api_database_url_module: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KESTREL_")} | {
        "KESTREL_API_DATABASE_URL": api_database_url_module,
        "KESTREL_API_ADMIN_TOKEN": PLATFORM,
        "KESTREL_API_PORT": str(port),
    }
    root = tmp_path_factory.mktemp("fuzz")
    api = ServiceProcess(name="api", log_path=root / "api.log", argv=[sys.executable, "-m", "api"], env=env)
    api.start()
    assert wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/readyz"), 30), "api did not start"
    yield port
    api.stop()


@pytest.fixture(scope="module")
def api_database_url_module(postgres) -> str:  # type: ignore[no-untyped-def]
    return str(postgres.api_url)


@pytest.mark.parametrize("which", ["tenant-a", "tenant-b", "platform"])
def test_schemathesis_finds_no_server_error_or_nonconformance(
    api_port: int, database_url: str, which: str, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:6]
    tenant = f"fz-{which}-{tag}"
    registry.create_tenant(database_url, tenant)
    registry.create_devices(database_url, tenant, [f"{tenant}-{i}" for i in range(3)])
    auth = tenant_token(database_url, tenant)["Authorization"] if which != "platform" else f"Bearer {PLATFORM}"
    # Tenant routes are fuzzed with tenant tokens and the platform's with its token (each refusing the other is
    # tested in test_tenancy.py). The stateful phase would find the fuzzing token in GET /tokens and revoke it,
    # leaving only 401s: revocation has its own tests too.
    if which == "platform":
        scope = ["--include-tag", "tenants"]
    else:
        scope = ["--exclude-path-regex", r"^/api/v1/(tenants|tokens/\{token_id\})"]
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"), "run",
            f"http://127.0.0.1:{api_port}/schema/openapi.json",
            "--header", f"Authorization: {auth}",
            *scope,
            "--checks", CHECKS,
            "--max-examples", "12",
            "--seed", "7",
            "--request-timeout", "10",
            "--report", "junit", "--report-dir", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=600, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("SCHEMATHESIS")} | {"NO_COLOR": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "Authentication failed" not in result.stdout, result.stdout[-3000:]
