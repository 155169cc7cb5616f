"""The PKI administrator's workflow through `kestrel pki`, against a real PostgreSQL, checked with openssl."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from kestrel.devtools import seed
from tests.conftest import Tenant, openssl_verify
from tests.integration.test_cli import kestrel, one_line

pytestmark = pytest.mark.integration
PASSPHRASE = "test-pki-passphrase-" + uuid.uuid4().hex


def pki(database_url: str, *args: str, passphrase: str | None = PASSPHRASE) -> subprocess.CompletedProcess[str]:
    env = {"KESTREL_PKI_PASSPHRASE": passphrase} if passphrase else {}
    result = kestrel("pki", *args, database_url=database_url, extra_env=env)
    assert PASSPHRASE not in result.stdout + result.stderr
    assert "PRIVATE KEY" not in result.stdout + result.stderr
    return result


@pytest.fixture
def tenant_with_ca(database_url: str, make_tenant: Callable[[int], Tenant]) -> Tenant:
    init = pki(database_url, "init")
    assert init.returncode == 0 or "root CA already exists" in init.stderr, init.stderr
    tenant = make_tenant(3)
    created = pki(database_url, "tenant-ca", tenant.id)
    assert created.returncode == 0, created.stderr
    return tenant


def make_csr(tmp_path: Path, cn: str) -> tuple[Path, Path]:
    key, csr = tmp_path / f"{cn}.key", tmp_path / f"{cn}.csr"
    subprocess.run(
        [
            "openssl",
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(csr),
            "-subj",
            f"/CN={cn}",
        ],
        check=True,
        capture_output=True,
    )
    return key, csr


def audit(database_url: str, tenant: str) -> list[str]:
    with psycopg.connect(database_url) as conn:
        return [r[0] for r in conn.execute("SELECT action FROM pki_audit WHERE tenant_id = %s ORDER BY id", (tenant,))]


def test_enrol_from_csr_list_renew_revoke_and_crl(database_url: str, tenant_with_ca: Tenant, tmp_path: Path) -> None:
    from pki.builtin import BuiltinCA  # noqa: PLC0415

    device = tenant_with_ca.devices[0]
    _, csr = make_csr(tmp_path, device)
    crt = tmp_path / f"{device}.crt"
    signed = pki(database_url, "sign", str(csr), "--device", device, "--days", "30", "--out", str(crt))
    assert signed.returncode == 0, signed.stderr
    chain = BuiltinCA(database_url, PASSPHRASE).chain(tenant_with_ca.id)
    verified = openssl_verify(chain, crt, tmp_path)
    assert verified.returncode == 0, verified.stderr

    listed = json.loads(pki(database_url, "list", "--tenant", tenant_with_ca.id, "--json").stdout)
    assert [(c["device_id"], c["status"]) for c in listed] == [(device, "active")]
    serial = listed[0]["serial"]

    renewed = pki(database_url, "renew", serial, "--out", str(tmp_path / "renewed.crt"))
    assert renewed.returncode == 0, renewed.stderr
    old_key = subprocess.run(
        ["openssl", "x509", "-in", str(crt), "-noout", "-pubkey"], capture_output=True, text=True, check=True
    )
    new_key = subprocess.run(
        ["openssl", "x509", "-in", str(tmp_path / "renewed.crt"), "-noout", "-pubkey"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert old_key.stdout == new_key.stdout  # same device key, new certificate

    revoked = pki(database_url, "revoke", serial, "--reason", "key_compromise")
    assert revoked.returncode == 0, revoked.stderr
    crl = pki(database_url, "crl", "--tenant", tenant_with_ca.id, "--out", str(tmp_path / "crl.pem"))
    assert crl.returncode == 0, crl.stderr
    text = subprocess.run(
        ["openssl", "crl", "-in", str(tmp_path / "crl.pem"), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert serial.upper().lstrip("0") in text.replace(":", "").upper()
    assert "Key Compromise" in text
    again = pki(database_url, "renew", serial)
    assert again.returncode == 1
    assert "is revoked" in one_line(again.stderr)
    assert audit(database_url, tenant_with_ca.id) == [
        "tenant_ca_created",
        "certificate_signed",
        "certificate_renewed",
        "certificate_revoked",
    ]


def test_dev_issue_writes_key_cert_and_chain(database_url: str, tenant_with_ca: Tenant, tmp_path: Path) -> None:
    device = tenant_with_ca.devices[1]
    issued = pki(database_url, "issue", device, "--out-dir", str(tmp_path))
    assert issued.returncode == 0, issued.stderr
    assert (tmp_path / f"{device}.key").stat().st_mode & 0o077 == 0
    chain = (tmp_path / "ca-chain.pem").read_text()
    assert openssl_verify(chain, tmp_path / f"{device}.crt", tmp_path).returncode == 0
    by_device = pki(database_url, "revoke", "--device", device, "--reason", "cessation_of_operation")
    assert by_device.returncode == 0, by_device.stderr


def test_refusals_are_one_clear_line(
    database_url: str, tenant_with_ca: Tenant, tmp_path: Path, make_tenant: Callable[[int], Tenant]
) -> None:
    device = tenant_with_ca.devices[2]
    _, other_csr = make_csr(tmp_path, "somebody-else")
    (tmp_path / "garbage.csr").write_text("this is not a CSR")
    cases: list[tuple[tuple[str, ...], dict[str, str | None], int, str]] = [
        (("sign", str(other_csr), "--device", device), {}, 2, "must be the device id"),
        (("sign", str(tmp_path / "garbage.csr"), "--device", device), {}, 2, "not a PEM or DER certificate"),
        (("sign", str(tmp_path / "missing.csr"), "--device", device), {}, 2, "cannot read"),
        (("sign", str(other_csr), "--device", "somebody-else"), {}, 1, "device somebody-else is not registered"),
        (("tenant-ca", "no-such-tenant"), {}, 1, "tenant no-such-tenant does not exist"),
        (("tenant-ca", tenant_with_ca.id), {}, 1, "already has a CA"),
        (("revoke", "abc123", "--reason", "because"), {}, 2, "reason must be one of"),
        (("revoke",), {}, 2, "exactly one of"),
        (("revoke", "abc123"), {}, 1, "no active certificate with serial abc123"),
        (("list",), {"passphrase": None}, 2, "KESTREL_PKI_PASSPHRASE"),
        (
            ("issue", device, "--out-dir", str(tmp_path / "x")),
            {"passphrase": "a-wrong-but-long-passphrase"},
            1,
            "passphrase does not open the CA key",
        ),
    ]
    for args, options, code, fragment in cases:
        result = pki(database_url, *args, **options)  # type: ignore[arg-type]
        assert result.returncode == code, (args, result.stderr)
        assert fragment in one_line(result.stderr), (args, result.stderr)

    no_ca = make_tenant(1)
    _, csr = make_csr(tmp_path, no_ca.devices[0])
    result = pki(database_url, "sign", str(csr), "--device", no_ca.devices[0])
    assert result.returncode == 1
    assert "does not exist; create it with `kestrel pki tenant-ca TENANT`" in one_line(result.stderr)


def test_a_revoked_tenant_ca_signs_nothing(database_url: str, tenant_with_ca: Tenant, tmp_path: Path) -> None:
    assert pki(database_url, "revoke", "--tenant-ca", tenant_with_ca.id, "--reason", "ca_compromise").returncode == 0
    _, csr = make_csr(tmp_path, tenant_with_ca.devices[0])
    result = pki(database_url, "sign", str(csr), "--device", tenant_with_ca.devices[0])
    assert result.returncode == 1
    assert "tenant CA is revoked" in one_line(result.stderr)


def test_suspended_device_gets_no_certificate(database_url: str, tenant_with_ca: Tenant, tmp_path: Path) -> None:
    device = tenant_with_ca.devices[0]
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE devices SET status = 'suspended' WHERE device_id = %s", (device,))
    _, csr = make_csr(tmp_path, device)
    result = pki(database_url, "sign", str(csr), "--device", device)
    assert result.returncode == 1
    assert "is suspended" in one_line(result.stderr)


def test_audit_trail_is_append_only(database_url: str, tenant_with_ca: Tenant) -> None:
    with psycopg.connect(database_url) as conn:
        for statement in ("UPDATE pki_audit SET actor = 'x'", "DELETE FROM pki_audit", "TRUNCATE pki_audit"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                conn.execute(statement)
        stored = conn.execute(
            "SELECT key_encrypted FROM pki_authorities WHERE tenant_id = %s", (tenant_with_ca.id,)
        ).fetchone()
    assert stored is not None
    assert stored[0].startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")


def test_registry_device_in_two_tenants_is_refused(database_url: str, tenant_with_ca: Tenant) -> None:
    """Certificates are per device id, and a device id belongs to one tenant only."""
    from kestrel_core.errors import Conflict  # noqa: PLC0415

    other = f"t-{uuid.uuid4().hex[:8]}"
    seed.create_tenant(database_url, other)
    with pytest.raises(Conflict):
        seed.create_devices(database_url, other, [tenant_with_ca.devices[0]])


def test_bulk_signing_reports_bad_csrs_and_keeps_the_good(
    database_url: str, tenant_with_ca: Tenant, tmp_path: Path
) -> None:
    csrs = tmp_path / "factory"
    csrs.mkdir()
    good = tenant_with_ca.devices
    for device in good:
        make_csr(csrs, device)
    make_csr(tmp_path, good[0])  # a CSR for one device filed under another device's name
    (csrs / "d-not-registered.csr").write_bytes((csrs / f"{good[0]}.csr").read_bytes())
    (csrs / "garbage.csr").write_text("not a CSR")
    out = tmp_path / "certs"
    result = pki(database_url, "sign-batch", str(csrs), "--out-dir", str(out), "--json")
    assert result.returncode == 1
    summary = json.loads(result.stdout)
    assert sorted(s["device"] for s in summary["signed"]) == sorted(good)
    errors = {f["device"]: f["error"] for f in summary["failed"]}
    assert set(errors) == {"d-not-registered", "garbage"}
    assert "common name" in errors["d-not-registered"]
    assert "certificate signing request" in errors["garbage"]
    for device in good:
        verified = openssl_verify_full_chain(out / "ca.pem", out / f"{device}.crt")
        assert verified.returncode == 0, verified.stdout + verified.stderr
    # the progress bar and the summary go to stderr, never into the JSON
    text = pki(database_url, "sign-batch", str(csrs), "--out-dir", str(tmp_path / "again"))
    assert "signing" in text.stderr and "signed 3, failed 2" in text.stderr


def openssl_verify_full_chain(root: Path, full_chain: Path) -> subprocess.CompletedProcess[str]:
    """What a broker does: trust the root only, take the tenant CA from the device's presented chain."""
    certs = full_chain.read_text().split("-----END CERTIFICATE-----")
    leaf = full_chain.with_suffix(".leaf")
    leaf.write_text(certs[0] + "-----END CERTIFICATE-----\n")
    # openssl_verify takes the tenant CA followed by the root
    chain = certs[1].lstrip() + "-----END CERTIFICATE-----\n" + root.read_text()
    return openssl_verify(chain, leaf, full_chain.parent)


