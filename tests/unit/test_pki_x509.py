"""The CA hierarchy's X.509 rules, checked with cryptography's verifier and with openssl."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from kestrel_core.errors import InvalidInput, Unauthenticated
from pki import x509 as px
from tests.conftest import openssl_verify


def csr_for(cn: str | None, key: object = None, extra_cn: str | None = None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    attrs = [] if cn is None else [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if extra_cn:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, extra_cn))
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs)).sign(key, hashes.SHA256())  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def hierarchy() -> tuple[px.CAKey, x509.Certificate, px.CAKey, x509.Certificate]:
    root_key = px.new_ca_key()
    root = px.create_root(root_key)
    ca_key = px.new_ca_key()
    return root_key, root, ca_key, px.create_tenant_ca("acme", ca_key, root_key, root)


def issue(
    hierarchy: tuple[px.CAKey, x509.Certificate, px.CAKey, x509.Certificate], device: str = "dev-1"
) -> x509.Certificate:
    _, _, ca_key, ca = hierarchy
    csr = px.load_csr(csr_for(device))
    px.check_device_csr(csr, device)
    return px.issue_device_certificate(csr.public_key(), px.DeviceProfile("acme", device, 30), ca_key, ca)


def test_device_certificate_verifies_as_a_client_certificate(hierarchy) -> None:  # type: ignore[no-untyped-def]
    _, root, _, ca = hierarchy
    leaf = issue(hierarchy)
    verifier = PolicyBuilder().store(Store([root])).build_client_verifier()
    verified = verifier.verify(leaf, [ca])
    assert verified.chain[-1] == root
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-1"
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:kestrel:device:dev-1"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= dt.timedelta(days=30, minutes=5)


def test_openssl_accepts_the_chain_for_client_auth(hierarchy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, root, _, ca = hierarchy
    leaf = issue(hierarchy)
    (tmp_path / "leaf.pem").write_text(px.pem(leaf))
    result = openssl_verify(px.pem(ca) + px.pem(root), tmp_path / "leaf.pem", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK")


def test_tenant_ca_cannot_sign_other_cas(hierarchy) -> None:  # type: ignore[no-untyped-def]
    _, _, _, ca = hierarchy
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0


def test_another_tenants_ca_does_not_verify(hierarchy) -> None:  # type: ignore[no-untyped-def]
    _, root, _, _ = hierarchy
    other_root_key = px.new_ca_key()
    other_root = px.create_root(other_root_key, "Other Root")
    other_key = px.new_ca_key()
    other_ca = px.create_tenant_ca("evil", other_key, other_root_key, other_root)
    csr = px.load_csr(csr_for("dev-1"))
    forged = px.issue_device_certificate(csr.public_key(), px.DeviceProfile("evil", "dev-1"), other_key, other_ca)
    verifier = PolicyBuilder().store(Store([root])).build_client_verifier()
    with pytest.raises(Exception, match=r"candidates exhausted|unable to find|issuer"):
        verifier.verify(forged, [other_ca])


@pytest.mark.parametrize(
    ("csr", "device", "reason"),
    [
        (b"not a csr", "dev-1", "bad_csr"),
        (b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "dev-1", "bad_csr"),
    ],
    ids=["garbage", "broken-pem"],
)
def test_malformed_csrs(csr: bytes, device: str, reason: str) -> None:
    with pytest.raises(InvalidInput) as info:
        px.load_csr(csr)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("cn", "extra", "device", "reason"),
    [
        ("dev-2", None, "dev-1", "csr_cn_mismatch"),
        (None, None, "dev-1", "csr_cn_mismatch"),
        ("dev-1", "dev-2", "dev-1", "csr_cn_mismatch"),
        ("dev-1", None, "dev/1", "bad_device_id"),
    ],
    ids=["other-device", "no-cn", "two-cns", "bad-device-id"],
)
def test_csr_must_name_exactly_the_device(cn: str | None, extra: str | None, device: str, reason: str) -> None:
    csr = px.load_csr(csr_for(cn, extra_cn=extra))
    with pytest.raises(InvalidInput) as info:
        px.check_device_csr(csr, device)
    assert info.value.reason == reason


def test_weak_keys_are_refused() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - the point of the test
    with pytest.raises(InvalidInput) as info:
        px.check_device_csr(px.load_csr(csr_for("dev-1", weak)), "dev-1")
    assert info.value.reason == "weak_key"
    ok = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    px.check_device_csr(px.load_csr(csr_for("dev-1", ok)), "dev-1")


def test_ca_keys_are_only_stored_encrypted() -> None:
    key = px.new_ca_key()
    encrypted = px.encrypt_key(key, "correct horse battery staple")
    assert encrypted.startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert px.decrypt_key(encrypted, "correct horse battery staple").private_numbers() == key.private_numbers()
    with pytest.raises(Unauthenticated):
        px.decrypt_key(encrypted, "wrong passphrase, long enough")
    with pytest.raises(InvalidInput):
        px.encrypt_key(key, "short")


def test_crl_lists_revoked_serials_with_reasons(hierarchy) -> None:  # type: ignore[no-untyped-def]
    _, _, ca_key, ca = hierarchy
    leaf = issue(hierarchy)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    crl = px.build_crl([px.Revoked(px.serial_hex(leaf), now, "key_compromise")], ca_key, ca, 7)
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    entry = crl.get_revoked_certificate_by_serial_number(leaf.serial_number)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 7


def test_lifetime_bounds(hierarchy) -> None:  # type: ignore[no-untyped-def]
    _, _, ca_key, ca = hierarchy
    csr = px.load_csr(csr_for("dev-1"))
    for days in (0, px.MAX_DEVICE_DAYS + 1):
        with pytest.raises(InvalidInput):
            px.issue_device_certificate(csr.public_key(), px.DeviceProfile("acme", "dev-1", days), ca_key, ca)
