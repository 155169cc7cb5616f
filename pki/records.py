"""What the CA records: an issued certificate with its chain, a new authority, and the append-only audit trail
(``pki_audit``), each row written in the transaction of the action it records."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

import psycopg
from cryptography import x509

from kestrel_core.errors import InvalidInput
from pki import x509 as px


@dataclass(frozen=True)
class IssuedCertificate:
    serial: str
    tenant: str
    device: str
    not_after: dt.datetime
    cert_pem: str
    chain_pem: str  # tenant CA, then root

    @property
    def _chain(self) -> tuple[str, str]:
        end = "-----END CERTIFICATE-----\n"
        tenant_ca, _, root = self.chain_pem.partition(end)
        return tenant_ca + end, root

    @property
    def root_pem(self) -> str:
        """The root certificate: what devices (``--cafile``) and brokers trust."""
        return self._chain[1]

    @property
    def full_chain_pem(self) -> str:
        """The device certificate followed by its tenant CA: what a device presents in its TLS handshake,
        so brokers need to trust only the root."""
        return self.cert_pem + self._chain[0]


@dataclass(frozen=True)
class NewAuthority:
    certificate: x509.Certificate
    key_encrypted: str | None  # None when the backend holds the key (Vault/OpenBao)


def audit(
    conn: psycopg.Connection[Any],
    actor: str,
    action: str,
    *,
    tenant: str | None = None,
    device: str | None = None,
    serial: str | None = None,
    **detail: object,
) -> None:
    conn.execute(
        "INSERT INTO pki_audit (actor, action, tenant_id, device_id, serial, detail) VALUES (%s, %s, %s, %s, %s, %s)",
        (actor, action, tenant, device, serial, json.dumps(detail, default=str)),
    )


def check_reason(reason: str) -> None:
    if reason not in px.REASONS:
        raise InvalidInput("bad_reason", f"reason must be one of: {', '.join(px.REASONS)}")
