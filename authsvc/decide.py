"""Authentication decisions: pure functions over small lookups (no I/O here).

A client is admitted only when every check passes; any doubt is a deny (fails closed, ADR-0009).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import logging
from dataclasses import dataclass
from typing import Protocol

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from authsvc.contract import DENY, AclRule, AuthnRequest, AuthnResponse
from kestrel_core.tokens import CLAIM_PATTERN, CLAIM_PREFIX, SERVICE_SECRET_PREFIX, secret_digest
from kestrel_core.topics import (
    BROKER_EVENT_FILTERS,
    DEVICE_UPLINK_FILTERS,
    MQTT_JWT_AUDIENCE,
    PROVISION_CLIENT_PREFIX,
    PROVISION_REQUEST_FILTER,
    TELEMETRY_FILTERS,
    TENANT_OUT_FILTER,
    VERSION,
    device_publish_topics,
    device_subscribe_filters,
    is_valid_id,
    provision_topics,
)

log = logging.getLogger("kestrel.authsvc")
MAX_SESSION = dt.timedelta(hours=24)  # ACL changes reach live sessions at least daily (contract §7.6)
DEFAULT_AUDIENCE = MQTT_JWT_AUDIENCE
JWT_LEEWAY_S = 30
#: Where the Mosquitto plugin takes control commands (kick); only the ``control`` role may publish there.
CONTROL_TOPIC = "$CONTROL/kestrel/v1"
#: Lifecycle states whose credentials are honoured (ADR-0013): not suspended, not decommissioned.
DEVICE_ADMITTED = frozenset({"registered", "provisioned", "active"})
#: How long a provisioning (claim) connection may live: long enough to submit a CSR and read the answer.
CLAIM_SESSION = dt.timedelta(minutes=10)


@dataclass(frozen=True)
class Authority:
    tenant: str
    certificate: x509.Certificate


@dataclass(frozen=True)
class JwtKey:
    tenant: str
    device: str | None
    alg: str
    public_key_pem: str
    status: str


@dataclass(frozen=True)
class DeviceRecord:
    tenant: str
    status: str
    tenant_status: str


@dataclass(frozen=True)
class ServicePrincipal:
    name: str
    role: str
    secret_sha256: str
    status: str


@dataclass(frozen=True)
class Claim:
    tenant: str
    secret_sha256: str
    status: str
    used: int
    max_uses: int
    expires_at: dt.datetime
    #: The connecting device was provisioned with this claim already (and is not decommissioned).
    provisioned: bool = False


class IdentityLookup(Protocol):
    """What the decision needs from storage."""

    async def authority(self, issuer: x509.Name) -> Authority | None:
        """The active tenant CA with this subject, if any."""

    async def certificate_status(self, serial: str, fingerprint: str) -> str | None:
        """'active' or 'revoked' for a certificate we issued; None when we never issued it."""

    async def device(self, device_id: str) -> DeviceRecord | None:
        """The registered device, if any."""

    async def jwt_key(self, kid: str) -> JwtKey | None:
        """The JWT verification key with this ``kid``, if any."""

    async def service_principal(self, name: str) -> ServicePrincipal | None:
        """The backend principal with this name, if any."""

    async def claim(self, claim_id: str, device: str) -> Claim | None:
        """The provisioning claim with this id, if any, and whether ``device`` was provisioned with it (never cached:
        its use count changes)."""


def device_acl(tenant: str, device: str) -> list[AclRule]:
    """Concrete rules for one device, ending with an explicit deny of everything else."""
    rules = [AclRule(permission="allow", action="publish", topic=t) for t in device_publish_topics(tenant, device)]
    rules += [
        AclRule(permission="allow", action="subscribe", topic=f, qos=[0, 1])
        for f in device_subscribe_filters(tenant, device)
    ]
    rules.append(_DENY_ALL)
    return rules


_DENY_ALL = AclRule(permission="deny", action="all", topic="#")


def service_acl(role: str) -> list[AclRule]:
    """Fixed rules per backend role; nothing is a superuser (ADR-0010). Subscribe rules are checked
    against the filter without its ``$share/{group}/`` prefix, as EMQX does."""
    if role == "ingest":
        rules = [AclRule(permission="allow", action="subscribe", topic=f, qos=[0, 1]) for f in TELEMETRY_FILTERS]
    elif role == "control":
        rules = [AclRule(permission="allow", action="publish", topic=CONTROL_TOPIC, qos=[0, 1])]
    elif role == "devices":
        rules = [
            AclRule(permission="allow", action="subscribe", topic=f, qos=[0, 1])
            for f in (*DEVICE_UPLINK_FILTERS, *BROKER_EVENT_FILTERS)
        ]
        rules += [
            AclRule(permission="allow", action="publish", topic=t, qos=[0, 1])
            for t in (
                f"{VERSION}/+/d/+/cmd/+",
                f"{VERSION}/+/d/+/state/desired",
                f"{VERSION}/+/d/+/state/desired/+",
                f"{VERSION}/+/d/+/status",
            )
        ]
    elif role == "rules":
        rules = [AclRule(permission="allow", action="publish", topic=TENANT_OUT_FILTER, qos=[0, 1])]
    elif role == "provisioning":
        rules = [
            AclRule(permission="allow", action="subscribe", topic=PROVISION_REQUEST_FILTER, qos=[0, 1]),
            AclRule(permission="allow", action="publish", topic=f"{VERSION}/+/provision/+/+/response", qos=[0, 1]),
        ]
    else:
        rules = []
    return [*rules, _DENY_ALL]


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


def _admit(tenant: str, device: str, expire_at: dt.datetime) -> AuthnResponse:
    return AuthnResponse(
        result="allow",
        is_superuser=False,
        client_attrs={"tns": tenant, "dev": device},
        expire_at=int(expire_at.timestamp()),
        acl=device_acl(tenant, device),
    )


async def authenticate(
    request: AuthnRequest, lookup: IdentityLookup, now: dt.datetime, audience: str = DEFAULT_AUDIENCE
) -> AuthnResponse:
    """Decide one CONNECT: a client certificate if the broker saw one, otherwise a JWT in the password."""
    if request.cert_pem:
        return await _certificate(request, lookup, now)
    if request.password.startswith(SERVICE_SECRET_PREFIX):
        return await _service(request, lookup, now)
    if request.password.startswith(CLAIM_PREFIX):
        return await _claim(request, lookup, now)
    if request.password:
        return await _jwt(request, lookup, now, audience)
    return _deny("no_credentials", request)


async def _certificate(  # noqa: PLR0911 - one guard per check: the list of returns is the policy
    request: AuthnRequest, lookup: IdentityLookup, now: dt.datetime
) -> AuthnResponse:
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
    if reason := await _device_refusal(lookup, device, authority.tenant):
        return _deny(reason, request)
    return _admit(authority.tenant, device, min(cert.not_valid_after_utc, now + MAX_SESSION))


async def _device_refusal(lookup: IdentityLookup, device: str, tenant: str) -> str | None:
    record = await lookup.device(device)
    if record is None or record.tenant != tenant:
        return "device_not_in_credential_tenant"
    if record.status not in DEVICE_ADMITTED or record.tenant_status != "active":
        return "device_or_tenant_not_active"
    return None


async def _jwt(  # noqa: PLR0911 - one guard per check: the list of returns is the policy
    request: AuthnRequest, lookup: IdentityLookup, now: dt.datetime, audience: str
) -> AuthnResponse:
    """EdDSA/ES256 only, algorithm pinned per key; ``kid``, ``aud``, ``iss`` (= the key's tenant), ``sub``
    (= client id), ``exp`` required, ``nbf`` checked when present."""
    token = request.password
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        return _deny("not_a_jwt", request)
    kid = header.get("kid")
    if not isinstance(kid, str) or header.get("alg") not in ("EdDSA", "ES256"):
        return _deny("jwt_header", request)
    key = await lookup.jwt_key(kid)
    if key is None or key.status != "active" or header["alg"] != key.alg:
        return _deny("jwt_key_unknown_revoked_or_other_alg", request)
    try:
        claims = jwt.decode(
            token,
            key.public_key_pem,
            algorithms=[key.alg],
            audience=audience,
            issuer=key.tenant,
            leeway=JWT_LEEWAY_S,
            options={"require": ["exp", "sub", "aud", "iss"]},
        )
    except jwt.PyJWTError as exc:
        return _deny(f"jwt_{type(exc).__name__}", request)
    device = claims["sub"]
    if not isinstance(device, str) or device != request.clientid or not is_valid_id(device):
        return _deny("jwt_sub_is_not_clientid", request)
    if key.device is not None and key.device != device:
        return _deny("jwt_key_of_another_device", request)
    if reason := await _device_refusal(lookup, device, key.tenant):
        return _deny(reason, request)
    expire_at = dt.datetime.fromtimestamp(int(claims["exp"]), dt.UTC)
    if expire_at <= now:
        return _deny("jwt_expired", request)
    return _admit(key.tenant, device, min(expire_at, now + MAX_SESSION))


async def _service(request: AuthnRequest, lookup: IdentityLookup, now: dt.datetime) -> AuthnResponse:
    """A backend principal: username = its name, password = its secret, client id ``svc:{name}:{instance}``
    (a form no device id can take, so neither can take over the other's session)."""
    name = request.username
    parts = request.clientid.split(":")
    if not is_valid_id(name) or len(parts) != 3 or parts[:2] != ["svc", name] or not is_valid_id(parts[2]):
        return _deny("service_clientid_or_username", request)
    principal = await lookup.service_principal(name)
    digest = hashlib.sha256(request.password.encode()).hexdigest()
    if principal is None or not hmac.compare_digest(digest, principal.secret_sha256):
        return _deny("service_secret", request)
    if principal.status != "active":
        return _deny("service_revoked", request)
    return AuthnResponse(
        result="allow",
        is_superuser=False,
        client_attrs={"svc": name, "role": principal.role},
        expire_at=int((now + MAX_SESSION).timestamp()),
        acl=service_acl(principal.role),
    )


async def _claim(request: AuthnRequest, lookup: IdentityLookup, now: dt.datetime) -> AuthnResponse:
    """A device holding a provisioning claim (ADR-0013): client id ``prov:{device}``, password the claim token.
    Admitted for a few minutes to exactly its request and response topics; the claim's use is taken only when
    devicesvc issues the certificate, so connecting alone consumes nothing."""
    match = CLAIM_PATTERN.match(request.password)
    device = request.clientid.removeprefix(PROVISION_CLIENT_PREFIX)
    if match is None or not request.clientid.startswith(PROVISION_CLIENT_PREFIX) or not is_valid_id(device):
        return _deny("claim_token_or_clientid", request)
    claim = await lookup.claim(match.group(1), device)
    if claim is None or not hmac.compare_digest(secret_digest(match.group(2)), claim.secret_sha256):
        return _deny("claim_secret", request)
    # A device the claim provisioned may ask again while the claim is in force, even when its last use went to that
    # device: its answer was lost, and the provisioner gives back the certificate it has (for the same key only).
    exhausted = claim.used >= claim.max_uses and not claim.provisioned
    if claim.status != "active" or exhausted or claim.expires_at <= now:
        return _deny("claim_revoked_exhausted_or_expired", request)
    publish, subscribe = provision_topics(claim.tenant, match.group(1), device)
    return AuthnResponse(
        result="allow",
        is_superuser=False,
        client_attrs={"tns": claim.tenant, "claim": match.group(1)},
        expire_at=int(min(claim.expires_at, now + CLAIM_SESSION).timestamp()),
        acl=[
            AclRule(permission="allow", action="publish", topic=publish, qos=[0, 1]),
            AclRule(permission="allow", action="subscribe", topic=subscribe, qos=[0, 1]),
            _DENY_ALL,
        ],
    )
