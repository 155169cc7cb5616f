"""authsvc on the EMQX 5.8 HTTP contract, replayed with EMQX-shaped bodies, attacked as an attacker would.

Every field is a string and absent values are "" (EMQX renders placeholders that way); cert_pem is the
base64 of the DER certificate.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from litestar.testing import TestClient

from authsvc.app import AuthsvcSettings, create_app
from kestrel.devtools import seed
from kestrel_core.errors import Conflict
from kestrel_core.settings import Secret
from pki import x509 as px
from pki.builtin import BuiltinCA
from tests.conftest import Tenant, isolated_database, wait_until

pytestmark = pytest.mark.integration
PASSPHRASE = "authsvc-test-passphrase-" + uuid.uuid4().hex
KEY = "broker-key-" + uuid.uuid4().hex
HEADERS = {"x-authsvc-key": KEY}


@pytest.fixture(scope="module")
def isolated_db(postgres: Any) -> str:  # type: ignore[misc]
    """A database of this module's own, so its root CA and passphrase are its own."""
    url = isolated_database(postgres, "authsvc")
    BuiltinCA(url, PASSPHRASE).init_root("test")
    return url


@pytest.fixture
def client(isolated_db: str) -> Iterator[TestClient]:  # type: ignore[type-arg]
    with TestClient(create_app(AuthsvcSettings(broker_key=Secret(KEY)), isolated_db)) as test_client:
        yield test_client


def tenant_with_ca(url: str, prefix: str, devices: int) -> Tenant:
    """A registered tenant with ``devices`` devices and its own CA."""

    tag = uuid.uuid4().hex[:8]
    t = Tenant(f"{prefix}-{tag}", [f"{prefix}-{tag}-{i}" for i in range(devices)])
    seed.create_tenant(url, t.id)
    seed.create_devices(url, t.id, t.devices)
    BuiltinCA(url, PASSPHRASE).create_tenant_ca(t.id, "test")
    return t


@pytest.fixture
def tenant(isolated_db: str) -> Tenant:
    return tenant_with_ca(isolated_db, "t", 3)


def enrol(url: str, device: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)]))
        .sign(key, hashes.SHA256())
    )
    issued = BuiltinCA(url, PASSPHRASE).sign_csr(csr.public_bytes(serialization.Encoding.PEM), device, 30, "test")
    return px.load_certificate(issued.cert_pem)


def body(cert: x509.Certificate | None, clientid: str, **extra: str) -> dict[str, str]:
    der = cert.public_bytes(serialization.Encoding.DER) if cert else b""
    cn = "" if cert is None else str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    return {
        "broker": "emqx",
        "clientid": clientid,
        "username": "",
        "password": "",
        "peerhost": "127.0.0.1",
        "cert_subject": "" if cert is None else cert.subject.rfc4514_string(),
        "cert_common_name": cn,
        "cert_pem": base64.b64encode(der).decode(),
    } | extra


def authn(client: TestClient, payload: dict[str, str]) -> dict[str, Any]:  # type: ignore[type-arg]
    resp = client.post("/mqtt/authn", json=payload, headers=HEADERS)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    return resp.json()  # type: ignore[no-any-return]


def test_a_certificate_device_gets_its_own_concrete_acl(
    client: TestClient,
    isolated_db: str,  # type: ignore[type-arg]
    tenant: Tenant,
) -> None:
    device = tenant.devices[0]
    cert = enrol(isolated_db, device)
    answer = authn(client, body(cert, device))
    assert answer["result"] == "allow"
    assert answer["is_superuser"] is False
    assert answer["client_attrs"] == {"tns": tenant.id, "dev": device}
    now = dt.datetime.now(dt.UTC).timestamp()
    assert now < answer["expire_at"] <= now + 24 * 3600 + 5
    base = f"v1/{tenant.id}/d/{device}"
    assert answer["acl"][-1] == {"permission": "deny", "action": "all", "topic": "#"}
    topics = {(r["permission"], r["action"], r["topic"]) for r in answer["acl"][:-1]}
    assert ("allow", "publish", f"{base}/telemetry") in topics
    assert ("allow", "subscribe", f"{base}/cmd/+") in topics
    # Its own topics, and (subscribe only) what its tenant's rules republish for its devices (ADR-0022).
    out = f"v1/{tenant.id}/out/#"
    assert all(r["topic"].startswith(base + "/") for r in answer["acl"][:-1] if r["topic"] != out)
    assert [(r["permission"], r["action"]) for r in answer["acl"] if r["topic"] == out] == [("allow", "subscribe")]
    assert not any(c in r["topic"] for r in answer["acl"][:-1] if r["topic"] != out for c in ("#", "${"))
    assert not any("${" in r["topic"] for r in answer["acl"])


