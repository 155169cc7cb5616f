"""``KESTREL_PKI_*``: which backend signs (ADR-0008, ADR-0011), and how to reach it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import msgspec

from kestrel_core.errors import InvalidInput
from kestrel_core.settings import Secret
from pki.authority import DatabaseCA
from pki.builtin import BuiltinCA


class PkiSettings(msgspec.Struct, frozen=True, kw_only=True):
    """``KESTREL_PKI_*``. ``builtin``: CA keys encrypted in PostgreSQL with ``passphrase``; ``openbao``: OpenBao (or
    Vault) PKI at ``openbao_addr`` with ``openbao_token``, mounts under ``openbao_prefix``."""

    #: builtin (CA keys encrypted in PostgreSQL) or openbao (OpenBao or Vault PKI).
    backend: Literal["builtin", "openbao"] = "builtin"
    #: Encrypts the built-in CA's keys; the CLI falls back to the state directory's pki-passphrase file.
    passphrase: Secret = msgspec.field(default_factory=lambda: Secret(""))
    #: OpenBao's address (openbao backend).
    openbao_addr: str = ""
    #: A token allowed to issue and revoke on Kestrel's PKI mounts.
    openbao_token: Secret = msgspec.field(default_factory=lambda: Secret(""))
    #: The PKI mounts' name prefix.
    openbao_prefix: str = "kestrel"


def open_ca(database_url: str, settings: PkiSettings, passphrase: Callable[[], str] | None = None) -> DatabaseCA:
    """The configured backend; ``passphrase`` supplies the built-in CA's passphrase when the settings have none."""
    if settings.backend == "openbao":
        from pki.openbao import OpenBaoCA  # noqa: PLC0415 - hvac only when used

        if not settings.openbao_addr or not settings.openbao_token:
            raise InvalidInput("no_openbao", "set KESTREL_PKI_OPENBAO_ADDR and KESTREL_PKI_OPENBAO_TOKEN")
        return OpenBaoCA(
            database_url, settings.openbao_addr, settings.openbao_token.reveal(), prefix=settings.openbao_prefix
        )
    secret = settings.passphrase.reveal() or (passphrase() if passphrase else "")
    if not secret:
        raise InvalidInput("no_passphrase", "set KESTREL_PKI_PASSPHRASE")
    return BuiltinCA(database_url, secret)
