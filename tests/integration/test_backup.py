"""``kestrel backup`` and ``kestrel restore`` (issue 15, item 7; ADR-0027), for real: an embedded-default state
directory with its own PostgreSQL, a CA, a tenant, an enrolled device and readings; backed up through the CLI,
restored through the CLI into a fresh state directory with a new PostgreSQL cluster; the data reads back, the CA is
the same, and authsvc admits the device with its certificate on the restored database. A wrong passphrase and an
altered file are refused with one clear line, restoring nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from litestar.testing import TestClient

from authsvc.app import AuthsvcSettings, create_app
from kestrel.devtools import seed
from kestrel.devtools.servers import PostgresServer, free_port
from kestrel.store.migrate import migrate
from kestrel_core.settings import Secret
from pki.builtin import BuiltinCA
from tests.integration.test_authsvc import PASSPHRASE, body, enrol

pytestmark = pytest.mark.integration
KEY = "broker-key-" + uuid.uuid4().hex


def kestrel(state: Path, *args: str, passphrase: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KESTREL_STATE_DIR=str(state), KESTREL_BACKUP_PASSPHRASE=passphrase)
    env.pop("KESTREL_DATABASE_URL", None)
    return subprocess.run([sys.executable, "-m", "kestrel", *args], capture_output=True, text=True, timeout=300,
                          env=env, check=False)  # fmt: skip


def counts(url: str, tenant: str) -> tuple[int, int, str]:
    with psycopg.connect(url) as conn:
        devices = conn.execute("SELECT count(*) FROM devices WHERE tenant_id = %s", (tenant,)).fetchone()
        readings = conn.execute("SELECT count(*) FROM telemetry WHERE tenant_id = %s", (tenant,)).fetchone()
        root = conn.execute("SELECT cert_pem FROM pki_authorities WHERE kind = 'root'").fetchone()
    assert devices and readings and root
    return int(devices[0]), int(readings[0]), str(root[0])


def test_a_backup_restores_into_a_fresh_state_directory_with_its_data_and_identities(tmp_path: Path) -> None:
    state, restored = tmp_path / "state", tmp_path / "restored"
    postgres = PostgresServer(name="postgres", log_path=state / "logs" / "postgres.log", root=state / "postgres",
                              port=free_port())  # fmt: skip
    postgres.start()
    try:
        migrate(postgres.url)
        ca = BuiltinCA(postgres.url, PASSPHRASE)
        ca.init_root("test")
        tenant, device = "bk-" + uuid.uuid4().hex[:8], "bk-device-1"
        seed.create_tenant(postgres.url, tenant)
        seed.create_devices(postgres.url, tenant, [device])
        ca.create_tenant_ca(tenant, "test")
        cert = enrol(postgres.url, device)
        with psycopg.connect(postgres.url) as conn:
            conn.execute("SELECT telemetry_ensure_partitions(now() - interval '1 day', now())")
            conn.execute(
                "INSERT INTO telemetry (tenant_id, device_id, stream, ts, seq, metrics, received_at)"
                " SELECT %s, %s, '', now() - make_interval(secs => i), i, jsonb_build_object('temp', i), now()"
                " FROM generate_series(1, 500) AS i", (tenant, device),
            )  # fmt: skip
        (state / "kestrel.env").write_text(f"KESTREL_DATABASE_URL={postgres.url}\n")
        (state / "admin-token").write_text("kst_admin_secret_token\n")
        (state / "pki-passphrase").write_text(PASSPHRASE + "\n")
        before = counts(postgres.url, tenant)
        assert before[:2] == (1, 500)

        out = tmp_path / "kestrel.kbk"
        made = kestrel(state, "backup", str(out), passphrase="correct horse battery staple")
        assert made.returncode == 0, made.stderr
        assert oct(out.stat().st_mode & 0o777) == "0o600"
        data = out.read_bytes()
        for clear in (tenant.encode(), b"kst_admin_secret_token", b"BEGIN CERTIFICATE", PASSPHRASE.encode()):
            assert clear not in data  # encrypted, dump and state alike
    finally:
        postgres.stop()

    wrong = kestrel(restored, "restore", str(out), "--postgres-port", str(free_port()), passphrase="not the phrase!!")
    assert wrong.returncode == 2 and wrong.stderr.strip().count("\n") == 0, wrong.stderr
    assert ("wrong passphrase" in wrong.stderr and not restored.exists()) or not any(restored.iterdir())
    altered = tmp_path / "altered.kbk"
    altered.write_bytes(data[:-40] + bytes(b ^ 1 for b in data[-40:]))
    refused = kestrel(restored, "restore", str(altered), "--postgres-port", str(free_port()),
                      passphrase="correct horse battery staple")  # fmt: skip
    assert refused.returncode == 2 and "altered or truncated" in refused.stderr, refused.stderr

    port = free_port()
    done = kestrel(
        restored, "restore", str(out), "--postgres-port", str(port), passphrase="correct horse battery staple"
    )
    assert done.returncode == 0, done.stderr
    assert (restored / "admin-token").read_text() == "kst_admin_secret_token\n"
    assert not (restored / "kestrel.env").exists()  # regenerated by `kestrel run`
    again = PostgresServer(name="postgres", log_path=restored / "logs" / "postgres.log", root=restored / "postgres",
                           port=port)  # fmt: skip
    again.start()
    try:
        assert counts(again.url, tenant) == before
        assert migrate(again.url) == []  # the schema came back at its version
        settings = AuthsvcSettings(broker_key=Secret(KEY))
        with TestClient(create_app(settings, again.url)) as client:
            answer = client.post("/mqtt/authn", json=body(cert, device), headers={"x-authsvc-key": KEY}).json()
        assert answer["result"] == "allow" and answer["client_attrs"] == {"tns": tenant, "dev": device}
    finally:
        again.stop()
