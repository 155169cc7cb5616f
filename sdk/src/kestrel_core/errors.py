"""The closed vocabulary of errors, mapped once per transport (ADR-0003).

HTTP: ``api.problems`` turns each kind into a status and an RFC 9457 body. JetStream: the writer
terms + dead-letters ``InvalidInput`` and naks ``Unavailable``. MQTT: the bridge dead-letters
``InvalidInput``.
"""

from __future__ import annotations


class KestrelError(Exception):
    """Base of every error Kestrel raises on purpose."""

    kind = "error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidInput(KestrelError):
    """The caller sent something we refuse; ``reason`` is a stable, countable code."""

    kind = "invalid_input"

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class ContentTooLarge(InvalidInput):
    """Input over its size limit (HTTP 413); everywhere else it is handled as the ``InvalidInput`` it is."""


class Unauthenticated(KestrelError):
    kind = "unauthenticated"


class Forbidden(KestrelError):
    kind = "forbidden"


class NotFound(KestrelError):
    kind = "not_found"


class Conflict(KestrelError):
    kind = "conflict"


class PreconditionFailed(KestrelError):
    """An ``If-Match`` did not match the current version (someone else changed it first)."""

    kind = "precondition_failed"


class RateLimited(KestrelError):
    """A tenant's request or message rate is over its quota; ``retry_after`` seconds is worth waiting."""

    kind = "rate_limited"

    def __init__(self, detail: str, retry_after: float = 1.0) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class Unavailable(KestrelError):
    """A dependency is down or overloaded; retrying later may succeed."""

    kind = "unavailable"
