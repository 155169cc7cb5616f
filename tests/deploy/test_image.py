"""The services' image (issue 15, ADR-0023): the Dockerfile passes hadolint and keeps its invariants (pinned bases,
multi-stage, an unprivileged user, no build tools or device SDK in the run stage). No Docker engine runs here, so
the image is built by the CI workflow (.github/workflows/ci.yml), not by this suite."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

DOCKERFILE = REPO / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"


def test_the_dockerfile_passes_hadolint() -> None:
    run = subprocess.run([str(HADOLINT), "--failure-threshold", "info", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr


def test_hadolint_catches_what_it_should(tmp_path: Path) -> None:
    """The control: an unpinned base and a root user are findings."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nUSER root\n")
    run = subprocess.run([str(HADOLINT), str(bad)], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode != 0 and "DL3007" in run.stdout and "DL3002" in run.stdout


def test_the_image_is_multi_stage_pinned_unprivileged_and_lean() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?$", text, flags=re.M)
    assert [alias for _, alias in stages] == ["assets", "build", ""]
    bases = dict(re.findall(r"^ARG (\w+_IMAGE)=(\S+)$", text, flags=re.M))
    assert all(re.search(r":\d+\.\d+\.\d+-", image) for image in bases.values()), bases  # exact releases
    run_stage = text.rsplit("\nFROM ", 1)[1]
    assert "USER 10001:10001" in run_stage
    assert "pip install" not in run_stage and "apt-get" not in run_stage  # nothing built or fetched at run time
    assert "rm -rf /opt/kestrel/lib/python3.11/site-packages/kestrel_device" in text  # the device SDK stays out
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert ignored[1] == "*" and "!.kestrel/**" not in ignored  # deny by default: no state or secrets in the context
