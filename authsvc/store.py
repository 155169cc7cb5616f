"""PostgreSQL lookups for authentication decisions (the PKI and registry tables)."""

from __future__ import annotations

import functools
from typing import Any, Final

from cryptography import x509
from psycopg_pool import AsyncConnectionPool

from authsvc.decide import Authority, Claim, DeviceRecord, JwtKey, ServicePrincipal
from kestrel.store.pool import retry_read_once

AUTHORITY: Final = (
    "SELECT tenant_id, cert_pem FROM pki_authorities WHERE kind = 'tenant' AND status = 'active' AND subject = %s"
)
CERTIFICATE: Final = "SELECT status FROM pki_certificates WHERE serial = %s AND fingerprint_sha256 = %s"
JWT_KEY: Final = "SELECT tenant_id, device_id, alg, public_key_pem, status FROM jwt_keys WHERE kid = %s"
CLAIM: Final = (
    "SELECT tenant_id, secret_sha256, status, used, max_uses, expires_at FROM provisioning_claims WHERE claim_id = %s"
)
SERVICE: Final = "SELECT name, role, secret_sha256, status FROM service_principals WHERE name = %s"
DEVICE: Final = (
    "SELECT d.tenant_id, d.status, t.status FROM devices d JOIN tenants t ON t.tenant_id = d.tenant_id"
    " WHERE d.device_id = %s"
)


@functools.lru_cache(maxsize=1024)
def _parse_certificate(pem: str) -> x509.Certificate:
    """Tenant CA certificates change rarely; parse each PEM once, not on every connect. The row itself
    (and so revocation) is still read per request."""
    return x509.load_pem_x509_certificate(pem.encode())


class PostgresIdentity:
    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self.pool = pool

    @retry_read_once
    async def authority(self, issuer: x509.Name) -> Authority | None:
        async with self.pool.connection() as conn:
            row = await (await conn.execute(AUTHORITY, (issuer.rfc4514_string(),))).fetchone()
        if row is None:
            return None
        return Authority(row[0], _parse_certificate(row[1]))

    @retry_read_once
    async def certificate_status(self, serial: str, fingerprint: str) -> str | None:
        async with self.pool.connection() as conn:
            row = await (await conn.execute(CERTIFICATE, (serial, fingerprint))).fetchone()
        return None if row is None else str(row[0])

    @retry_read_once
    async def device(self, device_id: str) -> DeviceRecord | None:
        async with self.pool.connection() as conn:
            row = await (await conn.execute(DEVICE, (device_id,))).fetchone()
        return None if row is None else DeviceRecord(row[0], row[1], row[2])

    @retry_read_once
    async def jwt_key(self, kid: str) -> JwtKey | None:
        async with self.pool.connection() as conn:
            row = await (await conn.execute(JWT_KEY, (kid,))).fetchone()
        return None if row is None else JwtKey(*row)

    @retry_read_once
    async def service_principal(self, name: str) -> ServicePrincipal | None:
        async with self.pool.connection() as conn:
            row = await (await conn.execute(SERVICE, (name,))).fetchone()
        return None if row is None else ServicePrincipal(*row)

    @retry_read_once
    async def claim(self, claim_id: str) -> Claim | None:
        async with self.pool.connection() as conn:
            row = await (await conn.execute(CLAIM, (claim_id,))).fetchone()
        return None if row is None else Claim(*row)
