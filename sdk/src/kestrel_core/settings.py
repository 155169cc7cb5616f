"""Settings: one msgspec Struct per service, read from ``KESTREL_<SERVICE>_<FIELD>`` variables.

Nothing is read at import time; a service's composition root calls ``from_env`` and passes the
result in. Secrets are wrapped in ``Secret`` so that ``repr`` and logs never show them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

from kestrel_core.errors import InvalidInput

S = TypeVar("S", bound=msgspec.Struct)


class Secret:
    """A string that does not print itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__


def _dec_hook(type_: type, obj: Any) -> Any:
    if type_ is Secret and isinstance(obj, str):
        return Secret(obj)
    raise NotImplementedError(f"unsupported settings type {type_!r}")


def from_env(cls: type[S], prefix: str, environ: Mapping[str, str] | None = None, **overrides: Any) -> S:
    """Build ``cls`` from ``{prefix}_{FIELD}`` variables, then ``overrides``.

    Raises ``InvalidInput("bad_setting")`` naming the variable when a value does not convert.
    """
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    for field in msgspec.structs.fields(cls):
        name = f"{prefix}_{field.name}".upper()
        if name in env:
            raw[field.name] = env[name]
    raw.update(overrides)
    try:
        return msgspec.convert(raw, cls, strict=False, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise InvalidInput("bad_setting", f"{prefix}_*: {exc}") from exc


class MqttSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How a backend service reaches the broker (``KESTREL_<SERVICE>_MQTT_HOST`` ...): each service's settings extend
    this, so the names are the same everywhere. A principal's client id is ``svc:{mqtt_username}:{instance}``
    (ADR-0010); its session persists for ``session_expiry_s``."""

    #: The broker (Mosquitto with Kestrel's plugin, or EMQX).
    mqtt_host: str = "127.0.0.1"
    #: Its port for backend principals.
    mqtt_port: int = 1883
    #: ``svc:{mqtt_username}:{instance}``: unique per replica (ADR-0010).
    client_id: str = "svc:kestrel:1"
    #: The backend principal's name (``kestrel service create``); empty: an unsecured development broker.
    mqtt_username: str = ""
    #: The principal's secret, printed once by ``kestrel service create``.
    mqtt_password: Secret = msgspec.field(default_factory=lambda: Secret(""))
    #: How long the broker keeps the session (and queues messages) while the service is away.
    session_expiry_s: int = 86400
