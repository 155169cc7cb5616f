"""After PostgreSQL crashes and comes back, nothing answers from a dead pooled connection (issue 10, defect 3): the
API and authsvc serve the first request after the restart, and while the database is down a device is refused
transiently (the connection closed without a CONNACK) and the API answers 503, never "not authorized" or 500."""

from __future__ import annotations

import asyncio
import signal
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kestrel.devtools.servers import NatsServer, PostgresServer
from kestrel.runtime.mqttclient import CLOSED_WITHOUT_CONNACK, MqttError, MqttPublisher
from tests.conftest import tenant_token
from tests.prodstack import ProdStack, prod_stack

pytestmark = pytest.mark.e2e


@pytest.fixture
def stack(fresh_postgres: PostgresServer, nats_server: NatsServer, tmp_path: Path) -> Iterator[ProdStack]:
    with prod_stack(fresh_postgres, nats_server, tmp_path, services=("authsvc", "api")) as s:
        yield s


async def connect(stack: ProdStack, device: str, context: ssl.SSLContext) -> int | None:
    """None when admitted (then disconnects), else the refusal's reason code."""
    client = MqttPublisher("127.0.0.1", stack.auth.mtls_port, device, tls=context)
    try:
        await client.connect()
    except MqttError as exc:
        return exc.reason_code
    await client.close()
    return None


def test_a_postgres_crash_is_transient_for_devices_and_the_api(stack: ProdStack) -> None:
    tenant, (device,) = stack.tenant(1)
    context = stack.enrol(device)
    api = httpx.Client(
        base_url=f"http://127.0.0.1:{stack.ports['api']}", headers=tenant_token(stack.url, tenant), timeout=15
    )
    for _ in range(5):  # both pools hold connections now
        assert api.get("/api/v1/devices").status_code == 200
        assert asyncio.run(connect(stack, device, context)) is None

    stack.postgres.stop(signal.SIGQUIT)  # immediate shutdown: no checkpoint, as a crash
    assert asyncio.run(connect(stack, device, context)) == CLOSED_WITHOUT_CONNACK
    down = api.get("/api/v1/devices")
    assert down.status_code == 503 and down.headers["retry-after"] == "1", down.text
    assert api.get("/readyz").status_code == 503

    stack.postgres.start()  # returns once it accepts connections
    # The first of everything succeeds: no request draws a connection that died with the old server.
    assert api.get("/readyz").status_code == 200
    first = api.get("/api/v1/devices")
    assert first.status_code == 200, first.text
    assert asyncio.run(connect(stack, device, context)) is None
