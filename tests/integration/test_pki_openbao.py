"""The Vault/OpenBao PKI backend against a real OpenBao (`bao server -dev`): the same hierarchy, record and
audit trail as the built-in CA, keys held by OpenBao, CRLs from OpenBao; authsvc admits its certificates
unchanged and denies them once revoked."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from litestar.testing import TestClient

from authsvc.app import AuthsvcSettings, create_app
from kestrel.devtools import seed
from kestrel.devtools.servers import OpenBaoServer, PostgresServer
from kestrel_core.errors import Conflict, InvalidInput, Unavailable
from kestrel_core.settings import Secret
from pki import x509 as px
from pki.openbao import OpenBaoCA, vault_serial
from tests.conftest import isolated_database, openssl_verify

pytestmark = pytest.mark.integration
KEY = "broker-key-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def ca(postgres: PostgresServer, openbao: OpenBaoServer) -> OpenBaoCA:
    authority = OpenBaoCA(isolated_database(postgres, "bao"), openbao.addr, openbao.token, prefix=uuid.uuid4().hex[:8])
    authority.init_root("test")
    return authority


def _tenant(ca: OpenBaoCA, devices: int = 2) -> tuple[str, list[str]]:
    tag = uuid.uuid4().hex[:8]
    tenant, ids = f"t-{tag}", [f"d-{tag}-{i}" for i in range(devices)]
    seed.create_tenant(ca.conninfo, tenant)
    seed.create_devices(ca.conninfo, tenant, ids)
    ca.create_tenant_ca(tenant, "test")
    return tenant, ids


def _csr(cn: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _authn(db: str, cert_pem: str, clientid: str) -> dict[str, Any]:
    der = x509.load_pem_x509_certificate(cert_pem.encode()).public_bytes(serialization.Encoding.DER)
    body = {"broker": "mosquitto", "clientid": clientid, "cert_pem": base64.b64encode(der).decode()}
    with TestClient(create_app(AuthsvcSettings(broker_key=Secret(KEY)), db)) as client:
        return dict(client.post("/mqtt/authn", json=body, headers={"x-authsvc-key": KEY}).json())


def test_hierarchy_lives_in_openbao_and_is_recorded_here(ca: OpenBaoCA) -> None:
    tenant, _ = _tenant(ca)
    with psycopg.connect(ca.conninfo) as conn:
        rows = conn.execute(
            "SELECT ca_id, backend, key_encrypted, cert_pem FROM pki_authorities ORDER BY kind DESC, ca_id"
        ).fetchall()
        actions = [r[0] for r in conn.execute("SELECT action FROM pki_audit ORDER BY id")]
    by_id = {r[0]: r for r in rows}
    assert by_id["root"][1] == by_id[f"tenant:{tenant}"][1] == "openbao"
    assert by_id["root"][2] is None and by_id[f"tenant:{tenant}"][2] is None  # no key leaves OpenBao
    root = px.load_certificate(by_id["root"][3])
    tenant_ca = px.load_certificate(by_id[f"tenant:{tenant}"][3])
    tenant_ca.verify_directly_issued_by(root)
    assert tenant_ca.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    assert "root_ca_created" in actions and "tenant_ca_created" in actions
    with pytest.raises(Conflict):
        ca.create_tenant_ca(tenant, "test")


def test_device_enrolment_renewal_revocation(ca: OpenBaoCA, tmp_path: Path) -> None:
    tenant, (device, other) = _tenant(ca)
    issued = ca.sign_csr(_csr(device), device, 30, "test")
    cert = px.load_certificate(issued.cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [px.device_uri(device)]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    (tmp_path / "leaf.pem").write_text(issued.cert_pem)
    verified = openssl_verify(issued.chain_pem, tmp_path / "leaf.pem", tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert _authn(ca.conninfo, issued.cert_pem, device)["result"] == "allow"

    # The same checks as the built-in CA guard the CSR before OpenBao sees it.
    with pytest.raises(InvalidInput, match="common name"):
        ca.sign_csr(_csr(other), device, 30, "test")
    with pytest.raises(InvalidInput) as no_csr:
        ca.renew(issued.serial, 30, "test")
    assert no_csr.value.reason == "renew_needs_csr"
    renewed = ca.renew(issued.serial, 30, "test", csr=_csr(device))
    assert renewed.serial != issued.serial

    ca.revoke(issued.serial, "key_compromise", "test")
    crl = x509.load_pem_x509_crl(ca.crl(tenant))
    assert crl.get_revoked_certificate_by_serial_number(int(issued.serial, 16)) is not None
    assert crl.get_revoked_certificate_by_serial_number(int(renewed.serial, 16)) is None
    assert _authn(ca.conninfo, issued.cert_pem, device)["result"] == "deny"
    assert _authn(ca.conninfo, renewed.cert_pem, device)["result"] == "allow"


def test_server_certificate_from_openbao(ca: OpenBaoCA) -> None:
    cert_pem, key_pem = ca.issue_server(["localhost"], ["127.0.0.1"], 30, "test")
    cert = px.load_certificate(cert_pem)
    cert.verify_directly_issued_by(px.load_certificate(ca.root_pem()))
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH not in eku
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert serialization.load_pem_private_key(key_pem.encode(), None).public_key() == cert.public_key()


def test_cli_with_the_openbao_backend(ca: OpenBaoCA, openbao: OpenBaoServer, tmp_path: Path) -> None:
    _, (device, _) = _tenant(ca)
    (tmp_path / "d.csr").write_bytes(_csr(device))
    env = os.environ | {
        "KESTREL_DATABASE_URL": ca.conninfo,
        "KESTREL_PKI_BACKEND": "openbao",
        "KESTREL_PKI_OPENBAO_ADDR": openbao.addr,
        "KESTREL_PKI_OPENBAO_TOKEN": openbao.token,
        "KESTREL_PKI_OPENBAO_PREFIX": ca.prefix,
    }
    run = [sys.executable, "-m", "kestrel", "pki"]
    signed = subprocess.run([*run, "sign", str(tmp_path / "d.csr"), "--device", device], env=env, capture_output=True, text=True, check=False)  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    assert signed.stdout.count("BEGIN CERTIFICATE") == 2  # the device certificate and its tenant CA
    assert openbao.token not in signed.stdout + signed.stderr
    missing = subprocess.run([*run, "list"], env=env | {"KESTREL_PKI_OPENBAO_TOKEN": ""}, capture_output=True, text=True, check=False)  # fmt: skip
    assert missing.returncode != 0
    assert missing.stderr.strip().splitlines() == [
        "kestrel: set KESTREL_PKI_OPENBAO_ADDR and KESTREL_PKI_OPENBAO_TOKEN"
    ]


def test_openbao_unreachable_is_one_clear_error(ca: OpenBaoCA) -> None:
    _, (device, _) = _tenant(ca)
    down = OpenBaoCA(ca.conninfo, "http://127.0.0.1:1", "token", prefix=ca.prefix, timeout=2)
    with pytest.raises(Unavailable, match="OpenBao could not sign the device certificate"):
        down.sign_csr(_csr(device), device, 30, "test")
    with psycopg.connect(ca.conninfo) as conn:  # nothing recorded for a certificate that was never issued
        assert conn.execute("SELECT count(*) FROM pki_certificates WHERE device_id = %s", (device,)).fetchone() == (0,)


def test_vault_serial_format() -> None:
    assert vault_serial("1a2b") == "1a:2b"
    assert vault_serial("a2b") == "0a:2b"
