"""The `kestrel` command and the services' start-up, as an operator runs them: exit codes and one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

pytestmark = pytest.mark.integration


def kestrel(
    *args: str, database_url: str | None = None, extra_env: dict[str, str] | None = None, module: str = "kestrel"
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KESTREL_")}
    env["KESTREL_STATE_DIR"] = "/nonexistent-kestrel-state"
    if database_url:
        env["KESTREL_DATABASE_URL"] = database_url
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_migrate_tenant_and_devices(database_url: str) -> None:
    assert kestrel("db", "migrate", database_url=database_url).stdout.strip() == "database is up to date"
    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    assert kestrel("tenant", "create", tenant, database_url=database_url).returncode == 0
    out = kestrel(
        "device", "create", "--tenant", tenant, "--json", f"{tenant}-a", f"{tenant}-b", database_url=database_url
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"tenant": tenant, "created": 2, "devices": [f"{tenant}-a", f"{tenant}-b"]}
    with psycopg.connect(database_url) as conn:
        count = conn.execute("SELECT count(*) FROM devices WHERE tenant_id = %s", (tenant,)).fetchone()
    assert count == (2,)


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (("tenant", "create", "bad/id"), 2, "tenant id must match"),
        (("device", "create", "--tenant", "no-such-tenant", "dev-x"), 1, "tenant no-such-tenant does not exist"),
        (("device", "create", "dev-x"), 2, "Missing option '--tenant'"),
        (("simulate", "--devices", "many"), 2, "Invalid value for '--devices'"),
        (("simulate", "--mqtt-version", "3"), 2, "--mqtt-version must be 4 (3.1.1) or 5"),
        (("run", "--api-port", "70000"), 2, "Invalid value for '--api-port'"),
        (("run", "--api-port", "18081", "--mqtt-port", "18081"), 2, "every port must be different"),
        (("no-such-command",), 2, "No such command"),
        (("command", "send", "dev-x", "ping", "--params", "[" * 50_000 + "]" * 50_000), 2, "nests too deeply"),
        (("device", "shadow", "dev-x", "--set", '{"a":' * 20_000 + "1" + "}" * 20_000), 2, "nests too deeply"),
    ],
    ids=[
        "bad-tenant-id",
        "unknown-tenant",
        "missing-option",
        "bad-int",
        "bad-mqtt-version",
        "port-range",
        "same-port-twice",
        "unknown-command",
        "deep-params",
        "deep-desired",
    ],
)
def test_bad_input_gives_one_line_and_non_zero_exit(
    database_url: str, args: tuple[str, ...], code: int, fragment: str
) -> None:
    result = kestrel(*args, database_url=database_url)
    assert result.returncode == code, result.stderr
    line = one_line(result.stderr)
    assert line.startswith("kestrel: ")
    assert fragment in line


def test_duplicate_tenant_is_a_conflict(database_url: str) -> None:
    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    assert kestrel("tenant", "create", tenant, database_url=database_url).returncode == 0
    again = kestrel("tenant", "create", tenant, database_url=database_url)
    assert again.returncode == 1
    assert one_line(again.stderr) == f"kestrel: tenant {tenant} already exists"


def test_missing_database_setting_is_explained() -> None:
    result = kestrel("db", "migrate")
    assert result.returncode == 2
    assert "KESTREL_DATABASE_URL" in one_line(result.stderr)


def test_unreachable_database_is_one_line_without_secrets() -> None:
    result = kestrel("db", "migrate", database_url="postgresql://kestrel:s3cr3t-pw@127.0.0.1:1/kestrel")
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert "s3cr3t-pw" not in line
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("module", "args", "env", "fragment"),
    [
        ("ingest", ("writer",), {"KESTREL_WRITER_BATCH_SIZE": "lots"}, "KESTREL_WRITER_*"),
        ("ingest", ("bridge",), {"KESTREL_BRIDGE_MQTT_PORT": "not-a-port"}, "KESTREL_BRIDGE_*"),
        ("ingest", ("neither",), {}, "usage: python -m ingest {bridge|writer}"),
        ("api", (), {}, "KESTREL_API_ADMIN_TOKEN is not set"),
        ("api", (), {"KESTREL_API_PORT": "http"}, "KESTREL_API_*"),
    ],
    ids=["writer-bad-int", "bridge-bad-port", "ingest-usage", "api-no-token", "api-bad-port"],
)
def test_services_refuse_bad_settings_with_one_line(
    module: str, args: tuple[str, ...], env: dict[str, str], fragment: str
) -> None:
    result = kestrel(*args, module=module, extra_env=env)
    assert result.returncode == 2, result.stderr
    assert fragment in one_line(result.stderr)


def test_jwt_key_registration(database_url: str, tmp_path: Path) -> None:
    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    assert kestrel("tenant", "create", tenant, database_url=database_url).returncode == 0
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(tmp_path / "k.pem")], check=True)
    subprocess.run(
        ["openssl", "pkey", "-in", str(tmp_path / "k.pem"), "-pubout", "-out", str(tmp_path / "pub.pem")], check=True
    )
    ok = kestrel("device", "jwt-key", str(tmp_path / "pub.pem"), "--tenant", tenant, database_url=database_url)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().startswith("k")
    bad = kestrel("device", "jwt-key", str(tmp_path / "k.pem"), "--tenant", tenant, database_url=database_url)
    assert bad.returncode == 2
    assert "not a PEM public key" in one_line(bad.stderr)
    missing = kestrel("device", "jwt-key", str(tmp_path / "none.pem"), "--tenant", tenant, database_url=database_url)
    assert missing.returncode == 2
    assert "cannot read" in one_line(missing.stderr)
    kid = ok.stdout.strip()
    revoked = kestrel("device", "jwt-key-revoke", kid, database_url=database_url)
    assert revoked.returncode == 0, revoked.stderr
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT status FROM jwt_keys WHERE kid = %s", (kid,)).fetchone() == ("revoked",)
    unknown = kestrel("device", "jwt-key-revoke", "k-nonexistent", database_url=database_url)
    assert unknown.returncode == 1
    assert "no JWT key" in one_line(unknown.stderr)


def test_device_suspend_resume_and_service_principals(database_url: str) -> None:
    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    assert kestrel("tenant", "create", tenant, database_url=database_url).returncode == 0
    assert kestrel("device", "create", "--tenant", tenant, f"{tenant}-d", database_url=database_url).returncode == 0
    suspended = kestrel("device", "suspend", f"{tenant}-d", database_url=database_url)
    assert suspended.returncode == 0, suspended.stderr
    assert suspended.stdout.strip() == f"device {tenant}-d: registered -> suspended"  # no credential yet
    assert kestrel("device", "resume", f"{tenant}-d", database_url=database_url).returncode == 0
    missing = kestrel("device", "suspend", "no-such-device", database_url=database_url)
    assert missing.returncode == 1
    assert "does not exist" in one_line(missing.stderr)

    name = f"svc-{uuid.uuid4().hex[:8]}"
    created = kestrel("service", "create", name, "--role", "ingest", database_url=database_url)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("ksvc_")
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT secret_sha256 FROM service_principals WHERE name = %s", (name,)).fetchone()
    assert row is not None and row[0] == hashlib.sha256(secret.encode()).hexdigest()
    again = kestrel("service", "create", name, "--role", "ingest", database_url=database_url)
    assert again.returncode == 1
    assert "--rotate" in one_line(again.stderr)
    bad_role = kestrel("service", "create", f"{name}-x", "--role", "superuser", database_url=database_url)
    assert bad_role.returncode == 2
    assert "role must be one of" in one_line(bad_role.stderr)
    assert kestrel("service", "revoke", name, database_url=database_url).returncode == 0


def test_operator_commands_for_users_tokens_and_devices(database_url: str, tmp_path: Path) -> None:
    tenant = f"op-{uuid.uuid4().hex[:8]}"
    created = kestrel("tenant", "create", tenant, "--name", "Operators", "--json", database_url=database_url)
    assert json.loads(created.stdout) == {"tenant": tenant, "name": "Operators"}
    listed = json.loads(kestrel("tenant", "list", "--json", database_url=database_url).stdout)
    assert any(t["tenant_id"] == tenant and t["devices"] == 0 for t in listed)

    user = kestrel("user", "create", "ops@example.com", "--tenant", tenant, "--role", "operator", "--json",
                   database_url=database_url)  # fmt: skip
    assert user.returncode == 0, user.stderr
    user_id = json.loads(user.stdout)["user_id"]
    bad = kestrel("user", "create", "not-an-email", "--tenant", tenant, database_url=database_url)
    assert bad.returncode == 2 and "is not an e-mail address" in one_line(bad.stderr)

    token = kestrel("token", "create", "--tenant", tenant, "--scope", "devices:read", "--scope", "telemetry:read",
                    "--user", user_id, "--json", database_url=database_url)  # fmt: skip
    assert token.returncode == 0, token.stderr
    issued = json.loads(token.stdout)
    assert issued["token"].startswith(f"kst_{issued['token_id']}_")
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT secret_sha256, scopes, user_id FROM api_tokens WHERE token_id = %s",
                           (issued["token_id"],)).fetchone()  # fmt: skip
    assert row is not None and issued["token"].split("_", 2)[2] not in row[0]
    assert row[1:] == (["devices:read", "telemetry:read"], user_id)
    wrong = kestrel("token", "create", "--tenant", tenant, "--scope", "root", database_url=database_url)
    assert wrong.returncode == 2 and "scopes must be among" in one_line(wrong.stderr)

    csv_file = tmp_path / "fleet.csv"
    csv_file.write_text("device_id,name,tags\n" + "".join(f"{tenant}-{i},pump {i},site:a;pump\n" for i in range(25)))
    imported = kestrel("device", "import", str(csv_file), "--tenant", tenant, "--json", database_url=database_url)
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout) == {"tenant": tenant, "created": 25}
    again = kestrel("device", "import", str(csv_file), "--tenant", tenant, database_url=database_url)
    assert again.returncode == 1 and "already registered" in again.stderr.strip().splitlines()[-1]
    devices = json.loads(kestrel("device", "list", "--tenant", tenant, "--json", database_url=database_url).stdout)
    assert len(devices) == 25 and devices[0]["tags"] == ["site:a", "pump"]
    (tmp_path / "bad.csv").write_text("id,name\nx,y\n")
    no_header = kestrel("device", "import", str(tmp_path / "bad.csv"), "--tenant", tenant, database_url=database_url)
    assert no_header.returncode == 2 and "needs a header with device_id" in one_line(no_header.stderr)


def test_bulk_import_with_groups_and_jwt_keys(database_url: str, tmp_path: Path) -> None:
    """Thousands of devices in one go: ids, names, tags, groups and device-bound JWT keys, all or none."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: PLC0415

    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    assert kestrel("tenant", "create", tenant, database_url=database_url).returncode == 0
    with psycopg.connect(database_url) as conn:
        for group in ("north", "pumps"):
            conn.execute("INSERT INTO device_groups (tenant_id, group_id) VALUES (%s, %s)", (tenant, group))
    ids = [f"{tenant}-{i:04d}" for i in range(2000)]
    keys = tmp_path / "keys"
    keys.mkdir()
    for device in ids[:10]:
        public = ed25519.Ed25519PrivateKey.generate().public_key()
        (keys / f"{device}.pem").write_bytes(
            public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
    fleet = tmp_path / "fleet.csv"
    fleet.write_text("device_id,tags,groups\n" + "".join(f"{d},site:n,north;pumps\n" for d in ids))
    done = kestrel("device", "import", str(fleet), "--tenant", tenant, "--jwt-keys", str(keys), "--json",
                   database_url=database_url)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["created"] == 2000
    with psycopg.connect(database_url) as conn:
        members = conn.execute(
            "SELECT group_id, count(*) FROM device_group_members WHERE tenant_id = %s GROUP BY 1 ORDER BY 1", (tenant,)
        ).fetchall()
        assert members == [("north", 2000), ("pumps", 2000)]
        statuses = dict(conn.execute(
            "SELECT status, count(*) FROM devices WHERE tenant_id = %s GROUP BY 1", (tenant,)).fetchall())  # fmt: skip
        assert statuses == {"provisioned": 10, "registered": 1990}  # a JWT key is a credential
    unknown = tmp_path / "unknown.csv"
    unknown.write_text(f"device_id,groups\n{tenant}-x,nowhere\n")
    refused = kestrel("device", "import", str(unknown), "--tenant", tenant, database_url=database_url)
    assert refused.returncode == 2 and "does not exist in this tenant" in one_line(refused.stderr)
    with psycopg.connect(database_url) as conn:  # all or none
        assert conn.execute("SELECT 1 FROM devices WHERE device_id = %s", (f"{tenant}-x",)).fetchone() is None


def test_twin_operator_commands(database_url: str) -> None:
    """decommission (and its one-line refusals), shadow, command, claim, presence: what the README shows."""
    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    device = f"{tenant}-pump"
    assert kestrel("tenant", "create", tenant, database_url=database_url).returncode == 0
    assert kestrel("device", "create", "--tenant", tenant, device, database_url=database_url).returncode == 0

    changed = kestrel(
        "device", "shadow", device, "--set", '{"interval": 2, "led": {"on": true}}', database_url=database_url
    )
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout)["desired"] == {"interval": 2, "led": {"on": True}}
    shown = json.loads(kestrel("device", "shadow", device, database_url=database_url).stdout)
    assert shown["version"] == 1 and shown["delta"] == {"interval": 2, "led": {"on": True}}
    bad = kestrel("device", "shadow", device, "--set", "[1]", database_url=database_url)
    assert bad.returncode == 2 and "JSON object" in one_line(bad.stderr)

    sent = kestrel("command", "send", device, "reboot", "--params", '{"delay": 1}', database_url=database_url)
    assert sent.returncode == 0, sent.stderr
    command_id = sent.stdout.strip()
    detail = json.loads(kestrel("command", "show", command_id, database_url=database_url).stdout)
    assert detail["status"] == "queued" and detail["params"] == {"delay": 1}
    assert [e["event"] for e in detail["events"]] == ["queued"]
    assert kestrel("command", "send", device, "bad name", database_url=database_url).returncode == 2

    token = kestrel("claim", "create", "--tenant", tenant, "--max-uses", "3", database_url=database_url)
    assert token.returncode == 0 and token.stdout.startswith("kpc_")
    assert kestrel("claim", "create", "--tenant", tenant, "--max-uses", "0", database_url=database_url).returncode == 2

    listed = json.loads(kestrel("device", "presence", "--tenant", tenant, "--json", database_url=database_url).stdout)
    assert [(p["device_id"], p["online"]) for p in listed] == [(device, False)]

    retired = kestrel("device", "decommission", device, database_url=database_url)
    assert retired.returncode == 0, retired.stderr
    detail = json.loads(kestrel("command", "show", command_id, database_url=database_url).stdout)
    assert detail["status"] == "cancelled"  # its open commands end with it
    again = kestrel("device", "resume", device, database_url=database_url)
    assert again.returncode == 1 and "decommissioned" in one_line(again.stderr)
    twice = kestrel("device", "decommission", device, database_url=database_url)
    assert twice.returncode == 0 and "already decommissioned" in twice.stdout  # idempotent, as the API
    refused = kestrel("command", "send", device, "ping", database_url=database_url)
    assert refused.returncode == 1 and "decommissioned" in one_line(refused.stderr)


def test_the_cli_finds_a_stack_by_its_state_directory(database_url: str, tmp_path: Path) -> None:
    """Issue 10, item 8: `kestrel --state-dir D` (or KESTREL_STATE_DIR=D) reads D/kestrel.env, as `kestrel run
    --state-dir D` wrote it; without one, the error says how to point at a stack."""
    state = tmp_path / "stack"
    state.mkdir()
    (state / "kestrel.env").write_text(f"KESTREL_DATABASE_URL={database_url}\nKESTREL_MQTT_TLS_PORT=1\n")
    by_option = kestrel("--state-dir", str(state), "tenant", "list", "--json")
    assert by_option.returncode == 0, by_option.stderr
    by_env = kestrel("tenant", "list", "--json", extra_env={"KESTREL_STATE_DIR": str(state)})
    assert by_env.returncode == 0 and json.loads(by_env.stdout) == json.loads(by_option.stdout)
    lost = kestrel("tenant", "list")
    assert lost.returncode == 2 and "--state-dir" in one_line(lost.stderr)