def forged(
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    device: str,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(days=1))
        .not_valid_after(not_after or now + dt.timedelta(days=1))
        .sign(issuer_key, hashes.SHA256())
    )


def tenant_ca(url: str, tenant: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT key_encrypted, cert_pem FROM pki_authorities WHERE tenant_id = %s", (tenant,)
        ).fetchone()
    assert row is not None
    return px.decrypt_key(row[0], PASSPHRASE), px.load_certificate(row[1])


def test_attacks_are_denied(
    client: TestClient,
    isolated_db: str,
    tenant: Tenant,  # type: ignore[type-arg]
    make_other_tenant: Callable[[], Tenant],
) -> None:
    victim, other_device = tenant.devices[0], tenant.devices[1]
    good = enrol(isolated_db, victim)
    attacker = make_other_tenant()
    attacker_cert = enrol(isolated_db, attacker.devices[0])
    ca_key, ca_cert = tenant_ca(isolated_db, tenant.id)
    attacker_ca_key, _ = tenant_ca(isolated_db, attacker.id)
    self_signed_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    revoked = enrol(isolated_db, other_device)
    BuiltinCA(isolated_db, PASSPHRASE).revoke(px.serial_hex(revoked), "key_compromise", "test")
    cases: dict[str, dict[str, str]] = {
        "client id differs from the certificate": body(good, other_device),
        "client id empty": body(good, ""),
        "client id with wildcard": body(good, victim + "/#"),
        "another tenant's certificate naming this device as client id": body(attacker_cert, victim),
        "certificate signed by another tenant's CA key, issuer name forged": body(
            forged(attacker_ca_key, ca_cert.subject, victim), victim
        ),
        "self-signed certificate with the victim's CN": body(
            forged(self_signed_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, victim)]), victim), victim
        ),
        "genuine CA signature but never issued by Kestrel": body(forged(ca_key, ca_cert.subject, victim), victim),
        "expired": body(
            forged(ca_key, ca_cert.subject, victim, now - dt.timedelta(days=10), now - dt.timedelta(days=1)), victim
        ),
        "not yet valid": body(
            forged(ca_key, ca_cert.subject, victim, now + dt.timedelta(days=1), now + dt.timedelta(days=2)), victim
        ),
        "revoked": body(revoked, other_device),
        "no certificate, no password": body(None, victim),
        "unsigned JWT (alg none) in the password": body(None, victim, password="eyJhbGciOiJub25lIn0.e30."),
        "cert_pem not base64": body(good, victim, cert_pem="%%%not-base64%%%"),
        "cert_pem base64 of garbage": body(good, victim, cert_pem=base64.b64encode(b"garbage").decode()),
        "cert_subject claims the victim but the certificate is the attacker's": body(
            attacker_cert, attacker.devices[0], cert_subject=good.subject.rfc4514_string(), cert_common_name=victim
        )
        | {"clientid": victim},
    }
    for name, payload in cases.items():
        assert authn(client, payload) == {"result": "deny"}, name


def test_suspended_device_and_tenant_are_denied(
    client: TestClient,
    isolated_db: str,  # type: ignore[type-arg]
    tenant: Tenant,
) -> None:
    device = tenant.devices[2]
    cert = enrol(isolated_db, device)
    assert authn(client, body(cert, device))["result"] == "allow"
    with psycopg.connect(isolated_db) as conn:
        conn.execute("UPDATE devices SET status = 'suspended' WHERE device_id = %s", (device,))
    assert authn(client, body(cert, device)) == {"result": "deny"}
    with psycopg.connect(isolated_db) as conn:
        conn.execute("UPDATE devices SET status = 'active' WHERE device_id = %s", (device,))
        conn.execute("UPDATE tenants SET status = 'suspended' WHERE tenant_id = %s", (tenant.id,))
    assert authn(client, body(cert, device)) == {"result": "deny"}


