"""Intake: every message from the broker, acknowledged (PUBACK) only after what it says is committed, or after it
was dead-lettered with its reason. One worker per hash bucket of device ids keeps a device's messages in order;
devices run in parallel; runs of reported state share one transaction."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import psycopg

from devicesvc import commands, decide, presence, shadows
from devicesvc.ports import Twin
from kestrel.runtime.mqtt import Ack
from kestrel.store.shadows import now_ms
from kestrel_core.errors import InvalidInput
from kestrel_core.topics import parse_uplink

log = logging.getLogger("kestrel.devicesvc")
Item = tuple[str, bytes, Any, Ack]


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
                try:
                    if end > index:
                        await self.reported(batch[index:end])
                    else:
                        await self.one(*batch[index])
                except Exception:  # a bug must not end this worker: its devices' messages would wait forever
                    log.exception("unexpected error handling device messages; they stay unacknowledged")
                index = max(end, index + 1)
            self.twin.metrics.handle_seconds.observe(time.perf_counter() - started)

    async def one(self, topic: str, payload: bytes, properties: Any, ack: Ack) -> None:
        try:
            await self.handle(topic, payload, properties)
        except InvalidInput as exc:
            if not await self.twin.events.deadletter(topic, payload, exc):
                return  # not stored anywhere: no PUBACK, the broker redelivers after a reconnect
        except (psycopg.Error, OSError):
            log.exception("could not handle a device message; it stays unacknowledged", extra={"topic": topic})
            return
        self.handled += 1
        ack()

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

    async def reported(self, items: list[Item]) -> None:
        """Reported state of many devices in one transaction (in arrival order per device), then the PUBACKs."""
        self.twin.metrics.messages.labels("reported").inc(len(items))
        refused: list[tuple[str, bytes, Ack, InvalidInput]] = []
        accepted: list[tuple[decide.Report, Item]] = []
        for item in items:
            topic, payload, _properties, ack = item
            try:
                accepted.append((decide.report(topic, payload, now_ms(), self.twin.settings.max_payload_bytes), item))
            except InvalidInput as exc:
                refused.append((topic, payload, ack, exc))
        done: list[Ack] = []
        if accepted:
            try:
                outcome = await shadows.store_reports(self.twin, [r for r, _ in accepted])
            except (psycopg.Error, OSError):
                log.exception("could not store reported state; the messages stay unacknowledged")
                return
            for (_, (topic, payload, _p, ack)), refusal in zip(accepted, outcome, strict=True):
                if refusal is None:
                    done.append(ack)
                else:
                    refused.append((topic, payload, ack, refusal))
        for ack in done:
            ack()
        self.handled += len(done)
        for topic, payload, ack, refusal in refused:
            if await self.twin.events.deadletter(topic, payload, refusal):
                ack()
