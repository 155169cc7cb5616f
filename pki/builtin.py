"""The built-in certificate authority: CA keys encrypted (PKCS#8) in PostgreSQL (ADR-0008).

For the embedded default and small installations; production uses Vault/OpenBao (``pki.openbao``).
"""

from __future__ import annotations

from typing import Any

import psycopg
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from pki import x509 as px
from pki.authority import DatabaseCA
from pki.records import NewAuthority


class BuiltinCA(DatabaseCA):
    """``passphrase`` opens the CA keys and is never stored, printed or logged."""

    backend = "builtin"

    def __init__(self, conninfo: str, passphrase: str) -> None:
        super().__init__(conninfo)
        self.passphrase = passphrase

    def _key_and_cert(self, conn: psycopg.Connection[Any], ca_id: str) -> tuple[px.CAKey, x509.Certificate]:
        cert_pem, key_encrypted = self._authority_row(conn, ca_id)
        if key_encrypted is None:
            raise px.backend_mismatch(ca_id, "openbao")
        return px.decrypt_key(key_encrypted, self.passphrase), px.load_certificate(cert_pem)

    def _new_root(self) -> NewAuthority:
        key = px.new_ca_key()
        return NewAuthority(px.create_root(key), px.encrypt_key(key, self.passphrase))

    def _new_tenant_ca(self, conn: psycopg.Connection[Any], tenant: str) -> NewAuthority:
        root_key, root = self._key_and_cert(conn, "root")
        key = px.new_ca_key()
        return NewAuthority(px.create_tenant_ca(tenant, key, root_key, root), px.encrypt_key(key, self.passphrase))

    def _sign_device(
        self,
        conn: psycopg.Connection[Any],
        tenant: str,
        csr: x509.CertificateSigningRequest | None,
        public_key: CertificatePublicKeyTypes,
        device: str,
        days: int,
    ) -> x509.Certificate:
        ca_key, ca = self._key_and_cert(conn, f"tenant:{tenant}")
        return px.issue_device_certificate(public_key, px.DeviceProfile(tenant, device, days), ca_key, ca)

    def _sign_server(
        self, conn: psycopg.Connection[Any], key: ec.EllipticCurvePrivateKey, hosts: list[str],
        addresses: list[str], days: int,
    ) -> x509.Certificate:  # fmt: skip
        root_key, root = self._key_and_cert(conn, "root")
        return px.issue_server_certificate(key.public_key(), hosts, addresses, days, root_key, root)

    def _revoked(self, tenant: str, serial: str) -> None:
        """Our CRLs are built from the database record; nothing else to tell."""

    def _crl(self, conn: psycopg.Connection[Any], tenant: str, revoked: list[px.Revoked]) -> bytes:
        ca_key, ca = self._key_and_cert(conn, f"tenant:{tenant}")
        number = conn.execute("SELECT nextval('pki_crl_number') AS number").fetchone()
        crl = px.build_crl(revoked, ca_key, ca, int(number["number"]) if number else 1)
        return crl.public_bytes(serialization.Encoding.PEM)