def test_revoking_the_tenant_ca_locks_out_its_devices(
    client: TestClient,
    isolated_db: str,  # type: ignore[type-arg]
    tenant: Tenant,
) -> None:
    device = tenant.devices[0]
    cert = enrol(isolated_db, device)
    BuiltinCA(isolated_db, PASSPHRASE).revoke_tenant_ca(tenant.id, "ca_compromise", "test")
    assert authn(client, body(cert, device)) == {"result": "deny"}


@pytest.mark.parametrize(
    "headers", [{}, {"x-authsvc-key": "wrong"}, {"x-authsvc-key": ""}], ids=["none", "wrong", "empty"]
)
def test_brokers_must_authenticate(
    client: TestClient,
    isolated_db: str,
    tenant: Tenant,  # type: ignore[type-arg]
    headers: dict[str, str],
) -> None:
    cert = enrol(isolated_db, tenant.devices[0])
    resp = client.post("/mqtt/authn", json=body(cert, tenant.devices[0]), headers=headers)
    assert resp.status_code == 401  # EMQX: ignore -> deny; plugin: defer -> deny


def test_unparseable_request_is_refused(client: TestClient) -> None:  # type: ignore[type-arg]
    for raw in (b"not json", b'{"clientid": 5}', b"[]"):
        resp = client.post("/mqtt/authn", content=raw, headers=HEADERS | {"content-type": "application/json"})
        assert resp.status_code == 400


def test_database_down_fails_closed() -> None:
    app = create_app(AuthsvcSettings(broker_key=Secret(KEY)), "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = forged(key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")]), "dev-1")
    with TestClient(app) as c:
        resp = c.post("/mqtt/authn", json=body(cert, "dev-1"), headers=HEADERS)
    assert resp.status_code == 503  # never an allow


def test_unknown_fields_from_newer_brokers_are_ignored(
    client: TestClient,
    isolated_db: str,  # type: ignore[type-arg]
    tenant: Tenant,
) -> None:
    device = tenant.devices[1]
    cert = enrol(isolated_db, device)
    assert authn(client, body(cert, device, peerport="51234", listener="ssl:default"))["result"] == "allow"


@pytest.fixture
def make_other_tenant(isolated_db: str) -> Callable[[], Tenant]:
    return lambda: tenant_with_ca(isolated_db, "x", 1)


# ------------------------------------------------------------------------------------------------- JWT devices


def jwt_body(token: str, clientid: str) -> dict[str, str]:
    return {
        "broker": "mosquitto",
        "clientid": clientid,
        "username": clientid,
        "password": token,
        "peerhost": "127.0.0.1",
        "cert_subject": "",
        "cert_common_name": "",
        "cert_pem": "",
    }


def relabel(token: str, alg: str) -> str:
    """Swap the header's alg, keeping payload and signature: an algorithm-confusion attempt."""
    header, payload, signature = token.split(".")
    decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    new_header = base64.urlsafe_b64encode(json.dumps(decoded | {"alg": alg}).encode()).rstrip(b"=").decode()
    return f"{new_header}.{payload}.{signature}"


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM,  # type: ignore[no-any-return]
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )


