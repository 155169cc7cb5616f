"""X.509 building blocks for Kestrel's CA hierarchy (ADR-0008). Pure functions: no storage, no I/O.

Root CA -> one intermediate CA per tenant (path length 0) -> device certificates with the device id as the
subject CN and in a URI SAN (``urn:kestrel:device:<id>``), clientAuth EKU, short lifetimes.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kestrel_core.errors import Conflict, InvalidInput, Unauthenticated
from kestrel_core.topics import require_id

CAKey = ec.EllipticCurvePrivateKey
ROOT_DAYS: Final = 3650
TENANT_CA_DAYS: Final = 1825
DEVICE_DAYS: Final = 90
MAX_DEVICE_DAYS: Final = 397
ORGANISATION: Final = "Kestrel"
REASONS: Final = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key_compromise": x509.ReasonFlags.key_compromise,
    "ca_compromise": x509.ReasonFlags.ca_compromise,
    "affiliation_changed": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessation_of_operation": x509.ReasonFlags.cessation_of_operation,
    "certificate_hold": x509.ReasonFlags.certificate_hold,
}


def device_uri(device: str) -> str:
    return f"urn:kestrel:device:{device}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def new_ca_key() -> CAKey:
    return ec.generate_private_key(ec.SECP256R1())


def encrypt_key(key: CAKey, passphrase: str) -> str:
    """PKCS#8, encrypted with the best available scheme; the only form a CA key is ever stored in."""
    if len(passphrase) < 16:
        raise InvalidInput("weak_passphrase", "the PKI passphrase must be at least 16 characters")
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase.encode()),
    ).decode()


def decrypt_key(pem: str, passphrase: str) -> CAKey:
    try:
        key = serialization.load_pem_private_key(pem.encode(), passphrase.encode())
    except (ValueError, TypeError) as exc:
        raise Unauthenticated("the PKI passphrase does not open the CA key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidInput("bad_ca_key", "CA keys are EC P-256")
    return key


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """digitalSignature always; keyCertSign and cRLSign only for CAs."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_extensions(builder: x509.CertificateBuilder, key: CAKey, path_length: int | None) -> x509.CertificateBuilder:
    return (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            _key_usage(signs_certificates=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def create_root(key: CAKey, common_name: str = "Kestrel Root CA") -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANISATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=ROOT_DAYS))
    )
    return _ca_extensions(builder, key, path_length=1).sign(key, hashes.SHA256())


def create_tenant_ca(tenant: str, key: CAKey, root_key: CAKey, root: x509.Certificate) -> x509.Certificate:
    require_id("tenant", tenant)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANISATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, tenant),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Kestrel tenant CA {tenant}"),
        ]
    )
    now = _now()
    not_after = min(now + dt.timedelta(days=TENANT_CA_DAYS), root.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
    )
    return _ca_extensions(builder, key, path_length=0).sign(root_key, hashes.SHA256())


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Parse a PEM or DER CSR and check its self-signature; ``InvalidInput`` otherwise."""
    try:
        csr = x509.load_pem_x509_csr(data) if data.lstrip().startswith(b"-----BEGIN") else x509.load_der_x509_csr(data)
    except ValueError as exc:
        raise InvalidInput("bad_csr", "not a PEM or DER certificate signing request") from exc
    try:
        if not csr.is_signature_valid:
            raise InvalidInput("bad_csr", "the CSR's signature does not verify")
    except InvalidSignature as exc:  # pragma: no cover - cryptography reports False instead
        raise InvalidInput("bad_csr", "the CSR's signature does not verify") from exc
    return csr


def check_device_csr(csr: x509.CertificateSigningRequest, device: str) -> None:
    """The CSR must name exactly ``device`` as CN and carry an acceptable key."""
    require_id("device", device)
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or cns[0].value != device:
        found = ", ".join(str(c.value) for c in cns) or "none"
        raise InvalidInput("csr_cn_mismatch", f"the CSR's common name ({found[:80]}) must be the device id {device}")
    key = csr.public_key()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise InvalidInput("weak_key", "RSA keys must be at least 2048 bits")
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name not in ("secp256r1", "secp384r1"):
        raise InvalidInput("weak_key", "EC keys must be P-256 or P-384")
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise InvalidInput("weak_key", "device keys must be EC P-256/P-384, Ed25519 or RSA >= 2048")


@dataclass(frozen=True)
class DeviceProfile:
    tenant: str
    device: str
    days: int = DEVICE_DAYS


def issue_device_certificate(
    public_key: CertificatePublicKeyTypes, profile: DeviceProfile, ca_key: CAKey, ca: x509.Certificate
) -> x509.Certificate:
    """Sign a device certificate for ``public_key`` (from a CSR, or a renewal's previous certificate)."""
    if not 1 <= profile.days <= MAX_DEVICE_DAYS:
        raise InvalidInput("bad_lifetime", f"device certificates live 1 to {MAX_DEVICE_DAYS} days")
    now = _now()
    not_after = min(now + dt.timedelta(days=profile.days), ca.not_valid_after_utc)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, profile.tenant),
            x509.NameAttribute(NameOID.COMMON_NAME, profile.device),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(signs_certificates=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(device_uri(profile.device))]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


