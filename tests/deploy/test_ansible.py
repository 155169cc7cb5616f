"""The Ansible install for one to three VMs (issue 15, ADR-0026): both playbooks pass the syntax check and
ansible-lint's production profile, and `site.yml` runs for real on this machine into a temporary prefix (everything
but packages, users and systemd, which `kestrel_manage_system: false` leaves out): twice, the second time changing
nothing; what it wrote is then checked with the real tools (nats-server -t, nft -c, systemd-analyze verify) and
against the broker configuration the test suite runs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kestrel.devtools.servers.mosquitto import BrokerAuth, MosquittoServer
from tests.conftest import REPO

ANSIBLE = REPO / "ansible"
TOOLS = REPO / ".venv-ansible" / "bin"
VENV = Path(sys.executable).parent.parent


def tool(name: str, *args: str, cwd: Path = ANSIBLE) -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{TOOLS}:/usr/bin:/bin:/usr/sbin:/sbin", "ANSIBLE_NOCOLOR": "1", "HOME": str(cwd),
           "ANSIBLE_LOCAL_TEMP": str(cwd / ".ansible-tmp"), "ANSIBLE_REMOTE_TEMP": str(cwd / ".ansible-tmp")}  # fmt: skip
    return subprocess.run([str(TOOLS / name), *args], capture_output=True, text=True, timeout=300, check=False,
                          cwd=ANSIBLE, env=env)  # fmt: skip


def test_the_playbooks_pass_the_syntax_check_and_the_production_lint_profile() -> None:
    syntax = tool("ansible-playbook", "--syntax-check", "-i", "inventory.example.ini", "site.yml", "upgrade.yml")
    assert syntax.returncode == 0, syntax.stdout + syntax.stderr
    lint = tool("ansible-lint", "--offline", "--nocolor", "--profile", "production", "site.yml", "upgrade.yml")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "Profile 'production' was required, and it passed" in lint.stdout + lint.stderr


def test_the_lint_catches_what_it_should(tmp_path: Path) -> None:
    """The control: a task without a name running a shell command that always reports a change fails the profile."""
    bad = ANSIBLE / "lint-control.yml"
    bad.write_text("---\n- hosts: all\n  tasks:\n    - shell: echo hello\n")
    try:
        lint = tool("ansible-lint", "--offline", "--nocolor", "--profile", "production", bad.name)
    finally:
        bad.unlink()
    assert lint.returncode != 0 and "name[missing]" in lint.stdout + lint.stderr


@pytest.fixture(scope="module")
def prefix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ansible-prefix")
    (root / "systemd").mkdir()
    (root / "inventory.ini").write_text(
        "[database]\nlocalhost ansible_connection=local ansible_host=127.0.0.1\n"
        "[nats]\nlocalhost\n[broker]\nlocalhost\n[services]\nlocalhost\n"
    )
    return root


def run_site(root: Path) -> dict[str, int]:
    overrides = {
        "kestrel_manage_system": False, "kestrel_etc": f"{root}/etc", "kestrel_state": f"{root}/state",
        "kestrel_logs": f"{root}/log", "kestrel_systemd_dir": f"{root}/systemd",
        "common_nftables_path": f"{root}/nftables.conf", "common_logrotate_path": f"{root}/logrotate",
        "postgresql_conf_dir": f"{root}/pg", "nats_store": f"{root}/nats",
        # The units name this checkout's interpreter and nats-server, so systemd-analyze finds what they run.
        "kestrel_prefix": str(VENV), "nats_prefix": str(VENV), "ansible_python_interpreter": sys.executable,
    }  # fmt: skip
    run = tool("ansible-playbook", "-i", str(root / "inventory.ini"), "site.yml", "-e", "@tests/vault.example.yml",
               "-e", json.dumps(overrides))  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    recap = re.search(r"localhost\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", run.stdout)
    assert recap, run.stdout[-2000:]
    return dict(zip(("ok", "changed", "unreachable", "failed"), map(int, recap.groups()), strict=True))


def test_site_runs_for_real_into_a_prefix_and_a_second_run_changes_nothing(prefix: Path) -> None:
    first = run_site(prefix)
    assert first["failed"] == 0 and first["changed"] >= 15  # every file it writes
    second = run_site(prefix)
    assert second == {**second, "changed": 0, "failed": 0}
    env = prefix / "etc" / "api.env"
    assert oct(env.stat().st_mode & 0o777) == "0o640"
    assert oct((prefix / "etc" / "mosquitto" / "broker-key").stat().st_mode & 0o777) == "0o600"
    settings = dict(line.split("=", 1) for line in env.read_text().splitlines() if "=" in line and line[0] != "#")
    assert settings["KESTREL_API_DATABASE_URL"].startswith("postgresql://kestrel_api:")
    assert settings["KESTREL_DATABASE_URL"] == ""  # the API never gets the owner's connection


def test_what_it_wrote_passes_the_real_tools(prefix: Path) -> None:
    if not (prefix / "etc" / "nats.conf").exists():
        run_site(prefix)
    nats = subprocess.run([str(VENV / "bin" / "nats-server"), "-t", "-c", str(prefix / "etc" / "nats.conf")],
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert nats.returncode == 0, nats.stdout + nats.stderr
    nft = subprocess.run([shutil.which("nft") or "/usr/sbin/nft", "-c", "-f", str(prefix / "nftables.conf")],
                         capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert nft.returncode == 0, nft.stderr
    units = sorted((prefix / "systemd").glob("*.service"))
    assert len(units) == 9
    for unit in units:
        verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=30,
                                check=False)  # fmt: skip
        assert verify.returncode == 0 and "not executable" not in verify.stderr, (unit.name, verify.stderr)
        text = unit.read_text()
        assert "NoNewPrivileges=true" in text and "ProtectSystem=strict" in text, unit.name


def test_the_broker_is_configured_as_the_test_suites_broker(prefix: Path) -> None:
    """Every directive of the plugin-secured broker the e2e tests run is in the VM's configuration."""
    if not (prefix / "etc" / "mosquitto" / "kestrel.conf").exists():
        run_site(prefix)
    auth = BrokerAuth(authn_url="http://127.0.0.1:1/mqtt/authn", broker_key="k", server_cert=Path("c"),
                      server_key=Path("k"), ca_file=Path("a"), mtls_port=8883, jwt_port=8884,
                      require_subscriptions=("x",))  # fmt: skip
    tested = MosquittoServer(name="m", log_path=prefix / "m.log", root=prefix / "m", auth=auth).config_text()
    ours = (prefix / "etc" / "mosquitto" / "kestrel.conf").read_text()

    def directives(text: str) -> set[str]:
        return {line.split()[0] for line in text.splitlines() if line.strip() and not line.startswith("#")}

    missing = directives(tested) - directives(ours) - {"log_dest", "log_type", "connection_messages"}
    assert missing == set()
    assert "allow_anonymous false" in ours and "require_certificate true" in ours
