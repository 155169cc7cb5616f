"""How long to wait before trying again: one rule for every retry in the platform and the SDK.

Exponential, capped, with jitter: a fleet of devices (or service replicas) that lost the same broker or database
at the same moment spreads its retries out instead of returning all at once. With ``jitter`` 0.5 (the default) a
delay falls between half and all of the exponential step, so the expected wait stays close to the step while no
two clients share a schedule.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    base_s: float
    cap_s: float
    factor: float = 2.0
    #: The fraction of each step left to chance: 0 none (plain exponential), 1 "full jitter" (0 to the step).
    jitter: float = 0.5

    def step(self, attempt: int) -> float:
        """The exponential step before retry ``attempt`` (1 = the first retry), capped."""
        return float(min(self.cap_s, self.base_s * self.factor ** max(0, attempt - 1)))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """A jittered wait before retry ``attempt``: between ``(1 - jitter)`` and 1 times its step."""
        step = self.step(attempt)
        return step - self.jitter * step * (rng or _rng).random()


_rng = random.Random()  # noqa: S311 - spreading retries out, not a secret
