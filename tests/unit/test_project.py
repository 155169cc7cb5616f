"""The project as a product (issue 17): one version everywhere, a changelog entry for it, the licence text."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import tomllib

import pytest

import kestrel
from kestrel.runtime.logs import announce, configure_logging
from tests.conftest import REPO


def _version(pyproject: str) -> str:
    return str(tomllib.loads((REPO / pyproject).read_text())["project"]["version"])


def test_one_version_number() -> None:
    version = _version("pyproject.toml")
    assert _version("sdk/pyproject.toml") == version  # the SDK ships with the platform it speaks to
    assert kestrel.__version__ == version  # the installed package is this tree's (bootstrap reinstalls on change)
    shown = subprocess.run(
        [sys.executable, "-m", "kestrel", "--version"], capture_output=True, text=True, check=True, timeout=60
    )
    assert shown.stdout.strip() == f"kestrel {version}"


def test_the_changelog_has_an_entry_for_this_version() -> None:
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog
    entry = re.search(rf"^## \[{re.escape(_version('pyproject.toml'))}\] - (\d{{4}}-\d{{2}}-\d{{2}})$", changelog, re.M)
    assert entry, "CHANGELOG.md has no '## [X.Y.Z] - YYYY-MM-DD' entry for the version in pyproject.toml"
    versions = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", changelog, re.M)
    assert versions == sorted(versions, key=lambda v: tuple(map(int, v.split("."))), reverse=True)  # newest first


def test_every_service_says_its_version_first(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("probe")
        announce("probe")
        first = json.loads(capsys.readouterr().err.splitlines()[0])
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    assert (first["service"], first["msg"], first["version"]) == ("probe", "starting", kestrel.__version__)


def test_the_licence_is_the_apache_2_text_and_the_caches_are_ignored() -> None:
    licence = (REPO / "LICENSE").read_text()
    assert licence.split("\n")[1].strip() == "Apache License" and "Version 2.0, January 2004" in licence
    assert "END OF TERMS AND CONDITIONS" in licence and len(licence.splitlines()) == 202
    assert (REPO / "sdk" / "LICENSE").read_text() == licence  # the SDK's distribution carries it too
    assert "NOTICE" in {p.name for p in REPO.iterdir()}
    ignored = set((REPO / ".gitignore").read_text().split())
    assert {".hypothesis/", ".schemathesis/", "*.egg-info/", "node_modules/", ".venv-tools/"} <= ignored
