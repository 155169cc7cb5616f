"""Vault/OpenBao PKI as the signing backend (ADR-0011), through ``hvac``.

Layout in OpenBao: the root CA in mount ``{prefix}-root`` (role ``server`` for broker certificates); one
mount per tenant, ``{prefix}-t-{tenant}``, holding that tenant's intermediate (path length 0, generated
inside OpenBao: its key never leaves it) and the role ``device`` (clientAuth only, CN from the CSR, the
device URI SAN only). PostgreSQL keeps the same record as with the built-in CA, so authsvc is unchanged;
revocations go to both, and the CRL is OpenBao's.
"""

from __future__ import annotations

from typing import Any

import hvac
import psycopg
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

from kestrel_core.errors import InvalidInput, Unavailable
from pki import x509 as px
from pki.authority import DatabaseCA
from pki.records import NewAuthority

DEVICE_ROLE = "device"
SERVER_ROLE = "server"


def vault_serial(serial_hex: str) -> str:
    """Our lower-case hex serial as OpenBao writes it: colon-separated bytes."""
    raw = bytes.fromhex(serial_hex.zfill(len(serial_hex) + len(serial_hex) % 2))
    return ":".join(f"{b:02x}" for b in raw)


class OpenBaoCA(DatabaseCA):
    backend = "openbao"

    def __init__(self, conninfo: str, addr: str, token: str, prefix: str = "kestrel", timeout: float = 10.0) -> None:
        super().__init__(conninfo)
        self.client = hvac.Client(url=addr, token=token, timeout=timeout)
        self.prefix = prefix

    def _mount(self, tenant: str | None) -> str:
        return f"{self.prefix}-root" if tenant is None else f"{self.prefix}-t-{tenant}"

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """One OpenBao request with its failures turned into our vocabulary (never leaking the token)."""
        try:
            return fn(*args, **kwargs)
        except hvac.exceptions.InvalidRequest as exc:
            raise InvalidInput("openbao_refused", f"OpenBao refused to {what}: {exc}") from exc
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            raise Unavailable(f"OpenBao could not {what}: {type(exc).__name__}") from exc

    def _enable(self, mount: str, max_ttl: str) -> None:
        mounts = self._call("list mounts", self.client.sys.list_mounted_secrets_engines)
        if f"{mount}/" not in mounts.get("data", mounts):
            self._call(
                f"enable {mount}",
                self.client.sys.enable_secrets_engine,
                backend_type="pki",
                path=mount,
                config={"max_lease_ttl": max_ttl},
            )

    @staticmethod
    def _cert(response: dict[str, Any]) -> x509.Certificate:
        return x509.load_pem_x509_certificate(response["data"]["certificate"].encode())

    # ------------------------------------------------------------------------------- hooks

    def _new_root(self) -> NewAuthority:
        mount = self._mount(None)
        self._enable(mount, f"{px.ROOT_DAYS * 24}h")
        response = self._call(
            "generate the root CA",
            self.client.secrets.pki.generate_root,
            type="internal",
            common_name="Kestrel Root CA",
            extra_params={
                "key_type": "ec",
                "key_bits": 256,
                "ttl": f"{px.ROOT_DAYS * 24}h",
                "organization": px.ORGANISATION,
                "max_path_length": 1,
                "issuer_name": "root",
            },
            mount_point=mount,
        )
        self._call(
            "create the server role",
            self.client.secrets.pki.create_or_update_role,
            SERVER_ROLE,
            extra_params={
                "allow_any_name": True,
                "allow_ip_sans": True,
                "allow_localhost": True,
                "server_flag": True,
                "client_flag": False,
                "key_type": "any",
                "use_csr_sans": False,  # the names we ask for, not what a CSR carries
                "key_usage": ["DigitalSignature", "KeyAgreement"],
                "max_ttl": f"{px.MAX_DEVICE_DAYS * 24}h",
                "not_before_duration": "300s",
            },
            mount_point=mount,
        )
        return NewAuthority(self._cert(response), None)

    def _new_tenant_ca(self, conn: psycopg.Connection[Any], tenant: str) -> NewAuthority:
        mount = self._mount(tenant)
        self._enable(mount, f"{px.TENANT_CA_DAYS * 24}h")
        csr = self._call(
            "generate the tenant CA key",
            self.client.secrets.pki.generate_intermediate,
            type="internal",
            common_name=f"Kestrel tenant CA {tenant}",
            extra_params={"key_type": "ec", "key_bits": 256, "organization": px.ORGANISATION, "ou": tenant},
            mount_point=mount,
        )["data"]["csr"]
        signed = self._call(
            "sign the tenant CA",
            self.client.secrets.pki.sign_intermediate,
            csr=csr,
            common_name=f"Kestrel tenant CA {tenant}",
            extra_params={"ttl": f"{px.TENANT_CA_DAYS * 24}h", "max_path_length": 0, "use_csr_values": True},
            mount_point=self._mount(None),
        )
        cert = self._cert(signed)
        self._call(
            "install the tenant CA",
            self.client.secrets.pki.set_signed_intermediate,
            certificate=px.pem(cert),
            mount_point=mount,
        )
        self._call(
            "create the device role",
            self.client.secrets.pki.create_or_update_role,
            DEVICE_ROLE,
            extra_params={
                "allow_any_name": True,
                "enforce_hostnames": False,
                "allow_ip_sans": False,
                "allowed_uri_sans": ["urn:kestrel:device:*"],
                "server_flag": False,
                "client_flag": True,
                "key_type": "any",
                "key_usage": ["DigitalSignature"],
                "organization": [tenant],
                "use_csr_common_name": True,
                "use_csr_sans": False,
                "max_ttl": f"{px.MAX_DEVICE_DAYS * 24}h",
                "not_before_duration": "300s",
            },
            mount_point=mount,
        )
        return NewAuthority(cert, None)

    def _sign_device(
        self,
        conn: psycopg.Connection[Any],
        tenant: str,
        csr: x509.CertificateSigningRequest | None,
        public_key: CertificatePublicKeyTypes,
        device: str,
        days: int,
    ) -> x509.Certificate:
        if csr is None:
            raise InvalidInput("renew_needs_csr", "OpenBao signs CSRs only: renew with --csr FILE from the device")
        response = self._call(
            "sign the device certificate",
            self.client.secrets.pki.sign_certificate,
            name=DEVICE_ROLE,
            csr=csr.public_bytes(serialization.Encoding.PEM).decode(),
            common_name=device,
            extra_params={"ttl": f"{days * 24}h", "uri_sans": px.device_uri(device), "format": "pem"},
            mount_point=self._mount(tenant),
        )
        cert = self._cert(response)
        if cert.public_key() != public_key:  # pragma: no cover - OpenBao signs the CSR's key
            raise Unavailable("OpenBao returned a certificate for another key")
        return cert

    def _sign_server(
        self, conn: psycopg.Connection[Any], key: ec.EllipticCurvePrivateKey, hosts: list[str],
        addresses: list[str], days: int,
    ) -> x509.Certificate:  # fmt: skip
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (hosts or addresses)[0])]))
            .sign(key, hashes.SHA256())
        )
        response = self._call(
            "sign the server certificate",
            self.client.secrets.pki.sign_certificate,
            name=SERVER_ROLE,
            csr=csr.public_bytes(serialization.Encoding.PEM).decode(),
            common_name=(hosts or addresses)[0],
            extra_params={
                "alt_names": ",".join(hosts),
                "ip_sans": ",".join(addresses),
                "ttl": f"{days * 24}h",
                "format": "pem",
            },
            mount_point=self._mount(None),
        )
        return self._cert(response)

    def _revoked(self, tenant: str, serial: str) -> None:
        self._call(
            "revoke the certificate",
            self.client.secrets.pki.revoke_certificate,
            serial_number=vault_serial(serial),
            mount_point=self._mount(tenant),
        )

    def _crl(self, conn: psycopg.Connection[Any], tenant: str, revoked: list[px.Revoked]) -> bytes:
        text = self._call("read the CRL", self.client.secrets.pki.read_crl, mount_point=self._mount(tenant))
        return str(text).encode()
