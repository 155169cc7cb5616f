"""EMQX's configuration must fail closed, and its authn body must be exactly what authsvc reads."""

from __future__ import annotations

import msgspec
import pytest
from pyhocon import ConfigFactory, ConfigTree

from authsvc.contract import AuthnRequest
from tests.conftest import REPO

CONF = REPO / "broker" / "emqx" / "emqx.conf"


@pytest.fixture(scope="module")
def conf(monkeypatch_module: pytest.MonkeyPatch) -> ConfigTree:
    monkeypatch_module.setenv("KESTREL_AUTHSVC_BROKER_KEY", "from-the-environment")
    return ConfigFactory.parse_file(str(CONF))


@pytest.fixture(scope="module")
def monkeypatch_module() -> pytest.MonkeyPatch:  # type: ignore[misc]
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_no_plain_listener_and_mtls_requires_a_certificate(conf: ConfigTree) -> None:
    assert conf["listeners.tcp.default.enable"] is False
    assert conf["listeners.ws.default.enable"] is False
    mtls = conf["listeners.ssl.default.ssl_options"]
    assert mtls["verify"] == "verify_peer"
    assert mtls["fail_if_no_peer_cert"] is True
    assert conf["listeners.ssl.default.bind"].endswith(":8883")
    assert conf["listeners.ssl.jwt.bind"].endswith(":8884")
    assert conf["listeners.ssl.jwt.ssl_options.verify"] == "verify_none"
    assert "tlsv1" not in mtls["versions"] and "tlsv1.1" not in mtls["versions"]


def test_identity_is_never_taken_from_certificate_fields(conf: ConfigTree) -> None:
    assert conf["mqtt.peer_cert_as_username"] == "disabled"
    assert conf["mqtt.peer_cert_as_clientid"] == "disabled"


def test_authorization_fails_closed(conf: ConfigTree) -> None:
    authz = conf["authorization"]
    assert authz["no_match"] == "deny"
    assert all(source["type"] != "file" for source in authz["sources"])  # the default acl.conf allows all
    assert authz["cache.enable"] is True


def test_authn_calls_authsvc_with_exactly_its_contract(conf: ConfigTree) -> None:
    [authn] = conf["authentication"]
    assert (authn["mechanism"], authn["backend"], authn["method"]) == ("password_based", "http", "post")
    assert authn["url"].endswith("/mqtt/authn")
    assert authn["headers"]["x-authsvc-key"] == "from-the-environment"  # never a literal in the file
    expected = {f.name for f in msgspec.structs.fields(AuthnRequest)}
    assert set(authn["body"]) == expected
    for field, value in authn["body"].items():
        assert value == ("emqx" if field == "broker" else "${" + field + "}"), field
    # short: a slow authsvc must not hold connects (pyhocon gives a relativedelta when python-dateutil is present)
    timeout = authn["request_timeout"]
    assert (timeout.seconds, getattr(timeout, "days", 0)) == (3, 0)


def test_the_file_holds_no_secret() -> None:
    text = CONF.read_text()
    assert "change-me" not in text
    assert 'x-authsvc-key" = ${KESTREL_AUTHSVC_BROKER_KEY}' in text
