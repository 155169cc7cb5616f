"""Seed a database through the store's own write path, synchronously: for the embedded default, the tests and the
benchmarks. Each call is one connection and one transaction, acting as the operator (``cli:<user>``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import AsyncConnection

from kestrel.store import credentials as creds
from kestrel.store import devices, jwt_keys, principals, tenants
from kestrel.store.session import operator, run_blocking


def create_tenant(url: str, tenant: str, name: str = "", *, exist_ok: bool = False) -> bool:
    """Create a tenant; False when it existed and ``exist_ok``."""
    created = run_blocking(url, lambda c: tenants.create(c, operator(), tenant, name=name, exist_ok=exist_ok))
    return created is not None


def create_devices(url: str, tenant: str, ids: Iterable[str], *, exist_ok: bool = False) -> int:
    """Register devices; returns how many were new."""
    new = [devices.NewDevice(d) for d in ids]
    return len(
        run_blocking(url, lambda c: devices.create(c, operator(), tenant, new, exist_ok=exist_ok), tenant=tenant)
    )


def import_devices(
    url: str, tenant: str, rows: Sequence[devices.NewDevice], *, jwt_public_keys: dict[str, bytes] | None = None
) -> int:
    created = run_blocking(
        url, lambda c: devices.create(c, operator(), tenant, rows, jwt_public_keys=jwt_public_keys), tenant=tenant
    )
    return len(created)


def set_device_status(url: str, device: str, status: str) -> str:
    """Suspend or re-activate a device; returns its previous status."""

    async def work(conn: AsyncConnection[Any]) -> str:
        tenant = await devices.tenant_of(conn, device)
        before, _ = await devices.update(conn, operator(), tenant, device, status=status)
        return str(before["status"])

    return run_blocking(url, work)


def add_jwt_key(url: str, tenant: str, public_key_pem: bytes, device: str | None = None) -> str:
    return run_blocking(url, lambda c: jwt_keys.add(c, operator(), tenant, public_key_pem, device), tenant=tenant)


def create_service_principal(url: str, name: str, role: str, *, rotate: bool = False) -> str:
    return run_blocking(url, lambda c: principals.create(c, operator(), name, role, rotate=rotate))


def revoke_service_principal(url: str, name: str) -> None:
    run_blocking(url, lambda c: principals.revoke(c, operator(), name))


def create_api_token(
    url: str, tenant: str, scopes: Sequence[str], *, name: str = "", days: int = 90, user: str | None = None
) -> tuple[str, str]:
    """An API token (token id, the token)."""
    expires_at = datetime.now(UTC) + timedelta(days=days)
    return run_blocking(
        url,
        lambda c: creds.create_token(c, operator(), tenant, scopes, expires_at=expires_at, name=name, user=user),
        tenant=tenant,
    )
