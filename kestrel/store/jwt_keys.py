"""Public keys that verify device JWTs (ADR-0009): per tenant, optionally bound to one device; the algorithm follows
the key (Ed25519: EdDSA, EC P-256: ES256)."""

from __future__ import annotations

import secrets
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from psycopg import AsyncConnection

from kestrel.store import audit, tenants
from kestrel.store.rows import fetch_maybe, fetch_one
from kestrel.store.session import Actor
from kestrel_core.errors import InvalidInput, NotFound
from kestrel_core.topics import require_id

KeyRow = tuple[str, str, str]  # kid, alg, PEM


def key_row(device: str | None, public_key_pem: bytes) -> KeyRow:
    """A new kid, the algorithm and the normalised PEM of a device JWT public key (``InvalidInput`` otherwise)."""
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


async def insert(conn: AsyncConnection[Any], tenant: str, rows: list[tuple[str | None, KeyRow]]) -> None:
    """Store keys (device or None, key row) of ``tenant``."""
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO jwt_keys (kid, tenant_id, device_id, alg, public_key_pem) VALUES (%s, %s, %s, %s, %s)",
            [(kid, tenant, device, alg, pem) for device, (kid, alg, pem) in rows],
        )


async def add(
    conn: AsyncConnection[Any], actor: Actor, tenant: str, public_key_pem: bytes, device: str | None = None
) -> str:
    """Register a key for ``tenant`` (or one of its devices); returns its kid. Audited."""
    require_id("tenant", tenant)
    row = key_row(device, public_key_pem)
    await tenants.require(conn, tenant)
    if device is not None:
        found = await fetch_maybe(
            conn, "SELECT 1 AS found FROM devices WHERE device_id = %s AND tenant_id = %s", (device, tenant)
        )
        if found is None:
            raise NotFound(f"device {device} is not registered in tenant {tenant}")
    await insert(conn, tenant, [(device, row)])
    kid, alg, _ = row
    await audit.record(conn, actor, tenant, "jwt_key.create", f"jwt_key:{kid}", after={"alg": alg, "device": device})
    return kid


async def revoke(conn: AsyncConnection[Any], actor: Actor, kid: str) -> None:
    """Revoke a key: tokens it signed are refused and the sessions they opened are disconnected (migration 0006)."""
    row = await fetch_one(
        conn,
        "UPDATE jwt_keys SET status = 'revoked' WHERE kid = %s RETURNING tenant_id",
        (kid,),
        f"no JWT key with kid {kid}",
    )
    await audit.record(conn, actor, row["tenant_id"], "jwt_key.revoke", f"jwt_key:{kid}")
