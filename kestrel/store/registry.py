"""Tenant and device registry operations for the operator CLI and the embedded default.

Full tenant/device management with row-level security is the control-plane issue; this is the
minimum the telemetry path needs: the writer refuses telemetry for devices that are not registered.
"""

from __future__ import annotations

import csv
import hashlib
import io
import secrets
from collections.abc import Callable, Iterable
from typing import Any

import psycopg
import psycopg.rows
from psycopg.types.json import Jsonb

from kestrel_core.errors import Conflict, InvalidInput, NotFound
from kestrel_core.tokens import SCOPES, new_token
from kestrel_core.topics import require_id


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


def _jwt_key_row(device: str | None, public_key_pem: bytes) -> tuple[str, str, str]:
    """(kid, alg, normalised PEM) for a device JWT public key; the algorithm follows the key."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519  # noqa: PLC0415

    whose = f" of {device}" if device else ""
    try:
        key = serialization.load_pem_public_key(public_key_pem)
    except ValueError as exc:
        raise InvalidInput("bad_key", f"not a PEM public key{whose}") from exc
    if isinstance(key, ed25519.Ed25519PublicKey):
        alg = "EdDSA"
    elif isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1":
        alg = "ES256"
    else:
        raise InvalidInput("bad_key", f"JWT keys must be Ed25519 (EdDSA) or EC P-256 (ES256){whose}")
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return "k" + secrets.token_hex(8), alg, pem


def add_jwt_key(conninfo: str, tenant: str, public_key_pem: bytes, device: str | None = None) -> str:
    """Register a public key that verifies device JWTs; return its ``kid``. The algorithm follows the key."""
    require_id("tenant", tenant)
    kid, alg, pem = _jwt_key_row(device, public_key_pem)
    with psycopg.connect(conninfo) as conn, conn.transaction():
        if conn.execute("SELECT 1 FROM tenants WHERE tenant_id = %s", (tenant,)).fetchone() is None:
            raise NotFound(f"tenant {tenant} does not exist")
        if device is not None:
            row = conn.execute("SELECT tenant_id FROM devices WHERE device_id = %s", (device,)).fetchone()
            if row is None or row[0] != tenant:
                raise NotFound(f"device {device} is not registered in tenant {tenant}")
        conn.execute(
            "INSERT INTO jwt_keys (kid, tenant_id, device_id, alg, public_key_pem) VALUES (%s, %s, %s, %s, %s)",
            (kid, tenant, device, alg, pem),
        )
    return kid


SERVICE_ROLES = ("ingest", "control", "devices", "provisioning")
SERVICE_SECRET_PREFIX = "ksvc_"  # noqa: S105 - a recognisable prefix, not a secret


def create_service_principal(conninfo: str, name: str, role: str, *, rotate: bool = False) -> str:
    """Create (or with ``rotate``, re-key) a backend principal; return its secret, which is stored only
    as a SHA-256 digest and cannot be shown again."""

    require_id("service", name)
    if role not in SERVICE_ROLES:
        raise InvalidInput("bad_role", f"role must be one of {', '.join(SERVICE_ROLES)}")
    secret = SERVICE_SECRET_PREFIX + secrets.token_urlsafe(32)
    digest = hashlib.sha256(secret.encode()).hexdigest()
    with psycopg.connect(conninfo) as conn:
        cur = conn.execute(
            "INSERT INTO service_principals (name, role, secret_sha256) VALUES (%s, %s, %s)"
            " ON CONFLICT (name) DO UPDATE SET role = EXCLUDED.role, secret_sha256 = EXCLUDED.secret_sha256,"
            " status = 'active' WHERE %s",
            (name, role, digest, rotate),
        )
        if cur.rowcount == 0:
            raise Conflict(f"service principal {name} already exists; use --rotate to issue a new secret")
    return secret


def revoke_service_principal(conninfo: str, name: str) -> None:
    with psycopg.connect(conninfo) as conn:
        if conn.execute("UPDATE service_principals SET status = 'revoked' WHERE name = %s", (name,)).rowcount == 0:
            raise NotFound(f"service principal {name} does not exist")


def revoke_jwt_key(conninfo: str, kid: str) -> None:
    with psycopg.connect(conninfo) as conn:
        if conn.execute("UPDATE jwt_keys SET status = 'revoked' WHERE kid = %s", (kid,)).rowcount == 0:
            raise NotFound(f"no JWT key with kid {kid}")


def set_device_status(conninfo: str, device: str, status: str) -> str:
    """Suspend or re-activate a device; return its previous status. The change notifies authsvc, which
    disconnects a suspended device's live session (migration 0006)."""

    if status not in ("active", "suspended"):
        raise InvalidInput("bad_status", "status must be active or suspended")
    with psycopg.connect(conninfo) as conn, conn.transaction():
        row = conn.execute("SELECT status FROM devices WHERE device_id = %s FOR UPDATE", (device,)).fetchone()
        if row is None:
            raise NotFound(f"device {device} does not exist")
        if row[0] == "decommissioned":
            raise Conflict(f"device {device} is decommissioned")
        try:
            conn.execute("UPDATE devices SET status = %s WHERE device_id = %s", (status, device))
        except psycopg.errors.CheckViolation as exc:  # the lifecycle trigger (ADR-0013)
            raise Conflict(str(exc.diag.message_primary)) from exc
        return str(row[0])


