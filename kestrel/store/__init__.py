"""Storage shared by every service: migrations, the registry, connection settings (ADR-0006)."""

from __future__ import annotations

import msgspec

from kestrel_core.settings import Secret


class DatabaseSettings(msgspec.Struct, frozen=True, kw_only=True):
    """``KESTREL_DATABASE_URL``: a libpq connection string or URI."""

    #: A libpq connection string or URI (the owner role, for the services; the API has its own).
    url: Secret = msgspec.field(default_factory=lambda: Secret("postgresql://kestrel@127.0.0.1:5432/kestrel"))