def test_concurrent_provisioning_never_exceeds_the_claim(database_url: str, tenant_with_ca: Tenant) -> None:
    """Several provisioner replicas at once: the claim row lock lets exactly max_uses through (ADR-0013)."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    from kestrel_core.errors import Conflict  # noqa: PLC0415
    from kestrel_core.tokens import new_claim_token  # noqa: PLC0415
    from kestrel_device.client import new_device_key  # noqa: PLC0415
    from pki.builtin import BuiltinCA  # noqa: PLC0415

    claim_id, _, digest = new_claim_token()
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO provisioning_claims (claim_id, tenant_id, secret_sha256, max_uses, expires_at, tags)"
            " VALUES (%s, %s, %s, 3, now() + interval '1 hour', '{jit}')",
            (claim_id, tenant_with_ca.id, digest),
        )
    devices = [f"jit-{uuid.uuid4().hex[:8]}" for _ in range(8)]
    csrs = {d: new_device_key(d)[1] for d in devices}

    def attempt(device: str) -> str:
        try:
            BuiltinCA(database_url, PASSPHRASE).provision(claim_id, tenant_with_ca.id, device, csrs[device], 30, "t")
        except Conflict as exc:
            return exc.detail
        return "issued"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(attempt, devices))
    assert outcomes.count("issued") == 3, outcomes
    assert all("used up" in o for o in outcomes if o != "issued")
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT used FROM provisioning_claims WHERE claim_id = %s", (claim_id,)).fetchone() == (3,)
        issued = conn.execute(
            "SELECT count(*) FROM pki_certificates c JOIN devices d USING (device_id) WHERE d.claim_id = %s",
            (claim_id,),
        ).fetchone()
        assert issued == (3,)
    # The same device asking again with the same key (its answer was lost) gets its certificate, no new use.
    first = next(d for d, o in zip(devices, outcomes, strict=True) if o == "issued")
    again = BuiltinCA(database_url, PASSPHRASE).provision(claim_id, tenant_with_ca.id, first, csrs[first], 30, "t")
    assert again.device == first
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT used FROM provisioning_claims WHERE claim_id = %s", (claim_id,)).fetchone() == (3,)
