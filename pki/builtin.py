"""The built-in certificate authority: keys encrypted in PostgreSQL, every action audited (ADR-0008).

``CertificateAuthority`` is the interface the Vault/OpenBao backend will implement too.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from psycopg.rows import dict_row

from kestrel.errors import Conflict, InvalidInput, NotFound
from kestrel.topics import require_id
from pki import x509 as px


@dataclass(frozen=True)
class IssuedCertificate:
    serial: str
    tenant: str
    device: str
    not_after: dt.datetime
    cert_pem: str
    chain_pem: str


class CertificateAuthority(Protocol):
    """What the platform needs from a CA backend (built-in or Vault/OpenBao)."""

    def create_tenant_ca(self, tenant: str, actor: str) -> str:
        """Create the tenant's intermediate CA; return its serial."""

    def sign_csr(self, csr: bytes, device: str, days: int, actor: str) -> IssuedCertificate:
        """Sign a device's CSR with its tenant's CA."""

    def renew(self, serial: str, days: int, actor: str) -> IssuedCertificate:
        """Issue a new certificate for the key of an active one."""

    def revoke(self, serial: str, reason: str, actor: str) -> None:
        """Revoke a device certificate."""

    def crl(self, tenant: str) -> bytes:
        """The tenant CA's current CRL (PEM)."""


