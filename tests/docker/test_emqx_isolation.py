"""The broker isolation cases against EMQX 5.8 (testcontainers) running broker/emqx/emqx.conf, where a Docker
engine exists.

This machine has none, so here the module skips with that reason; the GitHub workflow's Docker job runs it.
EMQX runs with host networking and every listener rebound to 127.0.0.1 on free ports, so all traffic stays on
loopback; authsvc and PostgreSQL are the same real processes the Mosquitto suite uses. The config is the
committed file with only the bind addresses, certificate paths and authsvc URL rewritten.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kestrel.devtools import seed
from kestrel.devtools.servers import PostgresServer, free_port, http_ok
from kestrel.runtime.mqttclient import MqttPublisher
from pki.builtin import BuiltinCA
from tests.conftest import REPO, ServiceProcess, isolated_database, wait_until
from tests.docker import docker_unavailable

pytestmark = pytest.mark.docker

_reason = docker_unavailable("EMQX 5.8")
if _reason:
    pytest.skip(_reason, allow_module_level=True)

from tests.e2e.test_broker_security import NOT_AUTHORIZED, SUBACK_REFUSED, connected, refused  # noqa: E402

EMQX_IMAGE = "emqx/emqx:5.8.9"
PASSPHRASE = "emqx-suite-" + uuid.uuid4().hex


class EmqxStack:
    def __init__(self, url: str, root: Path, mtls: int, jwt_port: int) -> None:
        self.url, self.root, self.mtls, self.jwt_port = url, root, mtls, jwt_port
        self.ca = BuiltinCA(url, PASSPHRASE)

    def device(self) -> tuple[str, str, Path, Path]:
        tag = uuid.uuid4().hex[:8]
        tenant, device = f"t-{tag}", f"d-{tag}"
        seed.create_tenant(self.url, tenant)
        seed.create_devices(self.url, tenant, [device, f"{device}-b"])
        self.ca.create_tenant_ca(tenant, "test")
        out = self.root / device
        out.mkdir()
        from cryptography import x509  # noqa: PLC0415
        from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
        from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
        from cryptography.x509.oid import NameOID  # noqa: PLC0415

        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)]))
            .sign(key, hashes.SHA256())
        )
        issued = self.ca.sign_csr(csr.public_bytes(serialization.Encoding.PEM), device, 30, "test")
        (out / "d.crt").write_text(issued.full_chain_pem)
        (out / "d.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return tenant, device, out / "d.crt", out / "d.key"

    def tls(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.root / "certs" / "ca.pem"))
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key))
        return ctx


def _config(authsvc_port: int, mtls: int, jwt_port: int, certs: Path, dashboard: int) -> str:
    text = (REPO / "broker" / "emqx" / "emqx.conf").read_text()
    text = text.replace('bind = "0.0.0.0:8883"', f'bind = "127.0.0.1:{mtls}"')
    text = text.replace('bind = "0.0.0.0:8884"', f'bind = "127.0.0.1:{jwt_port}"')
    text = text.replace("/etc/emqx/certs/", f"{certs}/")
    text = re.sub(
        r'url = "http://authsvc:8090/mqtt/authn"', f'url = "http://127.0.0.1:{authsvc_port}/mqtt/authn"', text
    )
    return text + (
        f'\ndashboard.listeners.http.bind = "127.0.0.1:{dashboard}"\n'
        f'api_key {{ bootstrap_file = "{certs}/api_keys" }}\n'  # the REST key authsvc kicks with
    )


@pytest.fixture(scope="module")
def emqx(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmqxStack]:
    from testcontainers.core.container import DockerContainer  # noqa: PLC0415

    root = tmp_path_factory.mktemp("emqx")
    url = isolated_database(postgres, "emqx")
    ca = BuiltinCA(url, PASSPHRASE)
    ca.init_root("test")
    certs = root / "certs"
    certs.mkdir()
    cert_pem, key_pem = ca.issue_server(["localhost"], ["127.0.0.1"], 30, "test")
    (certs / "server.pem").write_text(cert_pem)
    (certs / "server.key").write_text(key_pem)
    (certs / "ca.pem").write_text(ca.root_pem())
    for f in certs.iterdir():
        f.chmod(0o644)  # the container's emqx user reads them; throwaway test keys
    key, authsvc_port, mtls, jwt_port = "bk-" + uuid.uuid4().hex, free_port(), free_port(), free_port()
    dashboard, api_secret = free_port(), "s" + uuid.uuid4().hex
    (certs / "api_keys").write_text(f"kestrel-authsvc:{api_secret}\n")
    (certs / "api_keys").chmod(0o644)
    authsvc = ServiceProcess(
        name="authsvc",
        log_path=root / "authsvc.log",
        argv=[sys.executable, "-m", "authsvc"],
        env=os.environ | {"KESTREL_DATABASE_URL": url, "KESTREL_AUTHSVC_PORT": str(authsvc_port),
                          "KESTREL_AUTHSVC_BROKER_KEY": key,
                          "KESTREL_AUTHSVC_KICK_EMQX_URL": f"http://127.0.0.1:{dashboard}",
                          "KESTREL_AUTHSVC_KICK_EMQX_KEY": "kestrel-authsvc",
                          "KESTREL_AUTHSVC_KICK_EMQX_SECRET": api_secret},
    )  # fmt: skip
    authsvc.start()
    assert wait_until(lambda: http_ok(f"http://127.0.0.1:{authsvc_port}/healthz"), 30)
    conf = root / "emqx.conf"
    conf.write_text(_config(authsvc_port, mtls, jwt_port, certs, dashboard))
    container = (
        DockerContainer(EMQX_IMAGE)
        .with_env("KESTREL_AUTHSVC_BROKER_KEY", key)
        .with_volume_mapping(str(conf), "/opt/emqx/etc/emqx.conf", "ro")
        .with_volume_mapping(str(certs), str(certs), "ro")
        .with_kwargs(network_mode="host")
    )
    with container:
        stack = EmqxStack(url, root, mtls, jwt_port)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                asyncio.run(asyncio.wait_for(asyncio.open_connection("127.0.0.1", mtls), 1))
                break
            except OSError:
                time.sleep(1)
        yield stack
    authsvc.stop()


def test_device_is_admitted_and_confined_on_emqx(emqx: EmqxStack) -> None:
    tenant, device, crt, key = emqx.device()

    async def scenario() -> None:
        client = await connected(MqttPublisher("127.0.0.1", emqx.mtls, device, tls=emqx.tls(crt, key)))
        assert await client.publish(f"v1/{tenant}/d/{device}/telemetry", b"{}") < 0x80
        assert await client.publish(f"v1/{tenant}/d/{device}-b/telemetry", b"{}") == NOT_AUTHORIZED
        assert await client.subscribe(f"v1/{tenant}/d/{device}/cmd/+") == 1
        for topic_filter in ("#", "+/#", "$SYS/#", "$share/ingest/v1/+/d/+/telemetry", f"v1/{tenant}/#"):
            assert await client.subscribe(topic_filter) == SUBACK_REFUSED, topic_filter
        await client.close()

    asyncio.run(scenario())


def test_wrong_identities_are_refused_on_emqx(emqx: EmqxStack) -> None:
    _, device, crt, key = emqx.device()
    _, other, other_crt, other_key = emqx.device()

    async def scenario() -> list[str]:
        return [
            await refused(MqttPublisher("127.0.0.1", emqx.mtls, other, tls=emqx.tls(crt, key))),
            await refused(MqttPublisher("127.0.0.1", emqx.mtls, device, tls=emqx.tls(other_crt, other_key))),
            await refused(MqttPublisher("127.0.0.1", emqx.jwt_port, device, tls=emqx.tls(), password="not-a-jwt")),
        ]

    assert asyncio.run(scenario()) == [f"connack {NOT_AUTHORIZED:#x}"] * 3


def test_revocation_cuts_off_a_live_emqx_session(emqx: EmqxStack) -> None:
    tenant, device, crt, key = emqx.device()

    async def scenario() -> None:
        live = await connected(MqttPublisher("127.0.0.1", emqx.mtls, device, tls=emqx.tls(crt, key)))
        assert await live.publish(f"v1/{tenant}/d/{device}/telemetry", b"{}") < 0x80
        emqx.ca.revoke_device(device, "key_compromise", "test")
        await asyncio.wait_for(live.closed.wait(), 10)  # authsvc kicked it through EMQX's REST API
        again = await refused(MqttPublisher("127.0.0.1", emqx.mtls, device, tls=emqx.tls(crt, key)))
        assert again == f"connack {NOT_AUTHORIZED:#x}"

    asyncio.run(scenario())
