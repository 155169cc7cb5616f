"""PostgreSQL lookups for authentication decisions (the PKI and registry tables), rows read by name into the
decision's own records."""

from __future__ import annotations

import functools
from typing import Any, Final, TypeVar

from cryptography import x509
from psycopg.rows import class_row
from psycopg_pool import AsyncConnectionPool

from authsvc.decide import Authority, Claim, DeviceRecord, JwtKey, ServicePrincipal
from kestrel.store.pool import retry_read_once
from kestrel.store.rows import fetch_maybe

T = TypeVar("T")
AUTHORITY: Final = (
    "SELECT tenant_id, cert_pem FROM pki_authorities WHERE kind = 'tenant' AND status = 'active' AND subject = %s"
)
CERTIFICATE: Final = "SELECT status FROM pki_certificates WHERE serial = %s AND fingerprint_sha256 = %s"
JWT_KEY: Final = (
    "SELECT tenant_id AS tenant, device_id AS device, alg, public_key_pem, status FROM jwt_keys WHERE kid = %s"
)
CLAIM: Final = (
    "SELECT tenant_id AS tenant, secret_sha256, status, used, max_uses, expires_at, EXISTS (SELECT 1 FROM devices d"
    " WHERE d.device_id = %s AND d.claim_id = c.claim_id AND d.status <> 'decommissioned') AS provisioned"
    " FROM provisioning_claims c WHERE claim_id = %s"
)
SERVICE: Final = "SELECT name, role, secret_sha256, status FROM service_principals WHERE name = %s"
DEVICE: Final = (
    "SELECT d.tenant_id AS tenant, d.status, t.status AS tenant_status FROM devices d"
    " JOIN tenants t ON t.tenant_id = d.tenant_id WHERE d.device_id = %s"
)


@functools.lru_cache(maxsize=1024)
def _parse_certificate(pem: str) -> x509.Certificate:
    """Tenant CA certificates change rarely; parse each PEM once, not on every connect. The row itself
    (and so revocation) is still read per request."""
    return x509.load_pem_x509_certificate(pem.encode())


class PostgresIdentity:
    """``IdentityLookup`` on PostgreSQL."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self.pool = pool

    async def _one(self, kind: type[T], query: str, params: tuple[Any, ...]) -> T | None:
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=class_row(kind))
            row: T | None = await (await cur.execute(query, params)).fetchone()
            return row

    async def _row(self, query: str, params: tuple[Any, ...]) -> dict[str, Any] | None:
        async with self.pool.connection() as conn:
            return await fetch_maybe(conn, query, params)

    @retry_read_once
    async def authority(self, issuer: x509.Name) -> Authority | None:
        row = await self._row(AUTHORITY, (issuer.rfc4514_string(),))
        return None if row is None else Authority(row["tenant_id"], _parse_certificate(row["cert_pem"]))

    @retry_read_once
    async def certificate_status(self, serial: str, fingerprint: str) -> str | None:
        row = await self._row(CERTIFICATE, (serial, fingerprint))
        return None if row is None else str(row["status"])

    @retry_read_once
    async def device(self, device_id: str) -> DeviceRecord | None:
        return await self._one(DeviceRecord, DEVICE, (device_id,))

    @retry_read_once
    async def jwt_key(self, kid: str) -> JwtKey | None:
        return await self._one(JwtKey, JWT_KEY, (kid,))

    @retry_read_once
    async def service_principal(self, name: str) -> ServicePrincipal | None:
        return await self._one(ServicePrincipal, SERVICE, (name,))

    @retry_read_once
    async def claim(self, claim_id: str, device: str) -> Claim | None:
        return await self._one(Claim, CLAIM, (device, claim_id))
