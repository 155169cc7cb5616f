"""Simulated devices: realistic telemetry over real MQTT (``kestrel simulate``).

Each device keeps its own connection and a strictly increasing ``seq``; the fleet records which
publishes the broker acknowledged, so tests and benchmarks can count loss exactly
(reliability.md: lost = acknowledged and not stored; duplicates = rows minus distinct keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from functools import partial

import msgspec

from kestrel.mqttlite import MqttError, MqttPublisher
from kestrel.topics import telemetry_topic


@dataclass
class SimulatedDevice:
    """A sensor with slowly drifting temperature and humidity and a draining battery."""

    device_id: str
    rng: random.Random
    seq: int = 0
    temp: float = 21.0
    humidity: float = 45.0
    battery: float = 3.9

    def reading(self, now_ms: int) -> dict[str, object]:
        self.temp += self.rng.gauss(0, 0.05) + 0.02 * math.sin(now_ms / 600_000)
        self.humidity = min(100.0, max(0.0, self.humidity + self.rng.gauss(0, 0.2)))
        self.battery = max(3.0, self.battery - 0.00001)
        reading = {
            "ts": now_ms,
            "seq": self.seq,
            "metrics": {
                "temp": round(self.temp, 2),
                "humidity": round(self.humidity, 1),
                "battery": round(self.battery, 3),
                "rssi": self.rng.randint(-90, -40),
                "door_open": self.rng.random() < 0.02,
            },
        }
        self.seq += 1
        return reading


@dataclass
class FleetStats:
    sent: int = 0
    acked: int = 0
    failed: int = 0
    reconnects: int = 0
    #: (device, seq) -> wall-clock publish time, for every publish the broker acknowledged.
    acked_keys: dict[tuple[str, int], float] = field(default_factory=dict)


_encoder = msgspec.json.Encoder()


@dataclass
class Fleet:
    """``devices`` connections publishing ``rate`` messages per second in total."""

    host: str
    port: int
    tenant: str
    device_ids: list[str]
    rate: float
    qos: int = 1
    version: int = 5
    seed: int = 7
    record: bool = False
    stats: FleetStats = field(default_factory=FleetStats)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def stop(self) -> None:
        self._stop.set()

    async def run(self, duration: float | None = None, count: int | None = None) -> FleetStats:
        """Publish until ``stop()``, ``duration`` seconds or ``count`` messages per device."""
        rng = random.Random(self.seed)  # noqa: S311 - simulation, not security
        tasks = [
            asyncio.create_task(
                self._device(SimulatedDevice(d, random.Random(rng.random())), count),  # noqa: S311
                name=f"sim-{d}",
            )
            for d in self.device_ids
        ]
        if duration is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), duration)
            self._stop.set()
        await asyncio.gather(*tasks)
        return self.stats

    async def _device(self, device: SimulatedDevice, count: int | None) -> None:
        topic = telemetry_topic(self.tenant, device.device_id).mqtt
        interval = len(self.device_ids) / self.rate if self.rate > 0 else 0.0
        client: MqttPublisher | None = None
        next_at = time.monotonic() + random.random() * interval  # noqa: S311 - spread the fleet's phase
        in_flight: set[asyncio.Future[int]] = set()
        sent = 0
        while not self._stop.is_set() and (count is None or sent < count):
            if client is None or client.closed.is_set():
                client = await self._connect(device.device_id)
                if client is None:
                    continue
            delay = next_at - time.monotonic()
            if delay > 1.0:  # long pauses stay interruptible by stop()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
            elif delay > 0:
                await asyncio.sleep(delay)  # the hot path: no task per message
            if self._stop.is_set():
                break
            next_at = max(next_at + interval, time.monotonic() - 1.0)
            reading = device.reading(int(time.time() * 1000))
            try:
                future = await client.send(topic, _encoder.encode(reading), self.qos)
            except MqttError:
                self.stats.failed += 1
                continue
            self.stats.sent += 1
            sent += 1
            if future is None:
                self.stats.acked += 1
                continue
            in_flight.add(future)
            future.add_done_callback(partial(self._settled, in_flight, device.device_id, reading["seq"], time.time()))
        if in_flight:
            await asyncio.wait(in_flight, timeout=30)
        if client is not None:
            await client.close()

    def _settled(
        self,
        in_flight: set[asyncio.Future[int]],
        device_id: str,
        seq: object,
        sent_at: float,
        future: asyncio.Future[int],
    ) -> None:
        in_flight.discard(future)
        if future.cancelled() or future.exception() is not None or future.result() != 0:
            self.stats.failed += 1
            return
        self.stats.acked += 1
        if self.record:
            self.stats.acked_keys[(device_id, int(seq))] = sent_at  # type: ignore[call-overload]

    async def _connect(self, device_id: str) -> MqttPublisher | None:
        client = MqttPublisher(self.host, self.port, device_id, version=self.version, max_inflight=100)
        try:
            await client.connect()
        except (OSError, MqttError, TimeoutError):
            self.stats.reconnects += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.5)
            return None
        return client


def device_ids(prefix: str, count: int) -> list[str]:
    """``sim-0001``, ``sim-0002``, ... (ids valid under the topic grammar)."""
    return [f"{prefix}-{i:04d}" for i in range(1, count + 1)]
