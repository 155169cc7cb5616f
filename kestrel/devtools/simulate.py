"""Simulated devices: realistic telemetry over real MQTT (``kestrel simulate``).

Each device keeps its own connection and a strictly increasing ``seq``; the fleet records which
publishes the broker acknowledged, so tests and benchmarks can count loss exactly
(reliability.md: lost = acknowledged and not stored; duplicates = rows minus distinct keys).
"""

from __future__ import annotations

import asyncio
import math
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import msgspec

from kestrel.runtime.mqttclient import CLOSED_WITHOUT_CONNACK, MqttError, MqttPublisher
from kestrel_core.errors import InvalidInput
from kestrel_core.retry import Backoff
from kestrel_core.topics import MQTT_JWT_AUDIENCE, telemetry_topic

#: A simulated device that lost the broker tries again soon, but not in step with the rest of the fleet.
RECONNECT = Backoff(base_s=0.25, cap_s=2.0)


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
        self.temp += (self.rng.random() - 0.5) * 0.1 + 0.02 * math.sin(now_ms / 600_000)
        self.humidity = min(100.0, max(0.0, self.humidity + (self.rng.random() - 0.5) * 0.4))
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
    #: Connects the broker closed without a CONNACK (a transient refusal: retried).
    closed_without_connack: int = 0
    #: PUBACK reason codes seen (0 success, 0x10 no matching subscribers, >= 0x80 refused).
    codes: dict[int, int] = field(default_factory=dict)
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
    version: int = 5
    seed: int = 7
    record: bool = False
    #: device id -> (username, password) for each (re)connect, e.g. a fresh JWT; None: no credentials.
    credentials: Callable[[str], tuple[str, str]] | None = None
    #: device id -> its TLS context (mTLS devices); None: plain TCP.
    tls: Callable[[str], ssl.SSLContext] | None = None
    stats: FleetStats = field(default_factory=FleetStats)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _clients: list[MqttPublisher | None] = field(default_factory=list)
    _reconnecting: set[int] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def stop(self) -> None:
        self._stop.set()

    async def run(self, duration: float | None = None, count: int | None = None) -> FleetStats:
        """Publish until ``stop()``, ``duration`` seconds or ``count`` messages per device.

        One pacer sends every message that is due each tick, round-robin over the devices' connections,
        so the fleet costs no task wake-up per message; a device whose in-flight window is full waits.
        Telemetry is QoS 1 (the ledger of acknowledged messages needs PUBACKs).
        """
        rng = random.Random(self.seed)  # noqa: S311 - simulation, not security
        devices = [SimulatedDevice(d, random.Random(rng.random())) for d in self.device_ids]  # noqa: S311
        topics = [telemetry_topic(self.tenant, d).mqtt for d in self.device_ids]
        self._clients = [None] * len(devices)
        await asyncio.gather(*(self._reconnect(i) for i in range(len(devices))))
        in_flight: set[asyncio.Future[int]] = set()
        per_device = [0] * len(devices)
        total = count * len(devices) if count is not None else None
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + duration if duration is not None else float("inf")
        cursor = scheduled = 0
        while not self._stop.is_set() and loop.time() < end and (total is None or self.stats.sent < total):
            due = int((loop.time() - start) * self.rate) + 1 - scheduled
            due = min(due, max(1, int(self.rate * 0.25)))  # fall behind rather than burst after a stall
            scheduled += max(due, 0)
            now_ms = int(time.time() * 1000)
            misses = 0
            while due > 0 and misses < len(devices):
                i, cursor = cursor, (cursor + 1) % len(devices)
                client = self._clients[i]
                if (count is not None and per_device[i] >= count) or client is None or not client.can_send():
                    if client is not None and client.closed.is_set() and i not in self._reconnecting:
                        self._reconnecting.add(i)
                        task = asyncio.create_task(self._reconnect(i), name=f"sim-reconnect-{i}")
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
                    misses += 1
                    continue
                misses = 0
                reading = devices[i].reading(now_ms)
                future = client.send_nowait(topics[i], _encoder.encode(reading))
                in_flight.add(future)
                future.add_done_callback(
                    partial(self._settled, in_flight, devices[i].device_id, reading["seq"], time.time())
                )
                self.stats.sent += 1
                per_device[i] += 1
                due -= 1
            await asyncio.sleep(0.005)
        self._stop.set()
        if in_flight:
            await asyncio.wait(in_flight, timeout=30)
        for client in self._clients:
            if client is not None:
                await client.close()
        return self.stats

    async def _reconnect(self, index: int) -> None:
        failures = 0
        try:
            while not self._stop.is_set():
                device = self.device_ids[index]
                username, password = self.credentials(device) if self.credentials else (None, None)
                client = MqttPublisher(
                    self.host,
                    self.port,
                    device,
                    version=self.version,
                    max_inflight=100,
                    username=username,
                    password=password,
                    tls=self.tls(device) if self.tls else None,
                )
                try:
                    await client.connect()
                except (OSError, MqttError, TimeoutError) as exc:
                    if isinstance(exc, MqttError) and exc.reason_code == CLOSED_WITHOUT_CONNACK:
                        self.stats.closed_without_connack += 1
                    self.stats.reconnects += 1
                    failures += 1
                    await asyncio.sleep(RECONNECT.delay(failures))
                    continue
                old, self._clients[index] = self._clients[index], client
                if old is not None:
                    await old.close()
                return
        finally:
            self._reconnecting.discard(index)

    def _settled(
        self,
        in_flight: set[asyncio.Future[int]],
        device_id: str,
        seq: object,
        sent_at: float,
        future: asyncio.Future[int],
    ) -> None:
        in_flight.discard(future)
        if future.cancelled() or future.exception() is not None:
            self.stats.failed += 1
            return
        code = future.result()
        self.stats.codes[code] = self.stats.codes.get(code, 0) + 1
        if code >= 0x80:  # below 0x80 is a success to a device, 0x10 "no matching subscribers" included
            self.stats.failed += 1
            return
        self.stats.acked += 1
        if self.record:
            self.stats.acked_keys[(device_id, int(seq))] = sent_at  # type: ignore[call-overload]


def jwt_credentials(key_pem: bytes, kid: str, tenant: str, lifetime_s: int = 3600) -> Callable[[str], tuple[str, str]]:
    """Device JWTs signed with a tenant key (EdDSA or ES256, by key type), as a real fleet's
    provisioning service would mint them; each reconnect gets a fresh token."""
    import jwt  # noqa: PLC0415
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519  # noqa: PLC0415

    key = serialization.load_pem_private_key(key_pem, password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        alg = "EdDSA"
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        alg = "ES256"
    else:
        raise InvalidInput("bad_key", "the JWT signing key must be Ed25519 or EC P-256")

    def mint(device: str) -> tuple[str, str]:
        now = int(time.time())
        claims = {"iss": tenant, "sub": device, "aud": MQTT_JWT_AUDIENCE, "iat": now, "exp": now + lifetime_s}
        return device, jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})

    return mint


def device_ids(prefix: str, count: int) -> list[str]:
    """``sim-0001``, ``sim-0002``, ... (ids valid under the topic grammar)."""
    return [f"{prefix}-{i:04d}" for i in range(1, count + 1)]
