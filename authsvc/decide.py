"""Authentication decisions: pure functions over small lookups (no I/O here).

A client is admitted only when every check passes; any doubt is a deny (fails closed, ADR-0009).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import logging
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from authsvc.contract import DENY, AclRule, AuthnRequest, AuthnResponse
from kestrel.topics import device_publish_topics, device_subscribe_filters, is_valid_id

log = logging.getLogger("kestrel.authsvc")
MAX_SESSION = dt.timedelta(hours=24)  # ACL changes reach live sessions at least daily (contract §7.6)


@dataclass(frozen=True)
class Authority:
    tenant: str
    certificate: x509.Certificate


@dataclass(frozen=True)
class DeviceRecord:
    tenant: str
    status: str
    tenant_status: str


class IdentityLookup(Protocol):
    """What the decision needs from storage."""

    async def authority(self, issuer: x509.Name) -> Authority | None:
        """The active tenant CA with this subject, if any."""

    async def certificate_status(self, serial: str, fingerprint: str) -> str | None:
        """'active' or 'revoked' for a certificate we issued; None when we never issued it."""

    async def device(self, device_id: str) -> DeviceRecord | None:
        """The registered device, if any."""


def device_acl(tenant: str, device: str) -> list[AclRule]:
    """Concrete rules for one device, ending with an explicit deny of everything else."""
    rules = [AclRule(permission="allow", action="publish", topic=t) for t in device_publish_topics(tenant, device)]
    rules += [
        AclRule(permission="allow", action="subscribe", topic=f, qos=[0, 1])
        for f in device_subscribe_filters(tenant, device)
    ]
    rules.append(AclRule(permission="deny", action="all", topic="#"))
    return rules


def _deny(reason: str, request: AuthnRequest) -> AuthnResponse:
    log.info(
        "authentication denied",
        extra={
            "reason": reason,
            "clientid": request.clientid[:64],
            "peerhost": request.peerhost[:64],
            "broker": request.broker[:16],
        },
    )
    return DENY


async def authenticate(  # noqa: PLR0911 - one guard per check: the list of returns is the policy
    request: AuthnRequest, lookup: IdentityLookup, now: dt.datetime
) -> AuthnResponse:
    """Decide one CONNECT. Certificates only for now; a JWT in the password is denied until it is built."""
    if not request.cert_pem:
        return _deny("no_certificate" if not request.password else "jwt_not_supported_yet", request)
    try:
        cert = x509.load_der_x509_certificate(base64.b64decode(request.cert_pem, validate=True))
    except (binascii.Error, ValueError):
        return _deny("bad_certificate", request)
    common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(common_names) != 1:
        return _deny("certificate_cn", request)
    device = str(common_names[0].value)
    if not is_valid_id(device) or device != request.clientid:
        return _deny("clientid_is_not_certificate_cn", request)
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        return _deny("certificate_expired_or_not_yet_valid", request)
    authority = await lookup.authority(cert.issuer)
    if authority is None:
        return _deny("unknown_or_revoked_ca", request)
    try:
        cert.verify_directly_issued_by(authority.certificate)
    except (InvalidSignature, ValueError, TypeError):
        return _deny("bad_signature", request)
    status = await lookup.certificate_status(format(cert.serial_number, "x"), cert.fingerprint(hashes.SHA256()).hex())
    if status != "active":
        return _deny("certificate_revoked" if status else "certificate_not_issued_by_kestrel", request)
    record = await lookup.device(device)
    if record is None or record.tenant != authority.tenant:
        return _deny("device_not_in_certificate_tenant", request)
    if record.status != "active" or record.tenant_status != "active":
        return _deny("device_or_tenant_not_active", request)
    expire_at = min(cert.not_valid_after_utc, now + MAX_SESSION)
    return AuthnResponse(
        result="allow",
        is_superuser=False,
        client_attrs={"tns": authority.tenant, "dev": device},
        expire_at=int(expire_at.timestamp()),
        acl=device_acl(authority.tenant, device),
    )