def decommission_device(conninfo: str, device: str) -> bool:
    """Revoke the device's credentials, cancel its open commands and retire it for good (ADR-0013). Idempotent:
    False when it was decommissioned already."""
    with psycopg.connect(conninfo) as conn, conn.transaction():
        row = conn.execute("SELECT status FROM devices WHERE device_id = %s FOR UPDATE", (device,)).fetchone()
        if row is None:
            raise NotFound(f"device {device} does not exist")
        if row[0] == "decommissioned":
            return False
        conn.execute("SELECT kestrel_decommission_device(%s)", (device,))
        return True


def create_api_token(
    conninfo: str, tenant: str, scopes: list[str], *, name: str = "", days: int = 90, user_id: str | None = None
) -> tuple[str, str]:
    """An API token for ``tenant`` (operator path: the CLI and the embedded default); returns (token id, the
    token, shown once). Only its secret's SHA-256 is stored."""
    unknown = set(scopes) - set(SCOPES)
    if unknown or not scopes:
        raise InvalidInput("bad_scope", f"scopes must be among: {', '.join(SCOPES)}")
    if not 1 <= days <= 365:
        raise InvalidInput("bad_lifetime", "tokens live 1 to 365 days")
    token_id, token, digest = new_token()
    with psycopg.connect(conninfo) as conn:
        if conn.execute("SELECT 1 FROM tenants WHERE tenant_id = %s", (tenant,)).fetchone() is None:
            raise NotFound(f"tenant {tenant} does not exist")
        conn.execute(
            "INSERT INTO api_tokens (token_id, tenant_id, user_id, name, scopes, secret_sha256, expires_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, now() + make_interval(days => %s))",
            (token_id, tenant, user_id, name, sorted(set(scopes)), digest, days),
        )
        conn.execute(
            "INSERT INTO audit_log (tenant_id, actor, action, target, after, request_id)"
            " VALUES (%s, 'cli', 'token.create', %s, %s, 'cli')",
            (tenant, f"token:{token_id}", Jsonb({"scopes": sorted(set(scopes)), "days": days})),
        )
    return token_id, token


def list_tenants(conninfo: str) -> list[dict[str, Any]]:
    with psycopg.connect(conninfo) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        return cur.execute(
            "SELECT t.tenant_id, t.name, t.status, t.max_devices, t.created_at,"
            " (SELECT count(*) FROM devices d WHERE d.tenant_id = t.tenant_id) AS devices"
            " FROM tenants t ORDER BY t.tenant_id"
        ).fetchall()


def list_devices(conninfo: str, tenant: str, status: str | None = None) -> list[dict[str, Any]]:
    require_id("tenant", tenant)
    with psycopg.connect(conninfo) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        if cur.execute("SELECT 1 FROM tenants WHERE tenant_id = %s", (tenant,)).fetchone() is None:
            raise NotFound(f"tenant {tenant} does not exist")
        return cur.execute(
            "SELECT device_id, name, status, tags, created_at FROM devices"
            " WHERE tenant_id = %s AND (%s::text IS NULL OR status = %s) ORDER BY device_id",
            (tenant, status, status),
        ).fetchall()


