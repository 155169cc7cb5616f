"""Intake: every message from the broker, acknowledged (PUBACK) only after what it says is committed, or after it
was dead-lettered with its reason. One worker per hash bucket of device ids keeps a device's messages in order;
devices run in parallel; runs of reported state share one transaction.

A message whose handling failed for a passing reason (the database or NATS unreachable, a connection broken
mid-transaction) is tried again here, with backoff, before the worker takes the next: the broker would redeliver an
unacknowledged message only on a new connection (MQTT 5, 4.4), and this connection stays up, so leaving it would
strand it in the broker's in-flight window until devicesvc reconnected."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

import psycopg

from devicesvc import commands, decide, presence, shadows
from devicesvc.ports import Twin
from kestrel.runtime.mqtt import Ack
from kestrel.store.shadows import now_ms
from kestrel_core import streams
from kestrel_core.errors import InvalidInput
from kestrel_core.retry import Backoff
from kestrel_core.topics import parse_uplink

log = logging.getLogger("kestrel.devicesvc")
Item = tuple[str, bytes, Any, Ack]
#: Between attempts at messages whose handling failed for a passing reason.
RETRY: Final = Backoff(base_s=0.2, cap_s=5.0)
#: Failures that pass: the database restarting or unreachable (a pool timeout is one), a broken connection.
TRANSIENT: Final = (psycopg.OperationalError, psycopg.InterfaceError, OSError)


def _first(properties: Any, name: str) -> Any:
    value = (properties or {}).get(name)
    return value[0] if isinstance(value, list) and value else value


class Intake:
    def __init__(self, twin: Twin) -> None:
        self.twin = twin
        self.queues: list[asyncio.Queue[Item]] = [asyncio.Queue() for _ in range(max(1, twin.settings.workers))]
        self.handled = 0

    def on_message(self, topic: str, payload: bytes, properties: Any, ack: Ack) -> None:
        """gmqtt callback: route to the worker of this device (its messages stay in order)."""
        self.queues[decide.worker_for(topic, len(self.queues))].put_nowait((topic, payload, properties, ack))

    def pending(self) -> int:
        return sum(q.qsize() for q in self.queues)

    async def worker(self, queue: asyncio.Queue[Item]) -> None:
        """Take what is queued (up to ``batch``); runs of reported-state messages share one transaction."""
        while True:
            batch = [await queue.get()]
            while len(batch) < self.twin.settings.batch and not queue.empty():
                batch.append(queue.get_nowait())
            started = time.perf_counter()
            index = 0
            while index < len(batch):
                end = index
                while end < len(batch) and decide.is_report(batch[end][0]):
                    end += 1
                run = batch[index:end] if end > index else batch[index : index + 1]
                await self.until_done(run)
                index = max(end, index + 1)
            self.twin.metrics.handle_seconds.observe(time.perf_counter() - started)

    async def until_done(self, run: list[Item]) -> None:
        """Handle a run of reports (or one other message) until nothing of it is left for a passing reason."""
        failures = 0
        while run:
            try:
                run = await self.reported(run) if decide.is_report(run[0][0]) else await self.one(*run[0])
            except Exception:  # a bug must not end this worker: its devices' messages would wait forever
                log.exception("unexpected error handling device messages; they stay unacknowledged")
                return
            if run:
                failures += 1
                self.twin.metrics.retries.inc()
                await asyncio.sleep(RETRY.delay(failures))

    async def one(self, topic: str, payload: bytes, properties: Any, ack: Ack) -> list[Item]:
        """Handle one message; what is left to try again (itself, when it failed for a passing reason)."""
        try:
            await self.handle(topic, payload, properties)
        except InvalidInput as exc:
            if not await self.twin.events.deadletter(topic, payload, exc):
                return [(topic, payload, properties, ack)]  # not stored anywhere yet: no PUBACK
        except TRANSIENT as exc:
            log.warning("could not handle a device message; trying again", extra={"topic": topic, "error": str(exc)})
            return [(topic, payload, properties, ack)]
        except psycopg.Error:
            log.exception("could not handle a device message; it stays unacknowledged", extra={"topic": topic})
            return []
        self.handled += 1
        ack()
        return []

    async def handle(self, topic: str, payload: bytes, properties: Any) -> None:
        decide.check_size(payload, self.twin.settings.max_payload_bytes)
        metrics = self.twin.metrics
        if topic.startswith("$SYS/brokers/") and topic.endswith("/started"):
            metrics.messages.labels("broker_started").inc()
            await presence.broker_started(self.twin, decide.broker_started(topic, payload))
            return
        if topic.startswith("$SYS/brokers/"):
            metrics.messages.labels("client_event").inc()
            if (change := decide.client_event(topic, payload)) is not None:
                await presence.client_event(self.twin, change)
            return
        uplink = parse_uplink(topic)
        metrics.messages.labels(uplink.kind).inc()
        if uplink.kind == "cmd-res":
            response = decide.command_response(uplink, _first(properties, "correlation_data"), payload)
            await commands.record_response(self.twin, uplink, response)
        elif uplink.kind == "status" and (value := decide.status(payload)) is not None:
            await presence.device_status(self.twin, uplink, value)

    def _traced(self, report: decide.Report, properties: Any, started_ns: int) -> None:
        """The span of a report whose device sent a trace context (ADR-0028): from the run's start to its commit.
        Reports start no trace of their own."""
        if self.twin.tracing is None:
            return
        context = streams.trace_headers(properties).get(streams.HDR_TRACEPARENT)
        attributes = {"kestrel.tenant": report.tenant, "kestrel.device": report.device, "kestrel.shadow": report.name}
        if (span := self.twin.tracing.start("kestrel.devicesvc report", context, attributes, started_ns)) is not None:
            span.end()

    async def reported(self, items: list[Item]) -> list[Item]:
        """Reported state of many devices in one transaction (in arrival order per device), then the PUBACKs; what is
        left to try again: all of them when the transaction failed for a passing reason (nothing was stored), the
        refused ones whose dead-lettering failed (a refusal stores nothing: trying it again is harmless)."""
        self.twin.metrics.messages.labels("reported").inc(len(items))
        started_ns = time.time_ns()
        refused: list[tuple[Item, InvalidInput]] = []
        accepted: list[tuple[decide.Report, Item]] = []
        for item in items:
            topic, payload, _properties, ack = item
            try:
                accepted.append((decide.report(topic, payload, now_ms(), self.twin.settings.max_payload_bytes), item))
            except InvalidInput as exc:
                refused.append((item, exc))
        done: list[Ack] = []
        if accepted:
            try:
                outcome = await shadows.store_reports(self.twin, [r for r, _ in accepted])
            except TRANSIENT as exc:
                log.warning("could not store reported state; trying again", extra={"error": str(exc)})
                return items
            except psycopg.Error:
                log.exception("could not store reported state; the messages stay unacknowledged")
                return []
            for (report, item), refusal in zip(accepted, outcome, strict=True):
                if refusal is None:
                    done.append(item[3])
                    self._traced(report, item[2], started_ns)
                else:
                    refused.append((item, refusal))
        for ack in done:
            ack()
        self.handled += len(done)
        left: list[Item] = []
        for item, refusal in refused:
            if await self.twin.events.deadletter(item[0], item[1], refusal):
                item[3]()
            else:
                left.append(item)
        return left
