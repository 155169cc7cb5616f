"""Tenant and device registry operations for the operator CLI and the embedded default.

Full tenant/device management with row-level security is the control-plane issue; this is the
minimum the telemetry path needs: the writer refuses telemetry for devices that are not registered.
"""

from __future__ import annotations

from collections.abc import Iterable

import psycopg

from kestrel.errors import Conflict, NotFound
from kestrel.topics import require_id


def create_tenant(conninfo: str, tenant: str, name: str = "", *, exist_ok: bool = False) -> bool:
    """Create a tenant; return False when it already existed and ``exist_ok``."""
    require_id("tenant", tenant)
    with psycopg.connect(conninfo) as conn:
        cur = conn.execute(
            "INSERT INTO tenants (tenant_id, name) VALUES (%s, %s) ON CONFLICT DO NOTHING", (tenant, name)
        )
        if cur.rowcount == 0 and not exist_ok:
            raise Conflict(f"tenant {tenant} already exists")
        return cur.rowcount == 1


def create_devices(conninfo: str, tenant: str, devices: Iterable[str], *, exist_ok: bool = False) -> int:
    """Register devices under ``tenant``; return how many were new.

    A device id already registered under another tenant is a conflict even with ``exist_ok``.
    """
    require_id("tenant", tenant)
    ids = [require_id("device", d) for d in devices]
    with psycopg.connect(conninfo) as conn, conn.transaction():
        if conn.execute("SELECT 1 FROM tenants WHERE tenant_id = %s", (tenant,)).fetchone() is None:
            raise NotFound(f"tenant {tenant} does not exist")
        taken = conn.execute("SELECT device_id, tenant_id FROM devices WHERE device_id = ANY(%s)", (ids,)).fetchall()
        foreign = [d for d, t in taken if t != tenant]
        if foreign or (taken and not exist_ok):
            raise Conflict(f"device id already registered: {(foreign or [taken[0][0]])[0]}")
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO devices (device_id, tenant_id) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                [(d, tenant) for d in ids],
            )
        existing = {d for d, _ in taken}
        return len([d for d in ids if d not in existing])
