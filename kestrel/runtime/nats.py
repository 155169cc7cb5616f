"""NATS for backend services: a connection that retries, and the streams they create or update (ADR-0004)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Final

import nats
from nats.aio.client import Client as NATS
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from kestrel_core import streams
from kestrel_core.errors import InvalidInput
from kestrel_core.retry import Backoff

log = logging.getLogger("kestrel.runtime.nats")
#: NATS replicates a stream on at most five servers.
MAX_REPLICAS: Final = 5


async def connect_nats(url: str, name: str) -> NATS:
    """Connect, retrying until NATS answers; afterwards nats-py reconnects by itself, forever."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats: %s", exc)

    backoff = Backoff(base_s=0.2, cap_s=5.0)
    attempt = 0
    while True:
        attempt += 1
        try:
            return await nats.connect(
                url,
                name=name,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.25,
                connect_timeout=2,
                pending_size=64 * 1024 * 1024,
                error_cb=on_error,
            )
        except Exception as exc:  # noqa: BLE001 - any failure to reach NATS is retried
            log.warning("nats not reachable yet: %s", exc)
            await asyncio.sleep(backoff.delay(attempt))


def deadletter_config(max_age_s: int = 14 * 86400) -> StreamConfig:
    """The dead-letter stream, created (or updated) by every service that dead-letters."""
    return StreamConfig(
        name=streams.DEADLETTER_STREAM,
        subjects=list(streams.DEADLETTER_SUBJECTS),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=max_age_s,
        duplicate_window=streams.DUPLICATE_WINDOW_S,
        num_replicas=1,
    )


def event_stream_config(name: str, subjects: list[str], max_age_s: int = 7 * 86400) -> StreamConfig:
    """A stream of events kept for ``max_age_s`` (oldest dropped first), deduplicated by ``Nats-Msg-Id``."""
    return StreamConfig(
        name=name,
        subjects=subjects,
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=max_age_s,
        discard=DiscardPolicy.OLD,
        duplicate_window=streams.DUPLICATE_WINDOW_S,
        num_replicas=1,
    )


def events_config() -> StreamConfig:
    """The twin events' stream, ensured by devicesvc (which publishes) and the rule workers (which source it)."""
    return event_stream_config(streams.EVENTS_STREAM, list(streams.EVENTS_SUBJECTS))


def stream_replicas(environ: Mapping[str, str] = os.environ) -> int:
    """``KESTREL_NATS_REPLICAS``: how many NATS servers keep each stream the services create (1 on one server, 3 on
    a cluster: the Helm chart sets it). ``InvalidInput`` for anything but 1 to 5."""
    value = environ.get("KESTREL_NATS_REPLICAS", "1")
    if not value.isdigit() or not 1 <= int(value) <= MAX_REPLICAS:
        raise InvalidInput("bad_setting", f"KESTREL_NATS_REPLICAS must be 1 to {MAX_REPLICAS}, not {value[:20]!r}")
    return int(value)


def telemetry_retention_s(environ: Mapping[str, str] = os.environ) -> int:
    """``KESTREL_TELEMETRY_RETENTION_S``: how long the TELEMETRY stream keeps readings for replays (rule workers,
    real-time streams' cursors) after the writer stored them; 7 days by default. A large fleet shortens it to fit its
    NATS volumes (docs/capacity.md). ``InvalidInput`` outside one hour to a year."""
    value = environ.get("KESTREL_TELEMETRY_RETENTION_S", str(7 * 86400))
    if not value.isdigit() or not 3600 <= int(value) <= 365 * 86400:
        raise InvalidInput("bad_setting", f"KESTREL_TELEMETRY_RETENTION_S must be 3600 to 31536000, not {value[:20]!r}")
    return int(value)


async def ensure_stream(nc: NATS, config: StreamConfig) -> None:
    """Create the stream, or update it to ``config`` when it exists (idempotent), with ``stream_replicas()``
    replicas."""
    config.num_replicas = stream_replicas()
    js = nc.jetstream()
    try:
        await js.add_stream(config)
    except BadRequestError:
        await js.update_stream(config)
