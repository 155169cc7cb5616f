"""A lean keep-alive HTTP/1.1 load generator on raw asyncio streams, so the client is not what is measured."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable


async def _call(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes]:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return status, await reader.readexactly(length)


def request(port: int, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body:
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def measure(
    port: int,
    requests: list[bytes],
    total: int,
    concurrency: int,
    check: Callable[[int, bytes], bool] = lambda status, _: status == 200,
) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) for ``total`` requests over ``concurrency`` keep-alive connections."""
    latencies: list[float] = []
    queue = list(range(total))

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while queue:
            i = queue.pop()
            started = time.perf_counter()
            status, payload = await _call(reader, writer, requests[i % len(requests)])
            latencies.append(time.perf_counter() - started)
            assert check(status, payload), (status, payload[:300])
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return total / elapsed, 1000 * statistics.median(latencies), 1000 * latencies[int(len(latencies) * 0.99)]
