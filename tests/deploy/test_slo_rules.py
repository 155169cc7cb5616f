"""The SLOs' Prometheus rules (issue 15, ADR-0024): promtool checks them and runs their unit tests (each alert fires
on the burn it is for, stays quiet on a healthy service beside one that must fire); a broken threshold fails those
tests; every alert links a runbook that exists and names the checks and commands to run."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from kestrel.devtools import slo
from tests.conftest import REPO

RULES = REPO / "helm" / "kestrel" / "files" / "prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def promtool(*args: str, cwd: Path = RULES) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, check=False, cwd=cwd)


def test_the_rules_are_valid_and_their_unit_tests_pass() -> None:
    checked = promtool("check", "rules", "slo-rules.yaml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(slo.SLOS) * (len(slo.WINDOWS) + len(slo.BURNS))} rules found" in checked.stdout
    tested = promtool("test", "rules", "slo-rules.test.yaml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_a_wrong_threshold_fails_the_unit_tests(tmp_path: Path) -> None:
    """The control: page ten times later than the budget says, and the tests that expect a page fail."""
    broken = slo.render().replace("> 0.0144 and", "> 0.144 and")
    assert broken != slo.render()
    (tmp_path / "slo-rules.yaml").write_text(broken)
    shutil.copy(RULES / "slo-rules.test.yaml", tmp_path)
    tested = promtool("test", "rules", "slo-rules.test.yaml", cwd=tmp_path)
    output = tested.stdout + tested.stderr
    assert tested.returncode != 0 and "FAILED" in output and "BurnFast" in output, output


def test_every_alert_links_a_runbook_with_checks_commands_and_recovery() -> None:
    groups = yaml.safe_load((RULES / "slo-rules.yaml").read_text())["groups"]
    alerts = [rule for group in groups for rule in group["rules"] if "alert" in rule]
    assert len(alerts) == len(slo.SLOS) * len(slo.BURNS)
    for alert in alerts:
        runbook = REPO / alert["annotations"]["runbook_url"]
        assert runbook.is_file(), alert["alert"]
        text = runbook.read_text()
        for heading in ("## Symptoms", "## Checks", "## Recovery"):
            assert heading in text, (runbook.name, heading)
        assert "```" in text, runbook.name  # commands to run, not prose only
