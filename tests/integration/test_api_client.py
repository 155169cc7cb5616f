"""What an integrator does (issue 11): generate a Python client from the committed OpenAPI document with
openapi-python-client, then drive the running API with it: list devices, read telemetry, send a command. The
client's functions and models carry the contract's names (``list_devices``, ``Device``), not the code's layout."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from kestrel.devtools import seed
from kestrel.devtools.servers import PostgresServer
from kestrel_core.tokens import SCOPES
from tests.conftest import REPO, new_tenant, start_api, tenant_token

pytestmark = pytest.mark.integration
GENERATOR = REPO / ".venv-tools" / "bin" / "openapi-python-client"


@pytest.fixture(scope="module")
def client_package(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    out = tmp_path_factory.mktemp("client")
    done = subprocess.run(
        [str(GENERATOR), "generate", "--path", str(REPO / "api" / "openapi.json"), "--meta", "none"],
        cwd=out, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert (out / "kestrel_api_client").is_dir(), done.stdout + done.stderr
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module("kestrel_api_client")
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m.startswith("kestrel_api_client")]:
            del sys.modules[name]


def test_the_generated_client_speaks_the_contracts_names(client_package: Any) -> None:
    modules = {p.stem for p in Path(client_package.__file__).parent.glob("api/*/*.py")}
    assert {"list_devices", "get_device", "create_command", "get_device_telemetry", "update_shadow"} <= modules
    models = {p.stem for p in Path(client_package.__file__).parent.glob("models/*.py")}
    assert {"device", "device_page", "command", "telemetry"} <= models
    assert not any(m.startswith(("control_", "api_v1_")) for m in modules | models)


def test_the_generated_client_drives_the_running_api(
    client_package: Any, postgres: PostgresServer, database_url: str, tmp_path: Path
) -> None:
    from kestrel_api_client import AuthenticatedClient  # type: ignore[import-not-found]  # noqa: PLC0415
    from kestrel_api_client.api.commands import create_command, get_command  # type: ignore[import-not-found]  # noqa: PLC0415
    from kestrel_api_client.api.devices import list_devices  # type: ignore[import-not-found]  # noqa: PLC0415
    from kestrel_api_client.api.telemetry import get_device_telemetry  # type: ignore[import-not-found]  # noqa: PLC0415
    from kestrel_api_client.models import CommandCreate, DevicePage, Telemetry  # type: ignore[import-not-found]  # noqa: PLC0415

    tenant = new_tenant(database_url, 3, prefix="gc")
    device = tenant.devices[0]
    start = datetime.now(UTC) - timedelta(hours=1)
    with psycopg.connect(database_url) as conn:
        conn.cursor().executemany(
            "INSERT INTO telemetry (tenant_id, device_id, stream, ts, seq, metrics, received_at)"
            " VALUES (%s, %s, '', %s, %s, %s, now())",
            [(tenant.id, device, start + timedelta(minutes=i), i, json.dumps({"temp": 20 + i})) for i in range(5)],
        )
    token = tenant_token(database_url, tenant.id)["Authorization"].removeprefix("Bearer ")
    api, port = start_api(postgres, database_url, tmp_path, "platform-" + uuid.uuid4().hex)
    try:
        with AuthenticatedClient(base_url=f"http://127.0.0.1:{port}", token=token) as client:
            page = list_devices.sync(client=client, limit=2)
            assert isinstance(page, DevicePage)
            assert [d.device_id for d in page.items] == sorted(tenant.devices)[:2] and page.next_cursor

            readings = get_device_telemetry.sync(device, client=client, metric="temp")
            assert isinstance(readings, Telemetry)
            assert [p.value for p in readings.points] == [20, 21, 22, 23, 24]

            command = create_command.sync(device, client=client, body=CommandCreate(name="reboot"))
            assert command.status == "queued" and command.device_id == device
            detail = get_command.sync(command.command_id, client=client)
            assert [e.event for e in detail.events] == ["queued"]

            # The same client sees exactly what the API says to another tenant's token: nothing.
            other = new_tenant(database_url, 1, prefix="gx")
            foreign = seed.create_api_token(database_url, other.id, list(SCOPES))[1]
        with AuthenticatedClient(base_url=f"http://127.0.0.1:{port}", token=foreign) as stranger:
            response = get_device_telemetry.sync_detailed(device, client=stranger, metric="temp")
            assert response.status_code == 404  # another tenant's device does not exist for this token
            mine = list_devices.sync(client=stranger)
            assert [d.device_id for d in mine.items] == other.devices
    finally:
        api.stop()
