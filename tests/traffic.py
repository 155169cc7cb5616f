"""Production traffic with ledgers, for fault tests on the production path (reliability.md, issue 12).

Three flows run side by side through the secured broker: telemetry from an mTLS fleet (the simulator), reported state
from devices (one with a certificate, one with a JWT) that count their reports, and commands queued through the store (the API's write path) for SDK
devices that count their executions. Each keeps a ledger of what the platform acknowledged, to compare with what it
stored once the fault is over:
- telemetry: a reading whose PUBACK was below 0x80 must be stored exactly once (ts+seq);
- reported state: a report acknowledged by the broker must be applied exactly once (one history row per report);
- commands: a command the store accepted must end ``succeeded``, run once on its device, with one result.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import gmqtt
import msgspec
import psycopg

from kestrel.devtools.simulate import Fleet
from kestrel.runtime.mqttclient import MqttError, MqttPublisher
from kestrel.store import commands
from kestrel.store.session import run_blocking
from kestrel_core.messages.twin import ReportedState
from kestrel_core.topics import reported_topic
from kestrel_device.client import DeviceClient
from tests.prodstack import ProdStack


@dataclass
class Ledger:
    """One flow's outcome: acknowledged, stored, lost (acknowledged, not stored), duplicates (stored twice)."""

    flow: str
    acked: int
    stored: int
    lost: int
    duplicates: int

    def __str__(self) -> str:
        return f"{self.flow}: acked={self.acked} stored={self.stored} lost={self.lost} duplicates={self.duplicates}"