def test_jwt_devices_and_attacks_on_them(
    client: TestClient,
    isolated_db: str,
    tenant: Tenant,  # type: ignore[type-arg]
    make_other_tenant: Callable[[], Tenant],
) -> None:
    import jwt  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: PLC0415

    device, other = tenant.devices[0], tenant.devices[1]
    ed_key = ed25519.Ed25519PrivateKey.generate()
    ed_kid = seed.add_jwt_key(isolated_db, tenant.id, public_pem(ed_key))
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_kid = seed.add_jwt_key(isolated_db, tenant.id, public_pem(ec_key), device=other)
    attacker = make_other_tenant()
    attacker_key = ed25519.Ed25519PrivateKey.generate()
    attacker_kid = seed.add_jwt_key(isolated_db, attacker.id, public_pem(attacker_key))
    now = int(dt.datetime.now(dt.UTC).timestamp())

    def token(key: Any = ed_key, kid: str = ed_kid, alg: str = "EdDSA", **claims: Any) -> str:
        payload = {"sub": device, "aud": "kestrel-mqtt", "iss": tenant.id, "exp": now + 600, "iat": now} | claims
        return jwt.encode({k: v for k, v in payload.items() if v is not None}, key, algorithm=alg, headers={"kid": kid})

    allowed = authn(client, jwt_body(token(), device))
    assert allowed["result"] == "allow"
    assert allowed["expire_at"] == now + 600
    assert allowed["client_attrs"] == {"tns": tenant.id, "dev": device}
    assert authn(client, jwt_body(token(ec_key, ec_kid, "ES256", sub=other), other))["result"] == "allow"

    header_none = base64.urlsafe_b64encode(f'{{"alg":"none","kid":"{ed_kid}"}}'.encode()).rstrip(b"=").decode()
    claims_b64 = (
        base64.urlsafe_b64encode(
            f'{{"sub":"{device}","aud":"kestrel-mqtt","iss":"{tenant.id}","exp":{now + 600}}}'.encode()
        )
        .rstrip(b"=")
        .decode()
    )
    hmac_confusion = jwt.encode(
        {"sub": device, "aud": "kestrel-mqtt", "iss": tenant.id, "exp": now + 600},
        "not-the-key-but-long-enough-for-hs256!",
        algorithm="HS256",
        headers={"kid": ed_kid},
    )
    other_ed = ed25519.Ed25519PrivateKey.generate()
    cases = {
        "expired": jwt_body(token(exp=now - 120), device),
        "not yet valid": jwt_body(token(nbf=now + 600), device),
        "no exp": jwt_body(token(exp=None), device),
        "wrong audience": jwt_body(token(aud="someone-else"), device),
        "no audience": jwt_body(token(aud=None), device),
        "wrong issuer": jwt_body(token(iss=attacker.id), device),
        "sub is not the client id": jwt_body(token(), other),
        "sub of another device, client id matching it": jwt_body(token(sub=other), tenant.devices[2] + "x"),
        "unsigned (alg none)": jwt_body(f"{header_none}.{claims_b64}.", device),
        "HS256 key confusion": jwt_body(hmac_confusion, device),
        "signed by another key under a valid kid": jwt_body(token(other_ed), device),
        "ES256 token relabelled EdDSA": jwt_body(relabel(token(ec_key, ec_kid, "ES256", sub=other), "EdDSA"), other),
        "unknown kid": jwt_body(token(kid="kunknown00000000"), device),
        "per-device key used for another device": jwt_body(token(ec_key, ec_kid, "ES256"), device),
        "another tenant's key for this tenant's device": jwt_body(
            token(attacker_key, attacker_kid, iss=attacker.id), device
        ),
        "garbage": jwt_body("not.a.jwt", device),
        "empty token pieces": jwt_body("..", device),
    }
    for name, payload in cases.items():
        assert authn(client, payload) == {"result": "deny"}, name

    with psycopg.connect(isolated_db) as conn:
        conn.execute("UPDATE jwt_keys SET status = 'revoked' WHERE kid = %s", (ed_kid,))
    assert authn(client, jwt_body(token(), device)) == {"result": "deny"}, "revoked key"


