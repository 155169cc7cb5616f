"""The EMQX 5.8 HTTP authentication contract as msgspec structs (broker-auth-contract.md §1, §7).

EMQX renders every placeholder as a JSON string and an absent value as ``""``; our Mosquitto plugin sends
the same body. Unknown fields are ignored (EMQX 6 adds ``peerport`` and ``listener``).
"""

from __future__ import annotations

from typing import Literal

import msgspec


class AuthnRequest(msgspec.Struct, frozen=True, kw_only=True):
    broker: str = ""
    clientid: str = ""
    username: str = ""
    password: str = ""
    peerhost: str = ""
    cert_subject: str = ""
    cert_common_name: str = ""
    cert_pem: str = ""  # base64 of the DER certificate, no PEM armour


class AclRule(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    permission: Literal["allow", "deny"]
    action: Literal["publish", "subscribe", "all"]
    topic: str
    qos: list[int] | None = None


class AuthnResponse(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    result: Literal["allow", "deny"]
    is_superuser: bool | None = None  # always false for devices; absent on a deny
    client_attrs: dict[str, str] | None = None
    expire_at: int | None = None  # Unix seconds
    acl: list[AclRule] | None = None


DENY = AuthnResponse(result="deny")


class AuthzRequest(msgspec.Struct, frozen=True, kw_only=True):
    """EMQX 5.8 HTTP authorization body (our config renders these fields; all strings)."""

    broker: str = ""
    clientid: str = ""
    username: str = ""
    peerhost: str = ""
    action: str = ""  # publish | subscribe
    topic: str = ""
    qos: str = ""
    retain: str = ""
    tenant: str = ""  # ${client_attrs.tns}, set by our authn answer
    device: str = ""  # ${client_attrs.dev}


class AuthzResponse(msgspec.Struct, frozen=True, kw_only=True):
    result: Literal["allow", "deny"]
