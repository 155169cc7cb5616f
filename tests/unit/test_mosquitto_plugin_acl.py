"""The Mosquitto plugin's rule parsing and topic matching (C), run through its own test binary.

`broker/mosquitto/tests/acl_test.c` holds the cases (EMQX 5.8 semantics, plus the stricter handling of
'#' in a requested filter); this builds it with the plugin's Makefile and fails on any failed check.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parents[2] / "broker" / "mosquitto"


def test_plugin_acl_checks_pass() -> None:
    build = subprocess.run(["make", "-C", str(PLUGIN_DIR), "-s", "all"], capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stderr
    result = subprocess.run([str(PLUGIN_DIR / "build" / "acl_test")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "all checks passed" in result.stdout
