"""No command, device or tenant stalls command delivery for the others (issue 10, defect 1; reliability promise 5).

The production path: devicesvc as its principal, devices on the SDK over mTLS through the plugin. A poison command
(its packet above the broker's limit: once it got devicesvc disconnected, again and again, and nothing else was
delivered) and a backlog of one tenant run beside healthy traffic of another tenant.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import pytest_asyncio
from psycopg.types.json import Jsonb

from kestrel.devtools.servers import NatsServer, PostgresServer
from kestrel_device.client import DeviceClient
from tests.conftest import tenant_token
from tests.prodstack import ProdStack, prod_stack

pytestmark = pytest.mark.e2e
BACKLOG = 2000


@pytest.fixture(scope="module")
def stack(
    postgres: PostgresServer, nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProdStack]:
    root: Path = tmp_path_factory.mktemp("commands")
    with prod_stack(postgres, nats_server, root, services=("authsvc", "devicesvc", "api")) as s:
        yield s


@pytest_asyncio.fixture
async def online(stack: ProdStack) -> AsyncIterator[Any]:
    clients: list[DeviceClient] = []

    async def start(tenant: str, device: str) -> DeviceClient:
        client = DeviceClient(tenant, device, "127.0.0.1", stack.auth.mtls_port, ssl=stack.enrol(device))

        async def ping(params: dict[str, Any]) -> dict[str, Any]:
            return {"pong": True}

        client.on_command("ping", ping)
        await client.connect()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.disconnect()


def insert_commands(stack: ProdStack, tenant: str, device: str, params: dict[str, Any], count: int) -> list[str]:
    """Commands written straight into the table, as an older version or an operator's SQL could have: the API's
    limits do not stand between them and devicesvc."""
    ids = ["c" + uuid.uuid4().hex[:24] for _ in range(count)]
    with psycopg.connect(stack.url) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO commands (command_id, tenant_id, device_id, name, params, timeout_s, expires_at,"
            " max_attempts, created_by) VALUES (%s, %s, %s, 'ping', %s, 60, now() + interval '1 hour', 3, 'sql')",
            [(i, tenant, device, Jsonb(params)) for i in ids],
        )
        conn.execute("SELECT pg_notify('kestrel_twin', 'commands:' || %s)", (device,))
    return ids


def status(stack: ProdStack, ids: list[str]) -> dict[str, int]:
    with psycopg.connect(stack.url) as conn:
        rows = conn.execute(
            "SELECT status, count(*) FROM commands WHERE command_id = ANY(%s) GROUP BY 1", (ids,)
        ).fetchall()
    return dict(rows)


async def until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)


@pytest.mark.asyncio
async def test_a_poison_command_fails_alone_and_everyone_else_is_served(stack: ProdStack, online: Any) -> None:
    tenant_a, (a0,) = stack.tenant(1, "pa")
    tenant_b, b_devices = stack.tenant(3, "pb")
    await online(tenant_a, a0)
    for device in b_devices:
        await online(tenant_b, device)
    api_b = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{stack.ports['api']}/api/v1", headers=tenant_token(stack.url, tenant_b)
    )
    api_a = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{stack.ports['api']}/api/v1", headers=tenant_token(stack.url, tenant_a)
    )

    # The API refuses the oversized command outright (the first half of the fix).
    huge = await api_a.post(f"/devices/{a0}/commands", json={"name": "ping", "params": {"blob": "x" * 2_000_000}})
    assert huge.status_code == 413, huge.text
    # One that got into the table anyway is failed by devicesvc with its reason, never published.
    (poison,) = insert_commands(stack, tenant_a, a0, {"blob": "x" * 2_000_000}, 1)
    healthy = []
    for i in range(30):
        answer = await api_b.post(f"/devices/{b_devices[i % 3]}/commands", json={"name": "ping"})
        assert answer.status_code == 201, answer.text
        healthy.append(answer.json()["command_id"])
    after = (await api_a.post(f"/devices/{a0}/commands", json={"name": "ping"})).json()["command_id"]

    await until(lambda: status(stack, healthy) == {"succeeded": 30}, 60, "tenant B's commands did not all succeed")
    await until(lambda: status(stack, [after]) == {"succeeded": 1}, 30, "A's next command did not succeed")
    detail = (await api_a.get(f"/commands/{poison}")).json()
    assert detail["command"]["status"] == "failed"
    assert "the broker carries at most 1048576" in detail["command"]["error"]
    assert stack.log("devicesvc").count("devicesvc connected") == 1, "devicesvc was disconnected"
    await api_a.aclose()
    await api_b.aclose()


@pytest.mark.asyncio
async def test_one_tenants_backlog_does_not_delay_another_tenant(stack: ProdStack, online: Any) -> None:
    tenant_a, (a0,) = stack.tenant(1, "qa")
    tenant_b, b_devices = stack.tenant(3, "qb")
    await online(tenant_a, a0)
    for device in b_devices:
        await online(tenant_b, device)
    backlog = insert_commands(stack, tenant_a, a0, {}, BACKLOG)  # queued first: oldest of all
    api_b = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{stack.ports['api']}/api/v1", headers=tenant_token(stack.url, tenant_b)
    )
    healthy = [
        (await api_b.post(f"/devices/{b_devices[i % 3]}/commands", json={"name": "ping"})).json()["command_id"]
        for i in range(30)
    ]
    await until(lambda: status(stack, healthy) == {"succeeded": 30}, 60, "tenant B's commands did not all succeed")
    with psycopg.connect(stack.url) as conn:
        (ahead,) = conn.execute(
            "SELECT count(*) FROM commands WHERE command_id = ANY(%s) AND sent_at <= (SELECT max(sent_at) FROM commands"
            " WHERE command_id = ANY(%s))",
            (backlog, healthy),
        ).fetchone()  # type: ignore[misc]
    # B's commands went out within A's first rounds (10 of one device per round), not after A's 2,000.
    assert ahead < BACKLOG // 4, f"{ahead} of A's backlog were sent before B's last command"
    await api_b.aclose()
