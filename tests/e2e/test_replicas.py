"""Two of everything, as the Helm chart runs them (issue 12, item 2): two authsvc behind a load balancer (a Kubernetes
Service), two bridges and two devicesvc on shared subscriptions, two writers on the durable consumer, two provisioners.
Both replicas of each take work; no command is dispatched twice, no report applied twice, nobody's presence flaps.
Then one replica of each is killed: the survivors carry on (new connections are decided, commands dispatched, traffic
flows), and once the supervisor has started the dead ones again under the same identity, nothing is lost. That last
part is MQTT's shared-subscription semantics (Mosquitto 2.0, and EMQX by default): a persistent session that went
offline keeps its share of the group's messages until it returns (ADR-0016).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import psycopg
import pytest

from kestrel.devtools import seed
from kestrel.devtools.servers import PostgresServer
from kestrel.runtime.mqttclient import MqttPublisher
from tests.conftest import _nats, wait_until
from tests.prodstack import ProdStack, prod_stack
from tests.traffic import traffic

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
SERVICES = ("authsvc", "bridge", "writer", "devicesvc", "provisioner")
#: What proves each replica worked: the metric it counts its work in (authsvc: the balancer's count).
WORK = {
    "bridge": "kestrel_bridge_messages_total",
    "writer": "kestrel_writer_messages_total",
    "devicesvc": "kestrel_devicesvc_messages_total",
}


@pytest.fixture
def stack(postgres: PostgresServer, tmp_path: Path) -> Iterator[ProdStack]:
    nats_server = _nats(tmp_path / "nats")
    nats_server.start()
    try:
        with prod_stack(postgres, nats_server, tmp_path, services=SERVICES, replicas=2) as s:
            yield s
    finally:
        nats_server.stop()


def initial_sends(stack: ProdStack, command_ids: list[str]) -> dict[str, int]:
    """'sent' events per command: two would mean two replicas dispatched the same queued command."""
    with psycopg.connect(stack.url) as conn:
        rows = conn.execute(
            "SELECT command_id, count(*) FROM command_events WHERE command_id = ANY(%s) AND event = 'sent' GROUP BY 1",
            (command_ids,),
        ).fetchall()
    return dict(rows)


def test_two_replicas_of_everything_share_the_work_and_survive_the_death_of_one(stack: ProdStack) -> None:
    flows = traffic(stack)
    presence: list[dict[str, Any]] = []
    restarted = [0.0, 0.0]
    while_running: list[dict[str, Any]] = []

    async def scenario() -> None:
        nc = await nats.connect(stack.nats.url)

        async def record(message: Any) -> None:
            presence.append(json.loads(message.data))

        await nc.subscribe(f"v1.{flows.tenant}.d.*.presence", cb=record)
        await flows.start()
        try:
            assert await flows.moves_on(30), f"no traffic: {flows.progress()}"
            both = await asyncio.to_thread(
                wait_until, lambda: all(stack.metric(k, WORK[k.split("-")[0]]) > 0 for k in _keys()), 30
            )
            assert both, {k: stack.metric(k, WORK[k.split("-")[0]]) for k in _keys()}
            # The broker keeps one HTTP connection to authsvc: kill the replica that holds it, so the next decision
            # must go to the other.
            ports = {stack._port(k): k for k in ("authsvc", "authsvc-2")}  # noqa: SLF001 - the stack's own ports
            busy = ports[max(stack.balancer_served().items(), key=lambda item: item[1])[0]]
            dead = ("bridge-2", "writer-2", "devicesvc-2", busy, "provisioner-2")
            for key in dead:
                await asyncio.to_thread(stack.kill, key)
            assert await flows.moves_on(60), f"the survivors did not carry on: {flows.progress()}"
            # A device connecting now is decided by the surviving authsvc (the balancer skips the dead one).
            newcomer = f"{flows.tenant}-late"
            await asyncio.to_thread(seed.create_devices, stack.url, flows.tenant, [newcomer])
            late = MqttPublisher("127.0.0.1", stack.auth.mtls_port, newcomer, tls=stack.enrol(newcomer))
            await late.connect()
            await late.close()
            for key in dead:  # what the StatefulSet does
                await asyncio.to_thread(stack.start, key)
            restarted[0] = time.monotonic()
            assert await flows.moves_on(60), f"no traffic after the restarts: {flows.progress()}"
            while_running.extend(presence)  # the devices leave when the traffic stops: that is not flapping
        finally:
            await flows.stop()
        try:
            settled = await asyncio.to_thread(wait_until, flows.settled, 90)
            restarted[1] = time.monotonic()
            assert settled, f"{[str(x) for x in flows.ledgers()]}; {flows.diagnosis()}"
        finally:
            await flows.close()
            await nc.close()

    asyncio.run(scenario())
    ledgers = flows.ledgers()
    print("\ntwo replicas, one of each killed: " + "; ".join(str(x) for x in ledgers))
    assert [(x.flow, x.lost, x.duplicates) for x in ledgers] == [(x.flow, 0, 0) for x in ledgers]
    sends = initial_sends(stack, list(flows.commands_created))
    assert set(sends.values()) == {1}, f"commands dispatched twice: {[c for c, n in sends.items() if n > 1]}"
    served = stack.balancer_served()
    assert all(n > 0 for n in served.values()), f"the surviving authsvc never took over: {served}"
    # Both devicesvc replicas saw every connection event; the one that died must not have made anybody flap (the
    # newcomer left on purpose: its offline is the only one expected).
    offline = [e for e in while_running if e["online"] is False and not e["device"].endswith("-late")]
    assert not offline, offline
    print(f"authsvc connections per replica port: {served}; presence events: {len(while_running)}, none offline;")
    print(f"everything stored {restarted[1] - restarted[0]:.1f} s after the dead replicas were started again")


def _keys() -> list[str]:
    return [f"{name}{suffix}" for name in WORK for suffix in ("", "-2")]
