"""Faults on the production path, while telemetry, reported state and commands flow (issue 12, item 1).

Devices connect over mTLS through our Mosquitto plugin; every backend runs as its own principal. One fault per test:
a service killed with SIGKILL and started again (as its supervisor would), NATS killed, the broker killed on its
persistence, PostgreSQL crashed (immediate shutdown). The ledgers (tests/traffic.py) must show lost = 0 and
duplicates = 0 for every flow, every flow must move on after the fault by itself (the positive control), and what the
devices saw is printed. No throughput is demanded: a slow machine only makes the test take longer.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from kestrel.devtools.servers import PostgresServer
from kestrel.runtime.mqttclient import MqttError, MqttPublisher
from kestrel.store import claims
from kestrel.store.session import operator, run_blocking
from kestrel_core.messages.twin import ProvisionGranted
from kestrel_device.client import new_device_key, provision
from tests.conftest import _nats, wait_until
from tests.prodstack import ProdStack, prod_stack
from tests.traffic import traffic

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
SERVICES = ("authsvc", "bridge", "writer", "devicesvc", "provisioner")
DOWN_S = 1.5  # how long a killed process stays down


@pytest.fixture
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProdStack]:
    # PostgreSQL is crashed only in a cluster of the test's own; the others share the session's. NATS is the test's
    # own, fsyncing every write for the sync-always variant (JetStream's default syncs every 2 minutes).
    name = request.node.name
    postgres: PostgresServer = request.getfixturevalue("fresh_postgres" if "postgres" in name else "postgres")
    nats = _nats(tmp_path / "nats", "always" if "sync-always" in name else "default")
    nats.start()
    try:
        with prod_stack(postgres, nats, tmp_path, services=SERVICES) as s:
            yield s
    finally:
        nats.stop()


def restart(stack: ProdStack, name: str) -> None:
    stack.kill(name)
    time.sleep(DOWN_S)
    stack.start(name)


def crash_postgres(stack: ProdStack) -> None:
    stack.postgres.stop(signal.SIGQUIT)  # immediate shutdown: no checkpoint, crash recovery at the next start
    time.sleep(DOWN_S)
    stack.postgres.start()


def kill_nats(stack: ProdStack) -> None:
    stack.nats.stop(signal.SIGKILL)
    time.sleep(DOWN_S)
    stack.nats.start()


def bridge_killed_while_jetstream_is_down(stack: ProdStack) -> None:
    """The bridge PUBACKs only after JetStream's ack: with JetStream down it holds a window of unacknowledged
    messages, which the broker redelivers to its persistent session after it is killed (ADR-0004)."""
    stack.nats.stop(signal.SIGKILL)
    time.sleep(DOWN_S)  # the bridge now holds messages it cannot forward
    stack.kill("bridge")
    stack.nats.start()
    stack.start("bridge")


def provisioner_with_a_request_waiting(stack: ProdStack) -> None:
    """A device asks for its certificate while the provisioner is down: the request waits in the provisioner's
    persistent session and is answered once it is back."""
    tenant, _ = stack.tenant(0, "jit")
    token, _claim = run_blocking(stack.url, lambda c: claims.create(c, operator(), tenant), tenant=tenant)
    device = f"{tenant}-new"
    stack.kill("provisioner")
    outcome: list[object] = []

    def ask() -> None:
        _key, csr = new_device_key(device)
        try:
            outcome.append(
                asyncio.run(provision(tenant, token, device, "127.0.0.1", stack.auth.jwt_port, stack.tls(), csr, 60))
            )
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outcome.append(exc)

    asking = threading.Thread(target=ask, name="jit-device")
    asking.start()
    time.sleep(DOWN_S)
    stack.start("provisioner")
    asking.join(70)
    assert outcome and isinstance(outcome[0], ProvisionGranted), f"JIT provisioning across the outage: {outcome}"


def rolling_restart(stack: ProdStack) -> None:
    """A deploy: SIGTERM to each service in turn; each drains and says so, its replacement carries on. The exit status
    is 0, or death by SIGTERM for authsvc: uvicorn re-raises the signal after its graceful shutdown, so that the
    supervisor sees why it ended (Kubernetes and systemd count that as a clean stop)."""
    for name in SERVICES:
        popen = stack.processes[name].proc
        assert popen is not None
        stack.processes[name].send_signal(signal.SIGTERM)
        code = popen.wait(30)
        clean = (0, -signal.SIGTERM) if name == "authsvc" else (0,)
        assert code in clean and f"{name} stopped" in stack.log(name), f"{name} exited {code}: {stack.log(name)[-600:]}"
        stack.start(name)


FAULTS: dict[str, Callable[[ProdStack], None]] = {
    "bridge": lambda s: restart(s, "bridge"),
    "writer": lambda s: restart(s, "writer"),
    "devicesvc": lambda s: restart(s, "devicesvc"),
    "authsvc": lambda s: restart(s, "authsvc"),
    "provisioner": provisioner_with_a_request_waiting,
    "nats": kill_nats,
    "nats-sync-always": kill_nats,
    "broker": lambda s: s.restart_broker(signal.SIGKILL),
    "postgres": crash_postgres,
    "bridge-while-jetstream-down": bridge_killed_while_jetstream_is_down,
    "rolling-restart": rolling_restart,
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_loses_and_duplicates_nothing_and_the_platform_recovers_by_itself(stack: ProdStack, fault: str) -> None:
    flows = traffic(stack)

    async def scenario() -> None:
        await flows.start()
        try:
            assert await flows.moves_on(30), f"no traffic before the fault: {flows.progress()}"
            await asyncio.to_thread(FAULTS[fault], stack)
            assert await flows.moves_on(90), f"the platform did not recover from the {fault} fault: {flows.progress()}"
        finally:
            await flows.stop()
        try:
            settled = await asyncio.to_thread(wait_until, flows.settled, 90)
            assert settled, f"{[str(x) for x in flows.ledgers()]}; {flows.diagnosis()}"
        finally:
            await flows.close()

    asyncio.run(scenario())
    ledgers = flows.ledgers()
    stats = flows.fleet.stats
    print(f"\n{fault}: " + "; ".join(str(x) for x in ledgers))
    print(
        f"{fault}: devices saw {stats.reconnects} failed connects ({stats.closed_without_connack} transient refusals),"
        f" {stats.failed} unacknowledged readings, {flows.report_failures} failed reports,"
        f" {flows.command_failures} commands refused while the database was down"
    )
    assert [(x.flow, x.lost, x.duplicates) for x in ledgers] == [(x.flow, 0, 0) for x in ledgers]
    if fault == "postgres":  # the positive control that the crash reached the pipeline: the writer had to retry
        assert stack.metric("writer", "kestrel_writer_messages_total", outcome="nak") > 0


def presence(stack: ProdStack, device: str) -> tuple[bool, int] | None:
    with psycopg.connect(stack.url) as conn:
        row = conn.execute("SELECT online, connections FROM device_presence WHERE device_id = %s", (device,)).fetchone()
    return (bool(row[0]), int(row[1])) if row else None


def test_presence_converges_after_a_broker_crash(stack: ProdStack) -> None:
    """A crashed broker sends no disconnected events. Its start marker closes the connections it held: a device that
    does not come back goes offline after its grace period; one that reconnected stays online (the control)."""
    _, (back, gone) = stack.tenant(2, "pr")
    contexts = {d: stack.enrol(d) for d in (back, gone)}

    async def scenario() -> None:
        clients = {d: MqttPublisher("127.0.0.1", stack.auth.mtls_port, d, tls=contexts[d]) for d in (back, gone)}
        for client in clients.values():
            await client.connect(connect_timeout=10)
        both_online = lambda: presence(stack, back) == (True, 1) and presence(stack, gone) == (True, 1)  # noqa: E731
        assert await asyncio.to_thread(wait_until, both_online, 20), (presence(stack, back), presence(stack, gone))
        await asyncio.to_thread(stack.restart_broker, signal.SIGKILL)
        for client in clients.values():
            await client.close()
        again = await admitted(lambda: MqttPublisher("127.0.0.1", stack.auth.mtls_port, back, tls=contexts[back]), 30)
        converged = lambda: presence(stack, back) == (True, 1) and presence(stack, gone) == (False, 0)  # noqa: E731
        assert await asyncio.to_thread(wait_until, converged, 40), (presence(stack, back), presence(stack, gone))
        await again.close()

    asyncio.run(scenario())
    with psycopg.connect(stack.url) as conn:
        reasons = conn.execute("SELECT reason FROM device_connections WHERE device_id = %s", (gone,)).fetchall()
    assert reasons == [("broker_restarted",)]


async def admitted(new_client: Callable[[], MqttPublisher], timeout: float) -> MqttPublisher:
    """Connect, again and again (the gate refuses devices until the backends are back), until admitted."""
    deadline = time.monotonic() + timeout
    while True:
        client = new_client()
        try:
            await client.connect(connect_timeout=5)
        except (MqttError, OSError, TimeoutError):
            assert time.monotonic() < deadline, "the device could not come back"
            await asyncio.sleep(0.3)
        else:
            return client
