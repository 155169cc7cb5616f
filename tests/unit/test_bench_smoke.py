"""bench/smoke.py's verdict: a benchmark that fails, prints no ratio or prints a nonsense ratio fails make test."""

from __future__ import annotations

import importlib.util

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("bench_smoke", REPO / "bench" / "smoke.py")
assert _spec is not None and _spec.loader is not None
smoke = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(smoke)


def test_a_run_with_positive_ratios_passes() -> None:
    out = "  ratio to Mosquitto ceiling:      0.70\n  ratio to the ceiling: 0.12\n"
    assert smoke.ratios(out) == [0.70, 0.12]
    assert smoke.check("run.py", 0, out) is None


def test_failures_are_named() -> None:
    assert smoke.check("x.py", 1, "ratio to the ceiling: 1.0") == "x.py exited 1"
    assert smoke.check("x.py", 0, "done, nothing compared") == "x.py printed no ratio to a ceiling"
    assert "not a positive number" in (smoke.check("x.py", 0, "ratio to the ceiling: 0.00") or "")
    assert "not a positive number" in (smoke.check("x.py", 0, "ratio to the ceiling: nan") or "")


def test_every_benchmark_is_in_the_smoke_run() -> None:
    helpers = {"smoke.py", "scale.py", "httpload.py", "sink.py", "webhook_sink.py"}
    scripts = {p.name for p in (REPO / "bench").glob("*.py")} - helpers
    assert scripts == set(smoke.SCRIPTS)