def _audit(
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


class BuiltinCA:
    """CA keys live encrypted (PKCS#8) in ``pki_authorities``; ``passphrase`` opens them and is never stored."""

    def __init__(self, conninfo: str, passphrase: str) -> None:
        self.conninfo = conninfo
        self.passphrase = passphrase

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.conninfo)

    # ---------------------------------------------------------------------------------------- authorities

    def init_root(self, actor: str) -> str:
        """Create the root CA once; ``Conflict`` when it exists."""
        key = px.new_ca_key()
        encrypted = px.encrypt_key(key, self.passphrase)
        cert = px.create_root(key)
        with self._connect() as conn, conn.transaction():
            if conn.execute("SELECT 1 FROM pki_authorities WHERE ca_id = 'root'").fetchone():
                raise Conflict("the root CA already exists")
            conn.execute(
                "INSERT INTO pki_authorities (ca_id, kind, serial, subject, cert_pem, key_encrypted,"
                " not_after) VALUES ('root', 'root', %s, %s, %s, %s, %s)",
                (px.serial_hex(cert), cert.subject.rfc4514_string(), px.pem(cert), encrypted, cert.not_valid_after_utc),
            )
            _audit(conn, actor, "root_ca_created", serial=px.serial_hex(cert))
        return px.serial_hex(cert)

    def _authority(self, conn: psycopg.Connection[Any], ca_id: str) -> tuple[px.CAKey, x509.Certificate]:
        row = conn.execute(
            "SELECT cert_pem, key_encrypted, status FROM pki_authorities WHERE ca_id = %s", (ca_id,)
        ).fetchone()
        if row is None:
            what = "root CA" if ca_id == "root" else f"CA of tenant {ca_id.removeprefix('tenant:')}"
            hint = "`kestrel pki init`" if ca_id == "root" else "`kestrel pki tenant-ca TENANT`"
            raise NotFound(f"the {what} does not exist; create it with {hint}")
        if row[2] != "active":
            raise Conflict(f"the {'root CA' if ca_id == 'root' else 'tenant CA'} is revoked; nothing can be signed")
        return px.decrypt_key(row[1], self.passphrase), px.load_certificate(row[0])

    def create_tenant_ca(self, tenant: str, actor: str) -> str:
        require_id("tenant", tenant)
        with self._connect() as conn, conn.transaction():
            if conn.execute("SELECT 1 FROM tenants WHERE tenant_id = %s", (tenant,)).fetchone() is None:
                raise NotFound(f"tenant {tenant} does not exist")
            if conn.execute("SELECT 1 FROM pki_authorities WHERE ca_id = %s", (f"tenant:{tenant}",)).fetchone():
                raise Conflict(f"tenant {tenant} already has a CA")
            root_key, root = self._authority(conn, "root")
            key = px.new_ca_key()
            cert = px.create_tenant_ca(tenant, key, root_key, root)
            conn.execute(
                "INSERT INTO pki_authorities (ca_id, kind, tenant_id, serial, subject, cert_pem,"
                " key_encrypted, not_after) VALUES (%s, 'tenant', %s, %s, %s, %s, %s, %s)",
                (
                    f"tenant:{tenant}",
                    tenant,
                    px.serial_hex(cert),
                    cert.subject.rfc4514_string(),
                    px.pem(cert),
                    px.encrypt_key(key, self.passphrase),
                    cert.not_valid_after_utc,
                ),
            )
            _audit(conn, actor, "tenant_ca_created", tenant=tenant, serial=px.serial_hex(cert))
        return px.serial_hex(cert)

    def revoke_tenant_ca(self, tenant: str, reason: str, actor: str) -> None:
        _check_reason(reason)
        with self._connect() as conn, conn.transaction():
            cur = conn.execute(
                "UPDATE pki_authorities SET status = 'revoked' WHERE ca_id = %s AND status = 'active'",
                (f"tenant:{tenant}",),
            )
            if cur.rowcount == 0:
                raise NotFound(f"tenant {tenant} has no active CA")
            _audit(conn, actor, "tenant_ca_revoked", tenant=tenant, reason=reason)

    def root_pem(self) -> str:
        """The root certificate: what devices (``--cafile``) and brokers trust."""
        with self._connect() as conn:
            row = conn.execute("SELECT cert_pem FROM pki_authorities WHERE ca_id = 'root'").fetchone()
        if row is None:
            raise NotFound("the root CA does not exist; create it with `kestrel pki init`")
        return str(row[0])

    def issue_server(self, hostnames: list[str], addresses: list[str], days: int, actor: str) -> tuple[str, str]:
        """A broker server certificate signed by the root, with its key generated here (it is our own
        server). Returns (certificate PEM, unencrypted PKCS#8 key PEM); audited, not stored."""
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
        from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415

        key = ec.generate_private_key(ec.SECP256R1())
        with self._connect() as conn, conn.transaction():
            root_key, root = self._authority(conn, "root")
            cert = px.issue_server_certificate(key.public_key(), hostnames, addresses, days, root_key, root)
            _audit(
                conn,
                actor,
                "server_certificate_issued",
                serial=px.serial_hex(cert),
                hostnames=hostnames,
                addresses=addresses,
                not_after=cert.not_valid_after_utc,
            )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        return px.pem(cert), key_pem

    def chain(self, tenant: str) -> str:
        """PEM of the tenant CA followed by the root (what brokers trust for device certificates)."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT cert_pem FROM pki_authorities WHERE ca_id IN (%s, 'root') ORDER BY kind DESC",
                (f"tenant:{tenant}",),
            ).fetchall()
        if len(rows) != 2:
            raise NotFound(f"tenant {tenant} has no CA")
        return "".join(r[0] for r in rows)

    # ---------------------------------------------------------------------------------------- certificates

    def _issue(
        self,
        conn: psycopg.Connection[Any],
        public_key: CertificatePublicKeyTypes,
        tenant: str,
        device: str,
        days: int,
        actor: str,
        action: str,
        **detail: object,
    ) -> IssuedCertificate:
        ca_key, ca = self._authority(conn, f"tenant:{tenant}")
        cert = px.issue_device_certificate(public_key, px.DeviceProfile(tenant, device, days), ca_key, ca)
        serial = px.serial_hex(cert)
        conn.execute(
            "INSERT INTO pki_certificates (serial, tenant_id, device_id, issuer_ca, fingerprint_sha256,"
            " not_before, not_after, cert_pem) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (
                serial,
                tenant,
                device,
                f"tenant:{tenant}",
                px.fingerprint(cert),
                cert.not_valid_before_utc,
                cert.not_valid_after_utc,
                px.pem(cert),
            ),
        )
        _audit(
            conn,
            actor,
            action,
            tenant=tenant,
            device=device,
            serial=serial,
            not_after=cert.not_valid_after_utc,
            **detail,
        )
        root = conn.execute("SELECT cert_pem FROM pki_authorities WHERE ca_id = 'root'").fetchone()
        chain = px.pem(ca) + (root[0] if root else "")
        return IssuedCertificate(serial, tenant, device, cert.not_valid_after_utc, px.pem(cert), chain)

    def _device_tenant(self, conn: psycopg.Connection[Any], device: str) -> str:
        row = conn.execute("SELECT tenant_id, status FROM devices WHERE device_id = %s", (device,)).fetchone()
        if row is None:
            raise NotFound(f"device {device} is not registered")
        if row[1] in ("suspended", "decommissioned"):
            raise Conflict(f"device {device} is {row[1]}; it cannot get a certificate")
        return str(row[0])

    def sign_csr(self, csr: bytes, device: str, days: int, actor: str) -> IssuedCertificate:
        request = px.load_csr(csr)
        px.check_device_csr(request, device)
        with self._connect() as conn, conn.transaction():
            tenant = self._device_tenant(conn, device)
            return self._issue(conn, request.public_key(), tenant, device, days, actor, "certificate_signed")

    def renew(self, serial: str, days: int, actor: str) -> IssuedCertificate:
        with self._connect() as conn, conn.transaction():
            row = conn.execute(
                "SELECT tenant_id, device_id, cert_pem, status FROM pki_certificates WHERE serial = %s",
                (serial.lower(),),
            ).fetchone()
            if row is None:
                raise NotFound(f"no certificate with serial {serial}")
            if row[3] != "active":
                raise Conflict(f"certificate {serial} is revoked; enrol the device again with a new CSR")
            self._device_tenant(conn, row[1])
            old = px.load_certificate(row[2])
            return self._issue(
                conn, old.public_key(), row[0], row[1], days, actor, "certificate_renewed", renews=serial.lower()
            )

    def revoke(self, serial: str, reason: str, actor: str) -> None:
        _check_reason(reason)
        with self._connect() as conn, conn.transaction():
            self._revoke(conn, serial.lower(), reason, actor)

    def revoke_device(self, device: str, reason: str, actor: str) -> list[str]:
        """Revoke every active certificate of ``device`` in one transaction; return their serials."""
        _check_reason(reason)
        with self._connect() as conn, conn.transaction():
            serials = [
                r[0]
                for r in conn.execute(
                    "SELECT serial FROM pki_certificates WHERE device_id = %s AND status = 'active' FOR UPDATE",
                    (device,),
                )
            ]
            if not serials:
                raise NotFound(f"device {device} has no active certificate")
            for serial in serials:
                self._revoke(conn, serial, reason, actor)
        return serials

    @staticmethod
    def _revoke(conn: psycopg.Connection[Any], serial: str, reason: str, actor: str) -> None:
        row = conn.execute(
            "UPDATE pki_certificates SET status = 'revoked', revoked_at = now(), revocation_reason = %s"
            " WHERE serial = %s AND status = 'active' RETURNING tenant_id, device_id",
            (reason, serial),
        ).fetchone()
        if row is None:
            raise NotFound(f"no active certificate with serial {serial}")
        _audit(conn, actor, "certificate_revoked", tenant=row[0], device=row[1], serial=serial, reason=reason)

    def crl(self, tenant: str) -> bytes:
        with self._connect() as conn, conn.transaction():
            ca_key, ca = self._authority(conn, f"tenant:{tenant}")
            revoked = [
                px.Revoked(s, at, reason)
                for s, at, reason in conn.execute(
                    "SELECT serial, revoked_at, revocation_reason FROM pki_certificates"
                    " WHERE issuer_ca = %s AND status = 'revoked' ORDER BY revoked_at",
                    (f"tenant:{tenant}",),
                )
            ]
            number = conn.execute("SELECT nextval('pki_crl_number')").fetchone()
            crl = px.build_crl(revoked, ca_key, ca, int(number[0]) if number else 1)
        return crl.public_bytes(serialization.Encoding.PEM)

    def list(
        self, *, tenant: str | None = None, device: str | None = None, status: str | None = None
    ) -> list[dict[str, Any]]:
        with self._connect() as conn:
            cur = conn.cursor(row_factory=dict_row)
            return cur.execute(
                "SELECT serial, tenant_id, device_id, status, not_before, not_after, revoked_at, revocation_reason,"
                " fingerprint_sha256 FROM pki_certificates"
                " WHERE (%(t)s::text IS NULL OR tenant_id = %(t)s) AND (%(d)s::text IS NULL OR device_id = %(d)s)"
                " AND (%(s)s::text IS NULL OR status = %(s)s) ORDER BY created_at",
                {"t": tenant, "d": device, "s": status},
            ).fetchall()


def _check_reason(reason: str) -> None:
    if reason not in px.REASONS:
        raise InvalidInput("bad_reason", f"reason must be one of: {', '.join(px.REASONS)}")
