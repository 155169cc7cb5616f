"""Device identity benchmarks (not tests), each against a ceiling measured in the same run:

1. authsvc: POST /mqtt/authn for certificate devices (p50/p99, rate) against GET /healthz through the same
   server and client (the HTTP floor).
2. mTLS connects per second through Mosquitto + our plugin + authsvc (TLS handshake, CONNECT, authsvc
   decision, CONNACK, DISCONNECT) against the same Mosquitto binary with a plain mTLS listener and no plugin.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpload
import httpx
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from scale import pick

from kestrel.devtools import seed
from kestrel.devtools.servers import LOOPBACK, BrokerAuth, MosquittoServer, PostgresServer, free_port
from kestrel.runtime.mqttclient import MqttPublisher
from kestrel.store.migrate import migrate
from pki.builtin import BuiltinCA

PASSPHRASE = "bench-passphrase-" + uuid.uuid4().hex
DEVICES = pick(200, 10)
REQUESTS = pick(4000, 100)
CONNECTS = pick(2000, 40)
KEY = "bench-broker-key"


def _authn_request(port: int, body: dict[str, str]) -> bytes:
    headers = {"content-type": "application/json", "x-authsvc-key": KEY}
    return httpload.request(port, "POST", "/mqtt/authn", headers, json.dumps(body).encode())


@dataclass
class RawTlsMosquitto(MosquittoServer):
    """The ceiling: the same Mosquitto binary with an mTLS listener, no plugin, nobody asked."""

    tls_dir: Path = Path()
    tls_port: int = 0

    def config_text(self) -> str:
        return super().config_text() + (
            f"listener {self.tls_port} {LOOPBACK}\ncertfile {self.tls_dir / 'server.crt'}\n"
            f"keyfile {self.tls_dir / 'server.key'}\ncafile {self.tls_dir / 'ca.pem'}\n"
            "require_certificate true\ntls_version tlsv1.2\n"
        )


async def connect_rate(
    port: int, contexts: list[tuple[str, ssl.SSLContext]], total: int, concurrency: int
) -> tuple[float, float, float]:
    """Full mTLS connects (handshake, CONNECT/CONNACK, DISCONNECT) per second, with p50/p99 in ms."""
    latencies: list[float] = []
    queue = list(range(total))

    async def worker() -> None:
        while queue:
            device, ctx = contexts[queue.pop() % len(contexts)]
            started = time.perf_counter()
            client = MqttPublisher(LOOPBACK, port, device, tls=ctx, keepalive=60)
            await client.connect()
            latencies.append(time.perf_counter() - started)
            await client.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return total / elapsed, 1000 * statistics.median(latencies), 1000 * latencies[int(len(latencies) * 0.99)]


def _enrol(ca: BuiltinCA, devices: list[str], out: Path) -> list[dict[str, str]]:
    """Certificates for every device: the authn bodies, and key + full-chain files for the TLS clients."""
    bodies = []
    for device in devices:
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)]))
            .sign(key, hashes.SHA256())
        )
        issued = ca.sign_csr(csr.public_bytes(serialization.Encoding.PEM), device, 30, "bench")
        (out / f"{device}.crt").write_text(issued.full_chain_pem)
        (out / f"{device}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        der = x509.load_pem_x509_certificate(issued.cert_pem.encode()).public_bytes(serialization.Encoding.DER)
        bodies.append(
            {
                "broker": "emqx",
                "clientid": device,
                "username": "",
                "password": "",
                "peerhost": "127.0.0.1",
                "cert_subject": "",
                "cert_common_name": device,
                "cert_pem": base64.b64encode(der).decode(),
            }
        )
    return bodies


def _wait_http(url: str) -> None:
    for _ in range(100):
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="kestrel-identitybench-"))
    root.chmod(0o755)
    pg = PostgresServer(name="postgres", log_path=root / "pg.log", root=root / "pg", port=free_port())
    pg.start()
    procs: list[subprocess.Popen[bytes]] = []
    brokers: list[MosquittoServer] = []
    try:
        migrate(pg.url)
        ca = BuiltinCA(pg.url, PASSPHRASE)
        ca.init_root("bench")
        seed.create_tenant(pg.url, "bench")
        devices = [f"auth-{i:04d}" for i in range(DEVICES)]
        seed.create_devices(pg.url, "bench", devices)
        ca.create_tenant_ca("bench", "bench")
        clients = root / "clients"
        clients.mkdir()
        bodies = _enrol(ca, devices, clients)
        tls = root / "tls"
        tls.mkdir(mode=0o755)
        cert_pem, key_pem = ca.issue_server(["localhost"], ["127.0.0.1"], 30, "bench")
        (tls / "server.crt").write_text(cert_pem)
        (tls / "server.key").write_text(key_pem)
        (tls / "server.key").chmod(0o644)  # a throwaway bench key the mosquitto user must read
        (tls / "ca.pem").write_text(ca.root_pem())

        port = free_port()
        env = dict(
            os.environ, KESTREL_DATABASE_URL=pg.url, KESTREL_AUTHSVC_PORT=str(port), KESTREL_AUTHSVC_BROKER_KEY=KEY
        )
        procs.append(
            subprocess.Popen([sys.executable, "-m", "authsvc"], env=env, stderr=(root / "authsvc.log").open("w"))
        )
        _wait_http(f"http://127.0.0.1:{port}/healthz")
        allowed = lambda status, payload: status == 200 and b'"result":"allow"' in payload  # noqa: E731
        authn = [_authn_request(port, b) for b in bodies]
        floor = uvloop.run(httpload.measure(port, [httpload.request(port, "GET", "/healthz")], REQUESTS, 16))
        cold = uvloop.run(httpload.measure(port, authn, len(authn), 16, allowed))  # each device once: uncached
        auth = uvloop.run(httpload.measure(port, authn, REQUESTS, 16, allowed))
        print(f"authsvc (one process), 16 keep-alive connections, {REQUESTS:,} requests each, lean raw-socket client:")
        print(
            f"  POST /mqtt/authn, first connect of each of {DEVICES} devices (database lookups): "
            f"{cold[0]:,.0f} req/s   p50 {cold[1]:.2f} ms   p99 {cold[2]:.2f} ms"
        )
        print(
            f"  HTTP floor (GET /healthz):        {floor[0]:>7,.0f} req/s   "
            f"p50 {floor[1]:.2f} ms   p99 {floor[2]:.2f} ms"
        )
        print(
            f"  POST /mqtt/authn (cached lookups): {auth[0]:>6,.0f} req/s   p50 {auth[1]:.2f} ms   p99 {auth[2]:.2f} ms"
        )
        print(f"  ratio to the HTTP floor: {auth[0] / floor[0]:.2f}")

        raw = RawTlsMosquitto(
            name="raw",
            log_path=root / "raw.log",
            root=root / "raw",
            port=free_port(),
            tls_dir=tls,
            tls_port=free_port(),
        )
        secured = MosquittoServer(
            name="secured",
            log_path=root / "secured.log",
            root=root / "secured",
            port=free_port(),
            auth=BrokerAuth(
                authn_url=f"http://127.0.0.1:{port}/mqtt/authn",
                broker_key=KEY,
                server_cert=tls / "server.crt",
                server_key=tls / "server.key",
                ca_file=tls / "ca.pem",
                mtls_port=free_port(),
                jwt_port=free_port(),
            ),
        )
        for broker in (raw, secured):
            broker.start()
            brokers.append(broker)
        contexts = []
        for device in devices:
            ctx = ssl.create_default_context(cafile=str(tls / "ca.pem"))
            ctx.load_cert_chain(str(clients / f"{device}.crt"), str(clients / f"{device}.key"))
            contexts.append((device, ctx))
        assert secured.auth is not None
        ceiling = uvloop.run(connect_rate(raw.tls_port, contexts, CONNECTS, 16))
        through = uvloop.run(connect_rate(secured.auth.mtls_port, contexts, CONNECTS, 16))
        print(
            f"mTLS connects (TLS handshake + CONNECT/CONNACK + DISCONNECT), 16 concurrent, {CONNECTS:,} each,"
            f" {DEVICES} devices:"
        )
        for label, (rate, p50, p99) in (
            ("Mosquitto, no plugin (ceiling):", ceiling),
            ("Mosquitto + plugin + authsvc:", through),
        ):
            print(f"  {label:<34} {rate:>6,.0f} /s   p50 {p50:.1f} ms   p99 {p99:.1f} ms")
        print(f"  ratio to the ceiling: {through[0] / ceiling[0]:.2f}")
    finally:
        for broker in brokers:
            broker.stop()
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