_DNS_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def check_server_names(hostnames: list[str], addresses: list[str], days: int) -> None:
    """``InvalidInput`` unless there is at least one valid name and the lifetime is allowed."""
    if not hostnames and not addresses:
        raise InvalidInput("bad_server_name", "a server certificate needs at least one --host or --ip")
    if not 1 <= days <= MAX_DEVICE_DAYS:
        raise InvalidInput("bad_lifetime", f"server certificates live 1 to {MAX_DEVICE_DAYS} days")
    for host in hostnames:
        if len(host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in host.split(".")):
            raise InvalidInput("bad_server_name", f"{host[:80]!r} is not a DNS name")
    for address in addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError as exc:
            raise InvalidInput("bad_server_name", str(exc)) from exc


def backend_mismatch(ca_id: str, holder: str) -> Conflict:
    """A CA whose key another backend holds (configuration error: mixed backends on one database)."""
    return Conflict(f"the {ca_id} CA's key is held by {holder}; use the same PKI backend that created it")


def issue_server_certificate(
    public_key: CertificatePublicKeyTypes,
    hostnames: list[str],
    addresses: list[str],
    days: int,
    ca_key: CAKey,
    ca: x509.Certificate,
) -> x509.Certificate:
    """A broker's TLS server certificate (serverAuth only, so it can never pass as a device)."""
    check_server_names(hostnames, addresses, days)
    names: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANISATION),
                    x509.NameAttribute(NameOID.COMMON_NAME, (hostnames or addresses)[0]),
                ]
            )
        )
        .issuer_name(ca.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


@dataclass(frozen=True)
class Revoked:
    serial: str
    revoked_at: dt.datetime
    reason: str


def build_crl(
    revoked: list[Revoked], ca_key: CAKey, ca: x509.Certificate, crl_number: int, next_update_hours: int = 24
) -> x509.CertificateRevocationList:
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(hours=next_update_hours))
        .add_extension(x509.CRLNumber(crl_number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    for entry in revoked:
        item = (
            x509.RevokedCertificateBuilder()
            .serial_number(int(entry.serial, 16))
            .revocation_date(entry.revoked_at)
            .add_extension(x509.CRLReason(REASONS[entry.reason]), critical=False)
            .build()
        )
        builder = builder.add_revoked_certificate(item)
    return builder.sign(ca_key, hashes.SHA256())


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def load_certificate(text: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(text.encode())


def public_key_der(key: CertificatePublicKeyTypes) -> bytes:
    """The SubjectPublicKeyInfo bytes: equal for equal keys, whatever the key type."""
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
