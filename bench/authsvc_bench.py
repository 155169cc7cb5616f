"""authsvc latency: certificate authentications on the EMQX contract, against the same HTTP stack's floor.

Not a test: prints p50/p99 and rate for POST /mqtt/authn (mTLS devices) and, as the ceiling measured in the
same run, GET /healthz through the same server and client.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kestrel.db import registry
from kestrel.db.migrate import migrate
from kestrel.servers import PostgresServer, free_port
from pki.builtin import BuiltinCA

PASSPHRASE = "bench-passphrase-" + uuid.uuid4().hex
KEY = "bench-broker-key"


async def _call(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes]:
    """One keep-alive HTTP/1.1 exchange on raw streams (a lean client, so the client is not what we measure)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return status, await reader.readexactly(length)


def _request(port: int, path: str, body: dict[str, str] | None) -> bytes:
    if body is None:
        return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    data = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
        f"x-authsvc-key: {KEY}\r\ncontent-length: {len(data)}\r\n\r\n"
    ).encode() + data


async def measure(
    port: int, path: str, bodies: list[dict[str, str]] | None, total: int, concurrency: int
) -> tuple[float, float, float]:
    requests = [_request(port, path, b) for b in bodies] if bodies else [_request(port, path, None)]
    latencies: list[float] = []
    queue = list(range(total))

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while queue:
            i = queue.pop()
            started = time.perf_counter()
            status, payload = await _call(reader, writer, requests[i % len(requests)])
            latencies.append(time.perf_counter() - started)
            assert status == 200, payload
            if bodies is not None:
                assert b'"result":"allow"' in payload, payload
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return total / elapsed, 1000 * statistics.median(latencies), 1000 * latencies[int(len(latencies) * 0.99)]


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="kestrel-authbench-"))
    root.chmod(0o755)
    pg = PostgresServer(name="postgres", log_path=root / "pg.log", root=root / "pg", port=free_port())
    pg.start()
    proc = None
    try:
        migrate(pg.url)
        ca = BuiltinCA(pg.url, PASSPHRASE)
        ca.init_root("bench")
        registry.create_tenant(pg.url, "bench")
        devices = [f"auth-{i:04d}" for i in range(200)]
        registry.create_devices(pg.url, "bench", devices)
        ca.create_tenant_ca("bench", "bench")
        bodies = []
        for device in devices:
            key = ec.generate_private_key(ec.SECP256R1())
            csr = (
                x509.CertificateSigningRequestBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)]))
                .sign(key, hashes.SHA256())
            )
            issued = ca.sign_csr(csr.public_bytes(serialization.Encoding.PEM), device, 30, "bench")
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
        port = free_port()
        env = dict(
            os.environ, KESTREL_DATABASE_URL=pg.url, KESTREL_AUTHSVC_PORT=str(port), KESTREL_AUTHSVC_BROKER_KEY=KEY
        )
        proc = subprocess.Popen([sys.executable, "-m", "authsvc"], env=env, stderr=(root / "authsvc.log").open("w"))
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        floor = uvloop.run(measure(port, "/healthz", None, 4000, 16))
        auth = uvloop.run(measure(port, "/mqtt/authn", bodies, 4000, 16))
        print("authsvc (one process), 16 keep-alive connections, 4,000 requests each, lean raw-socket client:")
        print(
            f"  HTTP floor (GET /healthz):        {floor[0]:>7,.0f} req/s   "
            f"p50 {floor[1]:.2f} ms   p99 {floor[2]:.2f} ms"
        )
        print(
            f"  POST /mqtt/authn (certificates):  {auth[0]:>7,.0f} req/s   p50 {auth[1]:.2f} ms   p99 {auth[2]:.2f} ms"
        )
        print(f"  ratio to the HTTP floor: {auth[0] / floor[0]:.2f}")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        pg.stop()


if __name__ == "__main__":
    main()
