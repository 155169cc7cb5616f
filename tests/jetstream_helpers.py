"""Test helpers that read JetStream state (dead letters, stream counts)."""

from __future__ import annotations

import asyncio

import nats
from nats.js.errors import NotFoundError

from kestrel_core import streams


async def deadletters(
    url: str, *, topic_contains: str = "", expect: int = 0, timeout: float = 10.0
) -> list[dict[str, str]]:
    """Headers (plus subject and payload) of dead letters, waiting until ``expect`` match ``topic_contains``."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found: list[dict[str, str]] = []
            try:
                info = await js.stream_info(streams.DEADLETTER_STREAM)
                first = max(info.state.first_seq, 1) if info.state.messages else info.state.last_seq + 1
                for seq in range(first, info.state.last_seq + 1):
                    try:
                        msg = await js.get_msg(streams.DEADLETTER_STREAM, seq)
                    except NotFoundError:
                        continue
                    headers = dict(msg.headers or {})
                    if topic_contains in headers.get(streams.HDR_TOPIC, ""):
                        found.append(
                            headers | {"subject": msg.subject, "payload": (msg.data or b"").decode(errors="replace")}
                        )
            except NotFoundError:
                pass
            if len(found) >= expect or asyncio.get_running_loop().time() > deadline:
                return found
            await asyncio.sleep(0.2)
    finally:
        await nc.close()
