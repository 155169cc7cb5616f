"""A TCP load balancer for tests: what a Kubernetes Service does in front of replicas of authsvc.

Round robin over the backends; a backend that refuses the connection is skipped (as an endpoint that failed its
readiness probe is). It runs on a thread of its own, so tests can block and run event loops of their own meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(ConnectionError, OSError):
            writer.close()


class Balancer:
    def __init__(self, port: int, backends: list[int]) -> None:
        self.port = port
        self.backends = backends
        self.served: dict[int, int] = dict.fromkeys(backends, 0)
        self._next = itertools.cycle(range(len(backends)))
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="balancer", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()
        server.close()
        self._loop.run_until_complete(server.wait_closed())

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        for _ in self.backends:
            port = self.backends[next(self._next)]
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                continue
            self.served[port] += 1
            await asyncio.gather(_pipe(client_reader, writer), _pipe(reader, client_writer))
            return
        client_writer.close()  # no backend: the caller sees a refused request, as with an empty Service

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(10), "the balancer did not start"

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@contextmanager
def balancer(port: int, backends: list[int]) -> Iterator[Balancer]:
    lb = Balancer(port, backends)
    lb.start()
    try:
        yield lb
    finally:
        lb.stop()