def create_user(conninfo: str, tenant: str, email: str, role: str) -> str:
    if role not in ("admin", "operator", "viewer"):
        raise InvalidInput("bad_role", "role must be admin, operator or viewer")
    user_id = "u" + secrets.token_hex(8)
    try:
        with psycopg.connect(conninfo) as conn:
            if conn.execute("SELECT 1 FROM tenants WHERE tenant_id = %s", (tenant,)).fetchone() is None:
                raise NotFound(f"tenant {tenant} does not exist")
            conn.execute(
                "INSERT INTO users (user_id, tenant_id, email, role) VALUES (%s, %s, %s, %s)",
                (user_id, tenant, email.lower(), role),
            )
    except psycopg.errors.CheckViolation as exc:
        raise InvalidInput("bad_email", f"{email[:80]!r} is not an e-mail address") from exc
    except psycopg.errors.UniqueViolation as exc:
        raise Conflict(f"tenant {tenant} already has a user {email}") from exc
    return user_id


DeviceRow = tuple[str, str, list[str], list[str]]  # device id, name, tags, groups


def parse_device_csv(text: str) -> list[DeviceRow]:
    """Rows of CSV with the header ``device_id[,name][,tags][,groups]`` (tags and groups separated by ``;``); the
    ids are checked where the rows are stored."""
    try:
        rows = list(csv.DictReader(io.StringIO(text)))
    except csv.Error as exc:
        raise InvalidInput("bad_csv", f"not CSV: {exc}") from exc
    if not rows or "device_id" not in rows[0] or set(rows[0]) - {"device_id", "name", "tags", "groups"}:
        raise InvalidInput("bad_csv", "CSV needs a header with device_id (and optionally name, tags, groups) and a row")
    return [(r["device_id"] or "", r.get("name") or "", _split(r.get("tags")), _split(r.get("groups"))) for r in rows]


def _split(cell: str | None) -> list[str]:
    return [t for t in (cell or "").split(";") if t]


def import_devices(
    conninfo: str,
    tenant: str,
    devices: list[DeviceRow],
    progress: Callable[[int], None] | None = None,
    chunk: int = 500,
    jwt_keys: dict[str, bytes] | None = None,
) -> int:
    """Register ``(device_id, name, tags, groups)`` rows in one transaction (all or none), respecting the tenant's
    device quota, each in its (existing) groups and, when ``jwt_keys`` has its public key (PEM), with a
    device-bound ES256/EdDSA JWT key (it is then provisioned); ``progress`` is told how many rows each chunk wrote."""
    require_id("tenant", tenant)
    for device_id, _, tags, groups in devices:
        require_id("device", device_id)
        for group in groups:
            require_id("group", group)
        if len(tags) > 64:
            raise InvalidInput("bad_tags", f"device {device_id} has more than 64 tags")
    if len({d[0] for d in devices}) != len(devices):
        raise InvalidInput("bad_csv", "a device id appears twice")
    keys = {d: _jwt_key_row(d, pem) for d, pem in (jwt_keys or {}).items()}
    with psycopg.connect(conninfo) as conn, conn.transaction():
        row = conn.execute(
            "SELECT max_devices, (SELECT count(*) FROM devices WHERE tenant_id = %s) FROM tenants WHERE tenant_id = %s",
            (tenant, tenant),
        ).fetchone()
        if row is None:
            raise NotFound(f"tenant {tenant} does not exist")
        if row[0] is not None and row[1] + len(devices) > row[0]:
            raise Conflict(f"the tenant's device quota ({row[0]}) would be exceeded")
        try:
            with conn.cursor() as cur:
                for start in range(0, len(devices), chunk):
                    part = devices[start : start + chunk]
                    cur.executemany(
                        "INSERT INTO devices (device_id, tenant_id, name, tags) VALUES (%s, %s, %s, %s)",
                        [(d, tenant, n, t) for d, n, t, _ in part],
                    )
                    cur.executemany(
                        "INSERT INTO device_group_members (tenant_id, group_id, device_id) VALUES (%s, %s, %s)",
                        [(tenant, g, d) for d, _, _, groups in part for g in set(groups)],
                    )
                    cur.executemany(
                        "INSERT INTO jwt_keys (kid, tenant_id, device_id, alg, public_key_pem)"
                        " VALUES (%s, %s, %s, %s, %s)",
                        [(kid, tenant, d, alg, pem) for d, *_ in part if d in keys for kid, alg, pem in (keys[d],)],
                    )
                    if progress:
                        progress(len(part))
        except psycopg.errors.UniqueViolation as exc:
            raise Conflict("a device id in the file is already registered") from exc
        except psycopg.errors.ForeignKeyViolation as exc:
            raise InvalidInput("unknown_group", "a group in the file does not exist in this tenant") from exc
    return len(devices)
