"""Per-tenant token buckets: a tenant may spend ``rate`` units per second, bursting to one second's worth.

Used by the API (requests/s, answered 429) and the writer (messages/s, dead-lettered with a counted reason).
Buckets live in one process: N replicas admit up to N times the rate (ADR-0012).
"""

from __future__ import annotations

import time


class TokenBuckets:
    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str, rate: float, now: float | None = None) -> float | None:
        """Spend one unit of ``key``'s budget: None when allowed, else the seconds until one is available."""
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.get(key, (rate, now))
        tokens = min(rate, tokens + (now - at) * rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / rate
        self._buckets[key] = (tokens - 1.0, now)
        return None