@dataclass
class Traffic:
    stack: ProdStack
    tenant: str
    fleet: Fleet
    reporters: list[str]
    commanded: list[str]
    reports_acked: set[tuple[str, int]] = field(default_factory=set)
    report_failures: int = 0
    commands_created: dict[str, str] = field(default_factory=dict)  # command id -> its key
    command_failures: int = 0
    reconnects: int = 0  # failed reconnects of the command-running devices
    executions: Counter[str] = field(default_factory=Counter)  # key -> runs on the device
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _clients: list[DeviceClient] = field(default_factory=list)
    _agents: list[asyncio.Task[None]] = field(default_factory=list)
    _closing: asyncio.Event = field(default_factory=asyncio.Event)

    # ------------------------------------------------------------------------------------------------ running

    async def start(self) -> None:
        for device in self.commanded:
            client = DeviceClient(
                self.tenant, device, "127.0.0.1", self.stack.auth.mtls_port, ssl=self.stack.enrol(device)
            )

            async def count(params: dict[str, Any]) -> dict[str, Any]:
                self.executions[str(params["key"])] += 1
                return {"counted": params["key"]}

            client.on_command("count", count)
            await client.connect(wait_s=30)
            self._clients.append(client)
            self._agents.append(asyncio.create_task(self._keep_connected(client), name=f"agent-{device}"))
        self._tasks = [asyncio.create_task(self.fleet.run(), name="telemetry")]
        self._tasks += [
            asyncio.create_task(self._report(d, i), name=f"report-{d}") for i, d in enumerate(self.reporters)
        ]
        self._tasks.append(asyncio.create_task(self._command(), name="commands"))

    def progress(self) -> tuple[int, int, int]:
        """(telemetry acked, reports acked, commands created): each must move again after a fault."""
        return self.fleet.stats.acked, len(self.reports_acked), len(self.commands_created)

    async def moves_on(self, timeout: float) -> bool:
        """Every flow makes progress from now on: the positive control that the platform recovered by itself."""
        start = self.progress()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for task in (*self._tasks, *self._agents):  # a flow that died of a bug must say so, not look stalled
                if task.done() and task.exception() is not None:
                    raise AssertionError(f"flow {task.get_name()} failed") from task.exception()
            now = self.progress()
            if all(n >= s + 20 for n, s in zip(now[:2], start[:2], strict=True)) and now[2] >= start[2] + 3:
                return True
            await asyncio.sleep(0.2)
        return False

    async def stop(self) -> None:
        self._stop.set()
        self.fleet.stop()
        await asyncio.gather(*self._tasks)

    async def close(self) -> None:
        self._closing.set()
        await asyncio.gather(*self._agents)
        for client in self._clients:
            await client.disconnect()

    async def _keep_connected(self, client: DeviceClient) -> None:
        """What ``kestrel-agent`` does: connect the same client again (it remembers the commands it ran). Runs until
        ``close()``: the commands queued before ``stop()`` still have to reach it."""
        while not self._closing.is_set():
            if client.client is None or not client.client.is_connected:
                try:
                    await client.connect(wait_s=5)
                except (gmqtt.MQTTConnectError, OSError, TimeoutError):
                    self.reconnects += 1
            await asyncio.sleep(0.3)

    async def _report(self, device: str, index: int) -> None:
        """Every other reporter authenticates with a JWT on the TLS+JWT listener, the others with their certificate."""
        if index % 2:
            _kid, token = self.stack.jwt(self.tenant, device)
            port, context, username, password = self.stack.auth.jwt_port, self.stack.tls(), device, token
        else:
            port, context, username, password = self.stack.auth.mtls_port, self.stack.enrol(device), None, None
        topic = reported_topic(self.tenant, device)
        n = 0
        client: MqttPublisher | None = None
        while not self._stop.is_set():
            try:
                if client is None or client.closed.is_set():
                    client = MqttPublisher("127.0.0.1", port, device, tls=context, username=username, password=password)
                    await client.connect(connect_timeout=5)
                n += 1
                body = ReportedState(state={"n": n}, ts=time.time_ns() // 1_000_000)
                if await client.publish(topic, msgspec.json.encode(body)) < 0x80:
                    self.reports_acked.add((device, n))
            except (MqttError, OSError, TimeoutError):
                self.report_failures += 1
                client = None
                await asyncio.sleep(0.3)
                continue
            await asyncio.sleep(0.05)
        if client is not None:
            await client.close()

    async def _command(self) -> None:
        i = 0
        while not self._stop.is_set():
            device = self.commanded[i % len(self.commanded)]
            key = f"k{i}-{uuid.uuid4().hex[:6]}"
            i += 1
            try:
                command_id = await asyncio.to_thread(self._create_command, device, key)
            except (psycopg.OperationalError, OSError):
                self.command_failures += 1  # not accepted: not in the ledger (the API would have answered 503)
            else:
                self.commands_created[command_id] = key
            await asyncio.sleep(0.25)

    def _create_command(self, device: str, key: str) -> str:
        async def work(conn: Any) -> str:
            command = await commands.insert_command(
                conn, self.tenant, device, "count", {"key": key}, timeout_s=120,
                expires_at=datetime.now(UTC) + timedelta(minutes=10), max_attempts=10, actor="test:faults",
            )  # fmt: skip
            return command.command_id

        return run_blocking(self.stack.url, work, tenant=self.tenant)

    # ------------------------------------------------------------------------------------------------ ledgers

    def telemetry_ledger(self) -> Ledger:
        acked = set(self.fleet.stats.acked_keys)
        rows = self.stack.stored(self.tenant)
        keys = set(rows)
        return Ledger("telemetry", len(acked), len(rows), len(acked - keys), len(rows) - len(keys))

    def report_ledger(self) -> Ledger:
        with psycopg.connect(self.stack.url) as conn:
            rows = conn.execute(
                "SELECT device_id, (patch->>'n')::int FROM shadow_history WHERE tenant_id = %s AND side = 'reported'"
                " AND patch ? 'n'",
                (self.tenant,),
            ).fetchall()
        applied = Counter((d, n) for d, n in rows)
        lost = len([k for k in self.reports_acked if k not in applied])
        return Ledger("reported state", len(self.reports_acked), len(rows), lost, sum(c - 1 for c in applied.values()))

    def command_ledger(self) -> Ledger:
        ids = list(self.commands_created)
        with psycopg.connect(self.stack.url) as conn:
            done = dict(
                conn.execute(
                    "SELECT command_id, count(*) FROM command_events WHERE command_id = ANY(%s)"
                    " AND event = 'succeeded' GROUP BY 1",
                    (ids,),
                ).fetchall()
            )
        ran = [self.executions[self.commands_created[c]] for c in ids]
        lost = len([c for c in ids if c not in done]) + ran.count(0)
        duplicates = sum(n - 1 for n in done.values()) + sum(r - 1 for r in ran if r > 1)
        return Ledger("commands", len(ids), len(done), lost, duplicates)

    def diagnosis(self) -> str:
        """Where unfinished commands stand, and whether the command-running devices are connected."""
        with psycopg.connect(self.stack.url) as conn:
            rows = conn.execute(
                "SELECT command_id, status, attempts FROM commands WHERE command_id = ANY(%s)",
                (list(self.commands_created),),
            ).fetchall()
        states = sorted(Counter((status, attempts) for _, status, attempts in rows).items())
        unfinished = [(c, s, a, self.executions[self.commands_created[c]]) for c, s, a in rows
                      if s not in commands.TERMINAL]  # fmt: skip
        online = {c.device: bool(c.client and c.client.is_connected) for c in self._clients}
        return (
            f"commands ((status, attempts), n): {states}; unfinished (id, status, attempts, runs on the device):"
            f" {unfinished}; devices connected: {online}; reconnects: {self.reconnects}"
        )

    def ledgers(self) -> list[Ledger]:
        return [self.telemetry_ledger(), self.report_ledger(), self.command_ledger()]

    def settled(self) -> bool:
        """Everything acknowledged had its chance: stored, applied, or finished."""
        return all(ledger.lost == 0 for ledger in self.ledgers())


def traffic(stack: ProdStack, rate: float = 200.0) -> Traffic:
    """A tenant of 12 devices: 8 telemetry devices at ``rate`` readings per second in all, 2 reporters, 2 SDK devices
    running commands."""
    tenant, devices = stack.tenant(12, "f")
    fleet_devices, reporters, commanded = devices[:8], devices[8:10], devices[10:]
    contexts = {d: stack.enrol(d) for d in fleet_devices}
    fleet = Fleet("127.0.0.1", stack.auth.mtls_port, tenant, fleet_devices, rate, record=True, tls=contexts.__getitem__)
    return Traffic(stack, tenant, fleet, reporters, commanded)
