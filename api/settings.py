"""``KESTREL_API_*``: the API's settings (read by ``python -m api``)."""

from __future__ import annotations

import msgspec

from kestrel_core.settings import Secret


class ApiSettings(msgspec.Struct, frozen=True, kw_only=True):
    """``database_url`` connects as the API's own role (kestrel_api: no table owned, no BYPASSRLS); ``admin_token``
    is the platform administrator's bootstrap token."""

    #: Where the API listens.
    host: str = "127.0.0.1"
    #: Its port.
    port: int = 8080
    #: The platform administrator's bootstrap token (manages tenants, nothing inside them).
    admin_token: Secret = msgspec.field(default_factory=lambda: Secret(""))
    #: PostgreSQL as kestrel_api (no table owned, no BYPASSRLS); the API refuses a privileged role.
    database_url: Secret = msgspec.field(default_factory=lambda: Secret(""))
    #: The platform token's operations (tenants) connect as kestrel_platform, never as the API's role (ADR-0012).
    platform_database_url: Secret = msgspec.field(default_factory=lambda: Secret(""))
    #: Allow GraphQL introspection (off in production).
    graphql_introspection: bool = False
    #: Ed25519 private key (PEM) signing OAuth access tokens; unset: the token endpoint issues none.
    signing_key_file: str = ""
    #: Comma-separated public keys (PEM files) of rotated-out signing keys, still accepted until their tokens expire.
    previous_signing_keys: str = ""
    #: NATS JetStream, where the real-time streams come from; empty: the stream endpoints answer 503.
    nats_url: str = ""
    #: A stream ends after this long (``end``, reason ``max_lifetime``) and its client reconnects with its cursor,
    #: missing nothing: connections spread over the replicas again after a deploy or a scale-out.
    stream_max_s: float = 3600.0
    #: Most streams one tenant may have open on one API process (past it: 429); a tenant cannot starve the others.
    stream_max_per_tenant: int = 1000
    #: Comma-separated origins (``https://console.example.com``) whose pages may open streams, besides the API's own.
    stream_origins: str = ""
    #: Database connections kept open.
    pool_min: int = 1
    #: Most database connections.
    pool_max: int = 10
