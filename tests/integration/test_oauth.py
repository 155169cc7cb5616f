"""OAuth 2.0 client credentials for integrators: the token endpoint, access tokens on the API, revocation, key
rotation, and the attacks one would try on a JWT-based bearer scheme."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from litestar.testing import TestClient

from api.app import create_app
from api.auth.access_tokens import new_signing_key_pem
from api.settings import ApiSettings
from kestrel_core.settings import Secret
from tests.conftest import new_tenant, tenant_token

pytestmark = pytest.mark.integration


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    current, old = tmp_path / "current.pem", tmp_path / "old.pem"
    current.write_bytes(new_signing_key_pem())
    old.write_bytes(new_signing_key_pem())
    return current, old


def _app(api_database_url: str, key: Path, previous: str = "") -> TestClient:  # type: ignore[type-arg]
    settings = ApiSettings(
        admin_token=Secret("p-" + uuid.uuid4().hex), signing_key_file=str(key), previous_signing_keys=previous
    )
    return TestClient(create_app(settings, api_database_url))


@pytest.fixture
def client(api_database_url: str, keys: tuple[Path, Path]) -> Iterator[TestClient]:  # type: ignore[type-arg]
    with _app(api_database_url, keys[0]) as c:
        yield c


def _token(client: TestClient, client_id: str, secret: str, scope: str = "", basic: bool = True):  # type: ignore[no-untyped-def,type-arg]
    form = {"grant_type": "client_credentials"} | ({"scope": scope} if scope else {})
    if basic:
        auth = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        return client.post("/api/v1/oauth/token", data=form, headers={"Authorization": f"Basic {auth}"})
    return client.post("/api/v1/oauth/token", data=form | {"client_id": client_id, "client_secret": secret})


def test_client_credentials_flow_scopes_and_revocation(client: TestClient, database_url: str) -> None:  # type: ignore[type-arg]
    tenant = new_tenant(database_url, 2, prefix="oa")
    other = new_tenant(database_url, 1, prefix="oa")
    admin = tenant_token(database_url, tenant.id)
    made = client.post("/api/v1/oauth-clients", json={"scopes": ["devices:read"], "name": "erp"}, headers=admin).json()
    assert made["client_secret"].startswith("kcs_")
    listed = client.get("/api/v1/oauth-clients", headers=admin).json()
    assert [c["client_id"] for c in listed] == [made["client_id"]] and "client_secret" not in listed[0]

    issued = _token(client, made["client_id"], made["client_secret"])
    assert issued.status_code == 200, issued.text
    assert issued.headers["cache-control"] == "no-store"
    body = issued.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 900 and body["scope"] == "devices:read"
    bearer = {"Authorization": f"Bearer {body['access_token']}"}
    devices = client.get("/api/v1/devices", headers=bearer).json()["items"]
    assert {d["device_id"] for d in devices} == set(tenant.devices)  # its own tenant only
    assert client.get(f"/api/v1/devices/{other.devices[0]}", headers=bearer).status_code == 404
    assert client.get("/api/v1/audit", headers=bearer).status_code == 403  # scope
    assert _token(client, made["client_id"], made["client_secret"], basic=False).status_code == 200

    refusals = {
        "wrong secret": _token(client, made["client_id"], "kcs_wrong"),
        "unknown client": _token(client, "kcl_0000000000000000", made["client_secret"]),
        "more scope than allowed": _token(client, made["client_id"], made["client_secret"], scope="devices:write"),
    }
    assert refusals["wrong secret"].status_code == 401 and refusals["wrong secret"].json()["error"] == "invalid_client"
    assert refusals["unknown client"].status_code == 401
    assert refusals["more scope than allowed"].json()["error"] == "invalid_scope"
    bad_grant = client.post("/api/v1/oauth/token", data={"grant_type": "password"})
    assert bad_grant.status_code == 400 and bad_grant.json()["error"] == "unsupported_grant_type"

    assert client.delete(f"/api/v1/oauth-clients/{made['client_id']}", headers=admin).status_code == 204
    assert client.get("/api/v1/devices", headers=bearer).status_code == 401  # revoked: its tokens end now
    assert _token(client, made["client_id"], made["client_secret"]).status_code == 401


def _hs256(claims: dict[str, object], secret: bytes, kid: str) -> str:
    """Key confusion by hand (PyJWT refuses to build it): an HMAC keyed with our public key."""
    import hashlib  # noqa: PLC0415
    import hmac  # noqa: PLC0415
    import json  # noqa: PLC0415

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = b64(json.dumps(claims).encode())
    return f"{head}.{body}." + b64(hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest())


def test_forged_and_expired_access_tokens_are_refused(
    client: TestClient, database_url: str, keys: tuple[Path, Path]
) -> None:  # type: ignore[type-arg]
    tenant = new_tenant(database_url, 1, prefix="oa")
    other = new_tenant(database_url, 1, prefix="oa")
    admin = tenant_token(database_url, tenant.id)
    made = client.post("/api/v1/oauth-clients", json={"scopes": ["devices:read"]}, headers=admin).json()
    real = jwt.decode(
        _token(client, made["client_id"], made["client_secret"]).json()["access_token"],
        options={"verify_signature": False},
    )
    current = serialization.load_pem_private_key(keys[0].read_bytes(), None)
    kid = jwt.get_unverified_header(_token(client, made["client_id"], made["client_secret"]).json()["access_token"])[
        "kid"
    ]
    stranger = ed25519.Ed25519PrivateKey.generate()
    public_pem = current.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    forgeries = {
        "signed by another key under our kid": jwt.encode(real, stranger, algorithm="EdDSA", headers={"kid": kid}),
        "alg none": jwt.encode(real, None, algorithm="none", headers={"kid": kid}),
        "HS256 with our public key as secret": _hs256(real, public_pem, kid),
        "expired": jwt.encode(
            real | {"exp": now - 60, "iat": now - 1000}, current, algorithm="EdDSA", headers={"kid": kid}
        ),
        "another audience": jwt.encode(real | {"aud": "other"}, current, algorithm="EdDSA", headers={"kid": kid}),
        "tenant swapped": jwt.encode(real | {"tenant": other.id}, current, algorithm="EdDSA", headers={"kid": kid}),
        "scope widened": jwt.encode(
            real | {"scope": "devices:read devices:write audit:read"}, current, algorithm="EdDSA", headers={"kid": kid}
        ),
        "unknown kid": jwt.encode(real, current, algorithm="EdDSA", headers={"kid": "0" * 16}),
    }
    for name, forged in forgeries.items():
        resp = client.get("/api/v1/audit", headers={"Authorization": f"Bearer {forged}"})
        # "scope widened" is validly signed (we hold the key here): the client's own scopes still cap it.
        assert resp.status_code in ((403,) if name == "scope widened" else (401,)), (name, resp.status_code)


def test_signing_key_rotation(api_database_url: str, database_url: str, keys: tuple[Path, Path]) -> None:
    current, old = keys
    tenant = new_tenant(database_url, 1, prefix="oa")
    admin = tenant_token(database_url, tenant.id)
    with _app(api_database_url, old) as before:
        made = before.post("/api/v1/oauth-clients", json={"scopes": ["devices:read"]}, headers=admin).json()
        old_token = _token(before, made["client_id"], made["client_secret"]).json()["access_token"]
    old_public = current.parent / "old-public.pem"
    old_key = serialization.load_pem_private_key(old.read_bytes(), None)
    old_public.write_bytes(
        old_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    bearer = {"Authorization": f"Bearer {old_token}"}
    with _app(api_database_url, current, previous=str(old_public)) as during:
        assert during.get("/api/v1/devices", headers=bearer).status_code == 200  # still accepted while rotating
        fresh = _token(during, made["client_id"], made["client_secret"]).json()["access_token"]
        assert jwt.get_unverified_header(fresh)["kid"] != jwt.get_unverified_header(old_token)["kid"]
    with _app(api_database_url, current) as after:
        assert after.get("/api/v1/devices", headers=bearer).status_code == 401  # the old key is gone
        assert after.get("/api/v1/devices", headers={"Authorization": f"Bearer {fresh}"}).status_code == 200
