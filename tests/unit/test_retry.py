"""The one retry rule (kestrel_core.retry)."""

from __future__ import annotations

import random

from kestrel_core.retry import Backoff


def test_steps_grow_exponentially_up_to_the_cap() -> None:
    backoff = Backoff(base_s=0.5, cap_s=4.0)
    assert [backoff.step(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_delays_are_jittered_within_their_step() -> None:
    backoff = Backoff(base_s=1.0, cap_s=60.0, jitter=0.5)
    rng = random.Random(7)
    delays = [backoff.delay(3, rng) for _ in range(1000)]
    assert all(2.0 <= d <= 4.0 for d in delays)
    assert max(delays) - min(delays) > 1.5  # spread out, not one schedule for everyone


def test_without_jitter_the_delay_is_the_step() -> None:
    assert Backoff(base_s=0.25, cap_s=10.0, jitter=0.0).delay(4) == 2.0
