"""Full runs or smoke runs: every benchmark takes ``--smoke`` (seconds, tiny rates), which ``make bench-smoke`` (and
so ``make test``) runs to prove each still works end to end and prints its ratios. Smoke numbers mean nothing."""

from __future__ import annotations

import sys
from typing import TypeVar

T = TypeVar("T")
SMOKE = "--smoke" in sys.argv[1:]


def pick(full: T, smoke: T) -> T:
    """``full`` normally, ``smoke`` under ``--smoke``."""
    return smoke if SMOKE else full
