"""Full runs or smoke runs: every benchmark takes ``--smoke`` (seconds, tiny rates), which ``make bench-smoke`` (and
so ``make test``) runs to prove each still works end to end and prints its ratios. Smoke numbers mean nothing."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from kestrel.devtools.servers import NatsServer, PostgresServer, free_port

T = TypeVar("T")
SMOKE = "--smoke" in sys.argv[1:]


def pick(full: T, smoke: T) -> T:
    """``full`` normally, ``smoke`` under ``--smoke``."""
    return smoke if SMOKE else full


@contextmanager
def servers(prefix: str) -> Iterator[tuple[Path, PostgresServer, NatsServer]]:
    """A scratch folder with PostgreSQL and NATS JetStream on free loopback ports, removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    pg = PostgresServer(name="postgres", log_path=root / "pg.log", root=root / "pg", port=free_port())
    nats_server = NatsServer(
        name="nats", log_path=root / "nats.log", root=root / "nats", port=free_port(), monitor_port=free_port()
    )
    pg.start()
    nats_server.start()
    try:
        yield root, pg, nats_server
    finally:
        nats_server.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
