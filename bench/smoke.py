"""``make bench-smoke``: every benchmark in smoke mode, so none can break unnoticed (``make test`` runs this).

Each must exit 0 and print at least one ratio to a ceiling measured in the same run, every ratio a positive
number. Nothing here looks at a timing: smoke runs are seconds long on whatever the machine is doing.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SCRIPTS = ("run.py", "identity_bench.py", "api_bench.py", "twin_bench.py", "rules_bench.py", "streams_bench.py")
RATIO = re.compile(r"ratio to (?:the )?[^:]*:\s*(-?[0-9.]+(?:e[-+]?[0-9]+)?|nan|inf)", re.IGNORECASE)
TIMEOUT_S = 300


def ratios(output: str) -> list[float]:
    """Every "ratio to ...: <number>" a benchmark printed."""
    return [float(value) for value in RATIO.findall(output)]


def check(name: str, returncode: int, output: str) -> str | None:
    """Why a smoke run failed, or None."""
    if returncode != 0:
        return f"{name} exited {returncode}"
    found = ratios(output)
    if not found:
        return f"{name} printed no ratio to a ceiling"
    if not all(math.isfinite(r) and r > 0 for r in found):
        return f"{name} printed a ratio that is not a positive number: {found}"
    return None


def main() -> int:
    failures = []
    for script in SCRIPTS:
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, str(BENCH / script), "--smoke"],
            capture_output=True, text=True, timeout=TIMEOUT_S, check=False, cwd=BENCH.parent,
        )  # fmt: skip
        problem = check(script, result.returncode, result.stdout)
        took = time.monotonic() - started
        if problem is None:
            print(f"bench-smoke: {script} ok ({len(ratios(result.stdout))} ratios, {took:.0f} s)", flush=True)
        else:
            failures.append(problem)
            print(f"bench-smoke: FAILED {problem}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
