"""Just-in-time provisioning attacked (issue 12, item 5), on the production path: devices holding a claim connect over
TLS through our plugin and ask the provisioner. Malformed requests, CSRs naming another device, broken signatures,
unsupported keys and oversized requests each get their precise reason; used-up and expired claims do not even
connect. Nothing is partially applied: one claim use, one device and one certificate for the one request that was
right, which is answered again (same certificate, no second use) when it is repeated.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from kestrel.devtools.servers import NatsServer, PostgresServer
from kestrel.runtime.mqttclient import MqttPublisher
from kestrel.store import claims
from kestrel.store.session import operator, run_blocking
from kestrel_core.topics import provision_topics
from kestrel_device.client import new_device_key
from tests.prodstack import ProdStack, connect_outcome, prod_stack

pytestmark = pytest.mark.e2e
NOT_A_CSR = b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"


@pytest.fixture(scope="module")
def stack(
    postgres: PostgresServer, nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProdStack]:
    root: Path = tmp_path_factory.mktemp("hostile-jit")
    with prod_stack(postgres, nats_server, root, services=("authsvc", "provisioner")) as s:
        yield s


def claim(stack: ProdStack, tenant: str, uses: int = 1) -> str:
    token, _ = run_blocking(stack.url, lambda c: claims.create(c, operator(), tenant, max_uses=uses), tenant=tenant)
    return str(token)


def ask(stack: ProdStack, tenant: str, token: str, device: str, payload: bytes) -> dict[str, Any]:
    """Send ``payload`` as ``prov:{device}`` with the claim; the provisioner's answer."""
    request_topic, response_topic = provision_topics(tenant, token.split("_")[1], device)
    answers: queue.Queue[bytes] = queue.Queue()
    subscribed = threading.Event()
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"prov:{device}", protocol=paho.MQTTv5)
    client.tls_set_context(stack.tls())
    client.username_pw_set("claim", token)
    client.on_message = lambda _c, _u, message: answers.put(message.payload)
    client.on_subscribe = lambda *_: subscribed.set()
    client.connect("127.0.0.1", stack.auth.jwt_port)
    client.loop_start()
    try:
        client.subscribe(response_topic, qos=1)
        assert subscribed.wait(10), "no SUBACK"
        client.publish(request_topic, payload, qos=1).wait_for_publish(10)
        return dict(json.loads(answers.get(timeout=20)))
    finally:
        client.disconnect()
        client.loop_stop()


def csr(device: str, key: Any) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)])
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(name)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def broken_signature(pem: bytes) -> bytes:
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0xFF  # inside the signature
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)


def request(pem: bytes) -> bytes:
    return json.dumps({"csr": pem.decode()}).encode()


def refused_at_connect(stack: ProdStack, token: str, device: str) -> int | str:
    client = MqttPublisher(
        "127.0.0.1", stack.auth.jwt_port, f"prov:{device}", tls=stack.tls(), username="claim", password=token
    )
    return asyncio.run(connect_outcome(client))


def test_hostile_provisioning_requests_get_their_reason_and_change_nothing(stack: ProdStack) -> None:
    tenant, _ = stack.tenant(0, "jit")
    token = claim(stack, tenant)
    device = f"{tenant}-new"
    _key, good_csr = new_device_key(device)
    hostile = {
        "not JSON": (b"\x00\xffnot json", "bad_request"),
        "no csr field": (b'{"certificate": "please"}', "bad_request"),
        "not a CSR": (request(NOT_A_CSR), "bad_csr"),
        "another device's name": (request(new_device_key(f"{tenant}-victim")[1]), "csr_cn_mismatch"),
        "broken self-signature": (request(broken_signature(good_csr)), "bad_csr"),
        "secp256k1 key": (request(csr(device, ec.generate_private_key(ec.SECP256K1()))), "weak_key"),
        "RSA 1024 key": (request(csr(device, rsa.generate_private_key(65537, 1024))), "weak_key"),  # noqa: S505
        "oversized": (request(good_csr + b"#" * 70_000), "request_too_large"),
    }
    for what, (payload, reason) in hostile.items():
        answer = ask(stack, tenant, token, device, payload)
        assert (answer.get("status"), answer.get("error")) == ("error", reason), f"{what}: {answer}"
        assert answer.get("detail"), what
    with psycopg.connect(stack.url) as conn:
        assert conn.execute("SELECT used FROM provisioning_claims WHERE tenant_id = %s", (tenant,)).fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM devices WHERE tenant_id = %s", (tenant,)).fetchone() == (0,)

    granted = ask(stack, tenant, token, device, request(good_csr))  # the control: the right request is served
    assert granted.get("status") == "ok" and granted.get("device_id") == device, granted
    # Its answer was lost: the device asks again with the used-up claim and gets the same certificate; with another
    # key it gets nothing.
    again = ask(stack, tenant, token, device, request(good_csr))
    assert again.get("serial") == granted["serial"], again
    other_key = ask(stack, tenant, token, device, request(new_device_key(device)[1]))
    assert (other_key.get("status"), other_key.get("error")) == ("error", "conflict"), other_key
    with psycopg.connect(stack.url) as conn:
        assert conn.execute("SELECT used FROM provisioning_claims WHERE tenant_id = %s", (tenant,)).fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM devices WHERE tenant_id = %s", (tenant,)).fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM pki_certificates WHERE tenant_id = %s", (tenant,)).fetchone() == (1,)

    # The claim is used up: another device holding it does not even get a session. So with an expired claim.
    assert refused_at_connect(stack, token, f"{tenant}-second") == 0x87
    expired = claim(stack, tenant, uses=5)
    with psycopg.connect(stack.url, autocommit=True) as conn:
        conn.execute(
            "UPDATE provisioning_claims SET expires_at = now() - interval '1 second' WHERE claim_id = %s",
            (expired.split("_")[1],),
        )
    assert refused_at_connect(stack, expired, f"{tenant}-third") == 0x87
    fresh = claim(stack, tenant)  # the control: a valid claim still connects
    assert refused_at_connect(stack, fresh, f"{tenant}-fourth") == 0
