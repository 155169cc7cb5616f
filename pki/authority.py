"""The certificate authority's bookkeeping, shared by both backends (ADR-0008, ADR-0011).

Whatever signs (the built-in CA with keys encrypted in PostgreSQL, or Vault/OpenBao PKI), PostgreSQL
holds the record authsvc reads: the CA certificates, every issued certificate with its status and
fingerprint, and the append-only audit trail, each written in the transaction of the action.
Subclasses implement the signing hooks only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import psycopg
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from psycopg.rows import dict_row

from kestrel_core.errors import Conflict, InvalidInput, NotFound
from kestrel_core.topics import require_id
from pki import x509 as px
from pki.records import IssuedCertificate, NewAuthority, audit, check_reason


class DatabaseCA(ABC):
    """Operations on the CA hierarchy; a backend supplies the five signing hooks."""

    backend: str

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo

    # ------------------------------------------------------------------------------- signing hooks

    @abstractmethod
    def _new_root(self) -> NewAuthority: ...

    @abstractmethod
    def _new_tenant_ca(self, conn: psycopg.Connection[Any], tenant: str) -> NewAuthority: ...

    @abstractmethod
    def _sign_device(
        self,
        conn: psycopg.Connection[Any],
        tenant: str,
        csr: x509.CertificateSigningRequest | None,
        public_key: CertificatePublicKeyTypes,
        device: str,
        days: int,
    ) -> x509.Certificate:
        """A device certificate for ``public_key``; ``csr`` is None on a renewal without a new CSR."""

    @abstractmethod
    def _sign_server(
        self, conn: psycopg.Connection[Any], key: ec.EllipticCurvePrivateKey, hosts: list[str],
        addresses: list[str], days: int,
    ) -> x509.Certificate: ...  # fmt: skip

    @abstractmethod
    def _revoked(self, tenant: str, serial: str) -> None:
        """Tell the signer (after our record is written) that ``serial`` is revoked."""

    @abstractmethod
    def _crl(self, conn: psycopg.Connection[Any], tenant: str, revoked: list[px.Revoked]) -> bytes:
        """The tenant CA's CRL, PEM."""

    # ------------------------------------------------------------------------------- authorities

    def _connect(self) -> psycopg.Connection[dict[str, Any]]:
        """A connection whose rows are read by name."""
        return psycopg.connect(self.conninfo, row_factory=dict_row)

    def _record_authority(
        self, conn: psycopg.Connection[Any], ca_id: str, tenant: str | None, new: NewAuthority
    ) -> str:
        cert = new.certificate
        conn.execute(
            "INSERT INTO pki_authorities (ca_id, kind, tenant_id, serial, subject, cert_pem, key_encrypted,"
            " not_after, backend) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                ca_id,
                "root" if tenant is None else "tenant",
                tenant,
                px.serial_hex(cert),
                cert.subject.rfc4514_string(),
                px.pem(cert),
                new.key_encrypted,
                cert.not_valid_after_utc,
                self.backend,
            ),
        )
        return px.serial_hex(cert)

    def init_root(self, actor: str) -> str:
        """Create the root CA once; ``Conflict`` when it exists."""
        with self._connect() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('kestrel-pki-root'))")
            if conn.execute("SELECT 1 FROM pki_authorities WHERE ca_id = 'root'").fetchone():
                raise Conflict("the root CA already exists")
            serial = self._record_authority(conn, "root", None, self._new_root())
            audit(conn, actor, "root_ca_created", serial=serial, backend=self.backend)
        return serial

    def _authority_row(self, conn: psycopg.Connection[Any], ca_id: str) -> tuple[str, str | None]:
        """(certificate PEM, encrypted key or None) of an active CA; clear errors otherwise."""
        row = conn.execute(
            "SELECT cert_pem, key_encrypted, status FROM pki_authorities WHERE ca_id = %s", (ca_id,)
        ).fetchone()
        if row is None:
            what = "root CA" if ca_id == "root" else f"CA of tenant {ca_id.removeprefix('tenant:')}"
            hint = "`kestrel pki init`" if ca_id == "root" else "`kestrel pki tenant-ca TENANT`"
            raise NotFound(f"the {what} does not exist; create it with {hint}")
        if row["status"] != "active":
            raise Conflict(f"the {'root CA' if ca_id == 'root' else 'tenant CA'} is revoked; nothing can be signed")
        return str(row["cert_pem"]), row["key_encrypted"]

    def create_tenant_ca(self, tenant: str, actor: str) -> str:
        require_id("tenant", tenant)
        with self._connect() as conn, conn.transaction():
            if conn.execute("SELECT 1 FROM tenants WHERE tenant_id = %s", (tenant,)).fetchone() is None:
                raise NotFound(f"tenant {tenant} does not exist")
            if conn.execute("SELECT 1 FROM pki_authorities WHERE ca_id = %s", (f"tenant:{tenant}",)).fetchone():
                raise Conflict(f"tenant {tenant} already has a CA")
            self._authority_row(conn, "root")
            serial = self._record_authority(conn, f"tenant:{tenant}", tenant, self._new_tenant_ca(conn, tenant))
            audit(conn, actor, "tenant_ca_created", tenant=tenant, serial=serial, backend=self.backend)
        return serial

    def revoke_tenant_ca(self, tenant: str, reason: str, actor: str) -> None:
        check_reason(reason)
        with self._connect() as conn, conn.transaction():
            cur = conn.execute(
                "UPDATE pki_authorities SET status = 'revoked' WHERE ca_id = %s AND status = 'active'",
                (f"tenant:{tenant}",),
            )
            if cur.rowcount == 0:
                raise NotFound(f"tenant {tenant} has no active CA")
            audit(conn, actor, "tenant_ca_revoked", tenant=tenant, reason=reason)

    def root_pem(self) -> str:
        """The root certificate: what devices (``--cafile``) and brokers trust."""
        with self._connect() as conn:
            row = conn.execute("SELECT cert_pem FROM pki_authorities WHERE ca_id = 'root'").fetchone()
        if row is None:
            raise NotFound("the root CA does not exist; create it with `kestrel pki init`")
        return str(row["cert_pem"])

    def chain(self, tenant: str) -> str:
        """PEM of the tenant CA followed by the root."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT cert_pem FROM pki_authorities WHERE ca_id IN (%s, 'root') ORDER BY kind DESC",
                (f"tenant:{tenant}",),
            ).fetchall()
        if len(rows) != 2:
            raise NotFound(f"tenant {tenant} has no CA")
        return "".join(r["cert_pem"] for r in rows)

    def issue_server(self, hostnames: list[str], addresses: list[str], days: int, actor: str) -> tuple[str, str]:
        """A broker server certificate signed by the root, its key generated here (it is our own server).
        Returns (certificate PEM, unencrypted PKCS#8 key PEM); audited, not stored."""
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

        px.check_server_names(hostnames, addresses, days)
        key = ec.generate_private_key(ec.SECP256R1())
        with self._connect() as conn, conn.transaction():
            self._authority_row(conn, "root")
            cert = self._sign_server(conn, key, hostnames, addresses, days)
            audit(
                conn, actor, "server_certificate_issued", serial=px.serial_hex(cert), hostnames=hostnames,
                addresses=addresses, not_after=cert.not_valid_after_utc,
            )  # fmt: skip
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        return px.pem(cert), key_pem

    # ------------------------------------------------------------------------------- certificates

    def _issue(
        self,
        conn: psycopg.Connection[Any],
        csr: x509.CertificateSigningRequest | None,
        public_key: CertificatePublicKeyTypes,
        tenant: str,
        device: str,
        days: int,
        actor: str,
        action: str,
        **detail: object,
    ) -> IssuedCertificate:
        if not 1 <= days <= px.MAX_DEVICE_DAYS:
            raise InvalidInput("bad_lifetime", f"device certificates live 1 to {px.MAX_DEVICE_DAYS} days")
        ca_pem, _ = self._authority_row(conn, f"tenant:{tenant}")
        cert = self._sign_device(conn, tenant, csr, public_key, device, days)
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
        audit(
            conn, actor, action, tenant=tenant, device=device, serial=serial, not_after=cert.not_valid_after_utc,
            backend=self.backend, **detail,
        )  # fmt: skip
        chain = ca_pem + self._root_pem(conn)
        return IssuedCertificate(serial, tenant, device, cert.not_valid_after_utc, px.pem(cert), chain)

    @staticmethod
    def _root_pem(conn: psycopg.Connection[Any]) -> str:
        root = conn.execute("SELECT cert_pem FROM pki_authorities WHERE ca_id = 'root'").fetchone()
        return str(root["cert_pem"]) if root else ""

    @staticmethod
    def _device_tenant(conn: psycopg.Connection[Any], device: str) -> str:
        row = conn.execute("SELECT tenant_id, status FROM devices WHERE device_id = %s", (device,)).fetchone()
        if row is None:
            raise NotFound(f"device {device} is not registered")
        if row["status"] in ("suspended", "decommissioned"):
            raise Conflict(f"device {device} is {row['status']}; it cannot get a certificate")
        return str(row["tenant_id"])

    def sign_csr(self, csr: bytes, device: str, days: int, actor: str) -> IssuedCertificate:
        request = px.load_csr(csr)
        px.check_device_csr(request, device)
        with self._connect() as conn, conn.transaction():
            tenant = self._device_tenant(conn, device)
            return self._issue(conn, request, request.public_key(), tenant, device, days, actor, "certificate_signed")

    def provision(
        self, claim_id: str, tenant: str, device: str, csr: bytes, days: int, actor: str
    ) -> IssuedCertificate:
        """Just-in-time provisioning (ADR-0013): take one use of the claim, register the device (with the claim's
        group and tags) and sign its CSR, all in one transaction. The claim row is locked, so concurrent devices
        never get more than ``max_uses`` certificates. A repeated request for the same key (the answer was lost)
        gets the certificate it already has, without taking another use."""
        request = px.load_csr(csr)
        px.check_device_csr(request, device)
        with self._connect() as conn, conn.transaction():
            claim = conn.execute(
                "SELECT tenant_id, status, used, max_uses, expires_at > now() AS current, group_id, tags"
                " FROM provisioning_claims WHERE claim_id = %s FOR UPDATE",
                (claim_id,),
            ).fetchone()
            if claim is None or claim["tenant_id"] != tenant:
                raise NotFound("no such provisioning claim")
            existing = conn.execute(
                "SELECT tenant_id, claim_id FROM devices WHERE device_id = %s", (device,)
            ).fetchone()
            if existing is not None:
                mine = (existing["tenant_id"], existing["claim_id"]) == (tenant, claim_id)
                again = self._issued_for_key(conn, device, request) if mine else None
                if again is not None:
                    return again
                raise Conflict(f"device id {device} is already registered")
            if claim["status"] != "active" or not claim["current"] or claim["used"] >= claim["max_uses"]:
                raise Conflict("the provisioning claim is revoked, expired or used up")
            quota = conn.execute(
                "SELECT t.max_devices, (SELECT count(*) FROM devices d WHERE d.tenant_id = t.tenant_id) AS devices"
                " FROM tenants t WHERE t.tenant_id = %s AND t.status = 'active'",
                (tenant,),
            ).fetchone()
            if quota is None or (quota["max_devices"] is not None and quota["devices"] >= quota["max_devices"]):
                raise Conflict("the tenant is suspended or its device quota is reached")
            conn.execute("UPDATE provisioning_claims SET used = used + 1 WHERE claim_id = %s", (claim_id,))
            conn.execute(
                "INSERT INTO devices (device_id, tenant_id, tags, claim_id) VALUES (%s, %s, %s, %s)",
                (device, tenant, claim["tags"], claim_id),
            )
            if claim["group_id"]:
                conn.execute(
                    "INSERT INTO device_group_members (tenant_id, group_id, device_id) SELECT %s, %s, %s"
                    " WHERE EXISTS (SELECT 1 FROM device_groups WHERE tenant_id = %s AND group_id = %s)",
                    (tenant, claim["group_id"], device, tenant, claim["group_id"]),
                )
            return self._issue(
                conn, request, request.public_key(), tenant, device, days, actor, "certificate_provisioned",
                claim=claim_id,
            )  # fmt: skip

    def _issued_for_key(
        self, conn: psycopg.Connection[Any], device: str, request: x509.CertificateSigningRequest
    ) -> IssuedCertificate | None:
        wanted = px.public_key_der(request.public_key())
        for row in conn.execute(
            "SELECT serial, tenant_id, cert_pem, not_after FROM pki_certificates"
            " WHERE device_id = %s AND status = 'active' ORDER BY created_at DESC",
            (device,),
        ).fetchall():
            if px.public_key_der(px.load_certificate(row["cert_pem"]).public_key()) == wanted:
                tenant = row["tenant_id"]
                ca_pem, _ = self._authority_row(conn, f"tenant:{tenant}")
                chain = ca_pem + self._root_pem(conn)
                return IssuedCertificate(row["serial"], tenant, device, row["not_after"], row["cert_pem"], chain)
        return None

    def renew(self, serial: str, days: int, actor: str, csr: bytes | None = None) -> IssuedCertificate:
        """A new certificate for an active one's device: for the same key, or for a new CSR's key."""
        with self._connect() as conn, conn.transaction():
            row = conn.execute(
                "SELECT tenant_id, device_id, cert_pem, status FROM pki_certificates WHERE serial = %s",
                (serial.lower(),),
            ).fetchone()
            if row is None:
                raise NotFound(f"no certificate with serial {serial}")
            if row["status"] != "active":
                raise Conflict(f"certificate {serial} is revoked; enrol the device again with a new CSR")
            device = row["device_id"]
            self._device_tenant(conn, device)
            request = None
            if csr is not None:
                request = px.load_csr(csr)
                px.check_device_csr(request, device)
            key = request.public_key() if request else px.load_certificate(row["cert_pem"]).public_key()
            return self._issue(
                conn, request, key, row["tenant_id"], device, days, actor, "certificate_renewed", renews=serial.lower()
            )

    def revoke(self, serial: str, reason: str, actor: str) -> None:
        check_reason(reason)
        with self._connect() as conn, conn.transaction():
            tenant = self._revoke(conn, serial.lower(), reason, actor)
        self._revoked(tenant, serial.lower())

    def revoke_device(self, device: str, reason: str, actor: str) -> list[str]:
        """Revoke every active certificate of ``device`` in one transaction; return their serials."""
        check_reason(reason)
        with self._connect() as conn, conn.transaction():
            rows = conn.execute(
                "SELECT serial FROM pki_certificates WHERE device_id = %s AND status = 'active' FOR UPDATE",
                (device,),
            ).fetchall()
            if not rows:
                raise NotFound(f"device {device} has no active certificate")
            revoked = [(self._revoke(conn, r["serial"], reason, actor), r["serial"]) for r in rows]
        for tenant, serial in revoked:
            self._revoked(tenant, serial)
        return [serial for _, serial in revoked]

    @staticmethod
    def _revoke(conn: psycopg.Connection[Any], serial: str, reason: str, actor: str) -> str:
        row = conn.execute(
            "UPDATE pki_certificates SET status = 'revoked', revoked_at = now(), revocation_reason = %s"
            " WHERE serial = %s AND status = 'active' RETURNING tenant_id, device_id",
            (reason, serial),
        ).fetchone()
        if row is None:
            raise NotFound(f"no active certificate with serial {serial}")
        audit(conn, actor, "certificate_revoked", tenant=row["tenant_id"], device=row["device_id"], serial=serial,
              reason=reason)  # fmt: skip
        return str(row["tenant_id"])

    def crl(self, tenant: str) -> bytes:
        with self._connect() as conn, conn.transaction():
            self._authority_row(conn, f"tenant:{tenant}")
            revoked = [
                px.Revoked(r["serial"], r["revoked_at"], r["revocation_reason"])
                for r in conn.execute(
                    "SELECT serial, revoked_at, revocation_reason FROM pki_certificates"
                    " WHERE issuer_ca = %s AND status = 'revoked' ORDER BY revoked_at",
                    (f"tenant:{tenant}",),
                )
            ]
            return self._crl(conn, tenant, revoked)

    def list(
        self, *, tenant: str | None = None, device: str | None = None, status: str | None = None
    ) -> list[dict[str, Any]]:
        with self._connect() as conn:
            return conn.execute(
                "SELECT serial, tenant_id, device_id, status, not_before, not_after, revoked_at, revocation_reason,"
                " fingerprint_sha256 FROM pki_certificates"
                " WHERE (%(t)s::text IS NULL OR tenant_id = %(t)s) AND (%(d)s::text IS NULL OR device_id = %(d)s)"
                " AND (%(s)s::text IS NULL OR status = %(s)s) ORDER BY created_at",
                {"t": tenant, "d": device, "s": status},
            ).fetchall()
