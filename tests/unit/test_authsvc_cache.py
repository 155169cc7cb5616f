"""authsvc's lookup cache: used only while revocations can reach it, never caches a miss, expires."""

from __future__ import annotations

import asyncio

from cryptography import x509

from authsvc.decide import Authority, DeviceRecord, JwtKey, ServicePrincipal
from authsvc.revocation import CachedIdentity


class CountingLookup:
    """A hand-written fake of the PostgreSQL lookups that counts calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.devices: dict[str, DeviceRecord] = {"d1": DeviceRecord("t", "active", "active")}

    async def authority(self, issuer: x509.Name) -> Authority | None:
        self.calls += 1
        return None

    async def certificate_status(self, serial: str, fingerprint: str) -> str | None:
        self.calls += 1
        return None

    async def device(self, device_id: str) -> DeviceRecord | None:
        self.calls += 1
        return self.devices.get(device_id)

    async def jwt_key(self, kid: str) -> JwtKey | None:
        self.calls += 1
        return None

    async def service_principal(self, name: str) -> ServicePrincipal | None:
        self.calls += 1
        return None


def test_cache_is_off_until_the_listener_enables_it() -> None:
    inner = CountingLookup()
    cache = CachedIdentity(inner, ttl=60)

    async def scenario() -> None:
        await cache.device("d1")
        await cache.device("d1")
        assert inner.calls == 2  # disabled: every lookup reaches the database
        cache.enabled = True
        await cache.device("d1")
        await cache.device("d1")
        assert inner.calls == 3
        inner.devices["d1"] = DeviceRecord("t", "suspended", "active")
        assert (await cache.device("d1")) == DeviceRecord("t", "active", "active")  # cached until cleared
        cache.clear()
        assert (await cache.device("d1")) == DeviceRecord("t", "suspended", "active")

    asyncio.run(scenario())


def test_misses_are_never_cached_and_entries_expire() -> None:
    inner = CountingLookup()
    cache = CachedIdentity(inner, ttl=0.05)
    cache.enabled = True

    async def scenario() -> None:
        assert await cache.device("new") is None
        inner.devices["new"] = DeviceRecord("t", "active", "active")
        assert await cache.device("new") is not None  # registered a moment ago: admitted at once
        calls = inner.calls
        await cache.device("new")
        assert inner.calls == calls
        await asyncio.sleep(0.1)
        await cache.device("new")
        assert inner.calls == calls + 1

    asyncio.run(scenario())


def test_cache_is_bounded() -> None:
    inner = CountingLookup()
    cache = CachedIdentity(inner, ttl=60, max_entries=10)
    cache.enabled = True
    inner.devices = {f"d{i}": DeviceRecord("t", "active", "active") for i in range(25)}

    async def scenario() -> None:
        for i in range(25):
            await cache.device(f"d{i}")
        assert len(cache._entries) <= 10  # noqa: SLF001 - the bound is the property under test

    asyncio.run(scenario())


class SlowLookup(CountingLookup):
    """A lookup that reads the database, then waits (a slow network) before answering what it read."""

    def __init__(self) -> None:
        super().__init__()
        self.read = asyncio.Event()
        self.release = asyncio.Event()

    async def device(self, device_id: str) -> DeviceRecord | None:
        value = await super().device(device_id)
        self.read.set()
        await self.release.wait()
        return value


def test_a_lookup_in_flight_when_the_cache_is_cleared_is_not_kept() -> None:
    """The read began before a suspension committed and answers after the notification cleared the cache: caching
    it would admit the suspended device for a whole TTL."""
    inner = SlowLookup()
    cache = CachedIdentity(inner, ttl=60)
    cache.enabled = True

    async def scenario() -> None:
        stale = asyncio.create_task(cache.device("d1"))
        await inner.read.wait()
        inner.devices["d1"] = DeviceRecord("t", "suspended", "active")  # committed ...
        cache.clear()  # ... and notified while the first read was still on its way
        inner.release.set()
        assert (await stale) == DeviceRecord("t", "active", "active")  # that caller got what it read
        assert (await cache.device("d1")) == DeviceRecord("t", "suspended", "active")  # nobody else does
        assert (await cache.device("d1")) == DeviceRecord("t", "suspended", "active")
        assert inner.calls == 2  # the fresh answer is cached

    asyncio.run(scenario())