def test_jwt_key_registration_refuses_weak_or_foreign_keys(
    isolated_db: str, tenant: Tenant, make_other_tenant: Callable[[], Tenant]
) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415

    from kestrel_core.errors import InvalidInput, NotFound  # noqa: PLC0415

    with pytest.raises(InvalidInput):
        seed.add_jwt_key(isolated_db, tenant.id, public_pem(rsa.generate_private_key(65537, 2048)))
    with pytest.raises(InvalidInput):
        seed.add_jwt_key(isolated_db, tenant.id, b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    other = make_other_tenant()
    with pytest.raises(NotFound):
        seed.add_jwt_key(
            isolated_db, tenant.id, public_pem(ec.generate_private_key(ec.SECP256R1())), device=other.devices[0]
        )


def authz(client: TestClient, **fields: str) -> dict[str, Any]:  # type: ignore[type-arg]
    payload = {"broker": "emqx", "peerhost": "127.0.0.1", "qos": "1", "retain": "false", "username": ""} | fields
    resp = client.post("/mqtt/authz", json=payload, headers=HEADERS)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    return dict(resp.json())


def test_authz_fallback_applies_the_devices_rules(client: TestClient, tenant: Tenant) -> None:  # type: ignore[type-arg]
    device, other = tenant.devices[0], tenant.devices[1]
    mine = {"clientid": device, "tenant": tenant.id, "device": device}
    assert authz(client, action="publish", topic=f"v1/{tenant.id}/d/{device}/telemetry", **mine)["result"] == "allow"
    assert authz(client, action="subscribe", topic=f"v1/{tenant.id}/d/{device}/cmd/+", **mine)["result"] == "allow"
    denied = [
        {"action": "publish", "topic": f"v1/{tenant.id}/d/{other}/telemetry", **mine},
        {"action": "subscribe", "topic": "#", **mine},
        {"action": "subscribe", "topic": "$share/ingest/v1/+/d/+/telemetry", **mine},
        {"action": "subscribe", "topic": f"v1/{tenant.id}/d/{device}/cmd/+", "qos": "2", **mine},
        # attributes that do not belong to the connection, or none at all
        {
            "action": "publish",
            "topic": f"v1/{tenant.id}/d/{other}/telemetry",
            "clientid": device,
            "tenant": tenant.id,
            "device": other,
        },
        {"action": "publish", "topic": f"v1/{tenant.id}/d/{device}/telemetry", "clientid": device},
        {"action": "delete", "topic": f"v1/{tenant.id}/d/{device}/telemetry", **mine},
        {"action": "publish", "topic": f"v1/{tenant.id}/d/{device}/telemetry", "qos": "x", **mine},
        {"action": "publish", "topic": "v1/x/d/y/telemetry", "clientid": "y", "tenant": "bad/tenant", "device": "y"},
    ]
    for case in denied:
        assert authz(client, **case)["result"] == "deny", case
    resp = client.post("/mqtt/authz", json=mine | {"action": "publish", "topic": "t"}, headers={})
    assert resp.status_code == 401


def test_backend_principals(client: TestClient, isolated_db: str) -> None:  # type: ignore[type-arg]

    name = f"ingest-{uuid.uuid4().hex[:6]}"
    secret = seed.create_service_principal(isolated_db, name, "ingest")
    with psycopg.connect(isolated_db) as conn:
        stored = conn.execute("SELECT secret_sha256 FROM service_principals WHERE name = %s", (name,)).fetchone()
    assert stored is not None and secret not in stored[0]  # only the digest is kept
    ok = authn(client, body(None, f"svc:{name}:a", username=name, password=secret))
    assert ok["result"] == "allow"
    assert ok["is_superuser"] is False
    assert ok["acl"][-1] == {"permission": "deny", "action": "all", "topic": "#"}
    assert {r["action"] for r in ok["acl"][:-1]} == {"subscribe"}
    for clientid, username, password in [
        (f"svc:{name}:a", name, secret + "x"),
        (f"svc:{name}:a", name, "ksvc_" + "A" * 43),
        ("svc:other:a", name, secret),
        ("plain-device-id", name, secret),
        (f"svc:{name}:a:b", name, secret),
        (f"svc:{name}:", name, secret),
        (f"svc:{name}:a", "", secret),
    ]:
        assert authn(client, body(None, clientid, username=username, password=password))["result"] == "deny"
    with pytest.raises(Conflict):
        seed.create_service_principal(isolated_db, name, "ingest")
    rotated = seed.create_service_principal(isolated_db, name, "ingest", rotate=True)
    # The cache holds the principal for 30 s: only the rotation's notification can end the old secret sooner.
    assert wait_until(
        lambda: authn(client, body(None, f"svc:{name}:a", username=name, password=secret))["result"] == "deny", 5
    )
    assert authn(client, body(None, f"svc:{name}:a", username=name, password=rotated))["result"] == "allow"
    seed.revoke_service_principal(isolated_db, name)
    assert wait_until(
        lambda: authn(client, body(None, f"svc:{name}:a", username=name, password=rotated))["result"] == "deny", 5
    )
