"""Where the CLI finds the platform: ``KESTREL_*`` from the environment, else the embedded default's
``kestrel.env`` in the state directory (``--state-dir`` / ``KESTREL_STATE_DIR``, default ``.kestrel``)."""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from psycopg import AsyncConnection

from kestrel.store import devices
from kestrel.store.session import run_blocking
from kestrel_core.errors import InvalidInput

T = TypeVar("T")


def state_dir() -> Path:
    """``--state-dir`` / ``KESTREL_STATE_DIR`` (read when a command runs, not at import), default ``.kestrel``."""
    return Path(os.environ.get("KESTREL_STATE_DIR", ".kestrel"))


def stack_setting(key: str) -> str | None:
    """A ``KESTREL_*`` value from the environment, else from the embedded default's ``kestrel.env``."""
    if value := os.environ.get(key):
        return value
    env_file = state_dir() / "kestrel.env"
    if env_file.exists():
        for line in env_file.read_text().splitlines():
            name, _, value = line.partition("=")
            if name == key:
                return value
    return None


def database_url() -> str:
    """``KESTREL_DATABASE_URL``, else the embedded default's ``kestrel.env``."""
    if url := stack_setting("KESTREL_DATABASE_URL"):
        return url
    raise InvalidInput(
        "no_database",
        f"no database: set KESTREL_DATABASE_URL, or point --state-dir at a running `kestrel run` ({state_dir()} has"
        " no kestrel.env)",
    )


def store(work: Callable[[AsyncConnection[Any]], Awaitable[T]], *, tenant: str | None = None) -> T:
    """Run storage functions on one connection in one transaction (the tenant's, when given)."""
    return run_blocking(database_url(), work, tenant=tenant)


def emit(value: Any, as_json: bool, text: str) -> None:
    """``value`` as one JSON document with ``--json``, else ``text``."""
    typer.echo(json.dumps(value, default=str) if as_json else text)


def on_device(device: str, work: Callable[[AsyncConnection[Any], str], Awaitable[T]]) -> T:
    """Run ``work(conn, tenant)`` in the transaction of the tenant ``device`` belongs to (the operator addresses
    devices by id alone)."""

    async def go(conn: AsyncConnection[Any]) -> T:
        tenant = await devices.tenant_of(conn, device)
        await conn.execute("SELECT set_config('kestrel.tenant', %s, true)", (tenant,))
        return await work(conn, tenant)

    return store(go)


def json_object(text: str, what: str) -> dict[str, Any]:
    """``text`` as a JSON object, or ``InvalidInput`` naming ``what``."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidInput("bad_json", f"{what} is not JSON: {exc}") from exc
    except RecursionError as exc:
        raise InvalidInput("too_deep", f"{what} nests too deeply") from exc
    if not isinstance(value, dict):
        raise InvalidInput("bad_json", f"{what} must be a JSON object")
    return value
