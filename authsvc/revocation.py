"""Revocation reaches live sessions: a short lookup cache that identity notifications invalidate, and the kickers
that disconnect affected clients (ADR-0010; what to kick comes from the journal, ``authsvc.journal``).

The cache is used only while the notification connection is up, so a missed notification can never keep a revoked
credential cached; a lookup that was in flight when the cache was cleared is not kept either.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from cryptography import x509

from authsvc.decide import CONTROL_TOPIC, Authority, Claim, DeviceRecord, IdentityLookup, JwtKey, ServicePrincipal
from kestrel.runtime.mqttclient import MqttError, MqttPublisher
from kestrel_core.retry import Backoff

log = logging.getLogger("kestrel.authsvc")
T = TypeVar("T")
KICK_BATCH = 500
KICK_RETRY = Backoff(base_s=0.5, cap_s=2.0)


class CachedIdentity:
    """Positive lookups kept for ``ttl`` seconds; misses are never cached (a device registered a moment
    ago must get in). Disabled until the notification listener is connected."""

    def __init__(self, inner: IdentityLookup, ttl: float = 30.0, max_entries: int = 100_000) -> None:
        self.inner = inner
        self.ttl = ttl
        self.max_entries = max_entries
        self.enabled = False
        self._entries: dict[tuple[str, str], tuple[float, object]] = {}
        self._generation = 0

    def clear(self) -> None:
        self._entries.clear()
        self._generation += 1

    async def _get(self, kind: str, key: str, fetch: Callable[[], Awaitable[T | None]]) -> T | None:
        if self.enabled:
            hit = self._entries.get((kind, key))
            if hit is not None and hit[0] > time.monotonic():
                return hit[1]  # type: ignore[return-value]
        generation = self._generation
        value = await fetch()
        if value is not None and self.enabled and generation == self._generation:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[(kind, key)] = (time.monotonic() + self.ttl, value)
        return value

    async def authority(self, issuer: x509.Name) -> Authority | None:
        return await self._get("authority", issuer.rfc4514_string(), lambda: self.inner.authority(issuer))

    async def certificate_status(self, serial: str, fingerprint: str) -> str | None:
        return await self._get(
            "certificate", f"{serial}/{fingerprint}", lambda: self.inner.certificate_status(serial, fingerprint)
        )

    async def device(self, device_id: str) -> DeviceRecord | None:
        return await self._get("device", device_id, lambda: self.inner.device(device_id))

    async def jwt_key(self, kid: str) -> JwtKey | None:
        return await self._get("jwt_key", kid, lambda: self.inner.jwt_key(kid))

    async def claim(self, claim_id: str, device: str) -> Claim | None:
        return await self.inner.claim(claim_id, device)  # never cached: its use count changes with every device

    async def service_principal(self, name: str) -> ServicePrincipal | None:
        return await self._get("service", name, lambda: self.inner.service_principal(name))


class MosquittoKicker:
    """Disconnects clients on Mosquitto through the plugin's ``$CONTROL/kestrel/v1`` topic, as a
    ``control`` principal. Kicked devices reconnect only if authsvc admits them again."""

    def __init__(self, host: str, port: int, name: str, secret: str, instance: str) -> None:
        self._client_args: dict[str, Any] = {
            "host": host,
            "port": port,
            "client_id": f"svc:{name}:{instance}",
            "username": name,
            "password": secret,
        }
        self._client: MqttPublisher | None = None
        self._lock = asyncio.Lock()

    async def _connected(self) -> MqttPublisher:
        if self._client is None or self._client.closed.is_set():
            client = MqttPublisher(**self._client_args)
            await client.connect(connect_timeout=5)
            self._client = client
        return self._client

    async def kick(self, clientids: list[str], usernames: list[str]) -> None:
        commands = [{"command": "kickClient", "clientid": c} for c in clientids]
        commands += [{"command": "kickUsername", "username": u} for u in usernames]
        async with self._lock:
            for start in range(0, len(commands), KICK_BATCH):
                payload = json.dumps({"commands": commands[start : start + KICK_BATCH]}).encode()
                for attempt in range(3):
                    try:
                        code = await (await self._connected()).publish(CONTROL_TOPIC, payload)
                    except (MqttError, OSError, TimeoutError) as exc:
                        log.warning("kick failed; retrying", extra={"attempt": attempt, "error": str(exc)})
                        self._client = None
                        await asyncio.sleep(KICK_RETRY.delay(attempt + 1))
                        continue
                    if code >= 0x80:
                        raise MqttError(f"the broker refused the kick (reason code {code:#x})", code)
                    break

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


class EmqxKicker:
    """Disconnects clients on an EMQX 5.8 cluster through its REST API (``DELETE /api/v5/clients/{id}``),
    with an API key (basic auth; OSS keys come from ``api_key.bootstrap_file``)."""

    def __init__(self, api_url: str, key: str, secret: str) -> None:
        self._http = httpx.AsyncClient(base_url=api_url.rstrip("/"), auth=(key, secret), timeout=5.0)

    async def _delete(self, clientid: str) -> None:
        response = await self._http.delete(f"/api/v5/clients/{quote(clientid, safe='')}")
        if response.status_code not in (204, 404):  # 404: not connected (any more)
            raise OSError(f"EMQX refused the kick of {clientid[:64]}: HTTP {response.status_code}")

    async def kick(self, clientids: list[str], usernames: list[str]) -> None:
        try:
            for clientid in clientids:
                await self._delete(clientid)
            for username in usernames:
                listed = await self._http.get("/api/v5/clients", params={"username": username, "limit": 10000})
                listed.raise_for_status()
                for client in listed.json().get("data", []):
                    await self._delete(str(client["clientid"]))
        except httpx.HTTPError as exc:
            raise OSError(f"EMQX REST API unreachable: {type(exc).__name__}") from exc

    async def close(self) -> None:
        await self._http.aclose()
