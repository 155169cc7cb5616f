"""Lean JetStream paths for the hot loops (performance.md §4, ADR-0004).

nats-py's convenience calls (``publish_async``, ``PullSubscription.fetch``) cost 40-75 µs per message.
These adapters use the underlying protocol directly: a core publish with a reply inbox whose
``+ACK``-style PubAck completes a future, and a raw ``CONSUMER.MSG.NEXT`` pull whose deliveries land
in one callback subscription.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError

from kestrel.runtime.nats import deadletter_config, ensure_stream, telemetry_retention_s
from kestrel_core import streams

log = logging.getLogger("kestrel.ingest.jetstream")


class PubAck(msgspec.Struct, frozen=True):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_puback_decoder = msgspec.json.Decoder(PubAck)


async def ensure_streams(nc: NATS, *, dlq_max_age_s: int = 14 * 86400) -> None:
    """Create or update the telemetry and dead-letter streams (idempotent)."""
    telemetry = StreamConfig(
        name=streams.TELEMETRY_STREAM,
        subjects=list(streams.TELEMETRY_SUBJECTS),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=telemetry_retention_s(),
        max_bytes=-1,
        discard=DiscardPolicy.OLD,
        duplicate_window=streams.DUPLICATE_WINDOW_S,
    )
    for config in (telemetry, deadletter_config(dlq_max_age_s)):
        await ensure_stream(nc, config)


async def ensure_writer_consumer(
    nc: NATS, durable: str, *, ack_wait_s: float, max_deliver: int, max_ack_pending: int
) -> None:
    js = nc.jetstream()
    config = ConsumerConfig(
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait_s,
        max_deliver=max_deliver,
        max_ack_pending=max_ack_pending,
        max_waiting=64,
        filter_subject=None,
    )
    try:
        await js.add_consumer(streams.TELEMETRY_STREAM, config)  # creates, or updates editable fields
    except BadRequestError as exc:
        log.warning("keeping the existing consumer %s: %s", durable, exc)


@dataclass
class _Pending:
    subject: str
    payload: bytes
    headers: dict[str, str]
    on_stored: Callable[[PubAck], None]
    sent_at: float
    attempts: int = 1


@dataclass
class JetStreamPublisher:
    """Publish to JetStream and call back once the stream has the message, retrying until it does.

    Retries reuse the same ``Nats-Msg-Id``, so the stream drops the copies inside its duplicate
    window. A message is never given up on: the caller's MQTT PUBACK waits for it, and the broker
    holds the message meanwhile (chain of custody, reliability.md). Submission is synchronous and
    one sender task writes to NATS, so the hot path creates no task or future per message.
    """

    nc: NATS
    ack_timeout_s: float = 5.0
    on_retry: Callable[[str], None] = lambda reason: None
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _tokens: itertools.count[int] = field(default_factory=itertools.count)
    _prefix: str = ""
    _outbox: collections.deque[str] = field(default_factory=collections.deque)
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: The connection's reconnect count when the pending messages were last (re)sent in order.
    _reconnects: int = 0

    async def start(self) -> None:
        self._prefix = self.nc.new_inbox()
        await self.nc.subscribe(f"{self._prefix}.*", cb=self._on_reply, pending_msgs_limit=-1, pending_bytes_limit=-1)
        self._tasks = [
            asyncio.create_task(self._retry_loop(), name="jetstream-publish-retry"),
            asyncio.create_task(self._send_loop(), name="jetstream-publish-send"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def submit(
        self, subject: str, payload: bytes, headers: dict[str, str], on_stored: Callable[[PubAck], None]
    ) -> None:
        """Queue ``payload`` for ``subject``; ``on_stored`` runs once JetStream acknowledged it."""
        token = str(next(self._tokens))
        self._pending[token] = _Pending(subject, payload, headers, on_stored, time.monotonic())
        self._outbox.append(token)
        self._wakeup.set()

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> PubAck:
        """Resolve once the stream has stored ``payload`` (or recognised it as a duplicate)."""
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()

        def stored(ack: PubAck) -> None:
            if not future.done():
                future.set_result(ack)

        self.submit(subject, payload, headers, stored)
        return await future

    async def _send_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._outbox:
                token = self._outbox.popleft()
                pending = self._pending.get(token)
                if pending is not None:
                    await self._send(token, pending)

    async def _send(self, token: str, pending: _Pending) -> None:
        if not self.nc.is_connected:
            return  # sent with the others, in order, once the connection is back
        if self.nc.stats["reconnects"] != self._reconnects:
            await self._resend_in_order()  # this one included
            return
        await self._publish(token, pending)

    async def _publish(self, token: str, pending: _Pending) -> bool:
        """Hand one message to the client; False when it could not (disconnected, buffer full): resent later."""
        try:
            await self.nc.publish(
                pending.subject, pending.payload, reply=f"{self._prefix}.{token}", headers=pending.headers
            )
        except Exception as exc:  # noqa: BLE001 - disconnected or buffer full: the retry loop resends
            log.debug("publish deferred: %s", exc)
            return False
        return True

    async def _on_reply(self, msg: Msg) -> None:
        token = msg.subject.rsplit(".", 1)[-1]
        pending = self._pending.get(token)
        if pending is None:
            return  # a late answer to an attempt that was already acknowledged
        if msg.headers and msg.headers.get("Status") and not msg.data:
            self._schedule_retry(pending, f"status_{msg.headers['Status']}")
            return
        try:
            ack = _puback_decoder.decode(msg.data)
        except msgspec.MsgspecError:
            self._schedule_retry(pending, "bad_puback")
            return
        if ack.error is not None:
            self._schedule_retry(pending, "puback_error")
            return
        del self._pending[token]
        pending.on_stored(ack)

    def _schedule_retry(self, pending: _Pending, reason: str) -> None:
        # Back off instead of resending at once: the stream is missing or not ready yet.
        pending.sent_at = time.monotonic() - self.ack_timeout_s + min(0.1 * 2**pending.attempts, 2.0)
        self.on_retry(reason)

    async def _resend_in_order(self) -> None:
        """After a reconnect, send every unacknowledged message again, oldest first, before anything newer.

        What was in flight when the connection broke is lost with it, while what was submitted during the outage
        waited for the new connection: resent only after its acknowledgement timeout, an older message reached the
        stream seconds after newer ones of the same device, and the rule workers, which evaluate a device's readings
        in time order, dropped it as late (issue 13). The stream drops the copies of those that did arrive."""
        self._reconnects = self.nc.stats["reconnects"]
        self._outbox.clear()  # everything pending goes now
        now = time.monotonic()
        resent = 0
        for token, pending in list(self._pending.items()):  # insertion order: submission order
            if token not in self._pending:
                continue
            pending.sent_at = now
            pending.attempts += 1
            resent += 1
            self.on_retry("reconnect")
            if not await self._publish(token, pending):
                break  # disconnected again: the next reconnect resends
        log.info("resent unacknowledged messages after a reconnect", extra={"count": resent})

    async def _retry_loop(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            if self.nc.is_connected and self.nc.stats["reconnects"] != self._reconnects:
                await self._resend_in_order()
                continue
            now = time.monotonic()
            for token, pending in list(self._pending.items()):
                if now - pending.sent_at >= self.ack_timeout_s and token in self._pending:
                    pending.attempts += 1
                    pending.sent_at = now
                    self.on_retry("timeout")
                    await self._send(token, pending)


@dataclass
class RawPuller:
    """A pull consumer on ``$JS.API.CONSUMER.MSG.NEXT`` with one callback inbox."""

    nc: NATS
    stream: str
    durable: str
    _inbox: str = ""
    _buffer: list[Msg] = field(default_factory=list)
    _want: int = 0
    _done: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        self._inbox = self.nc.new_inbox()
        await self.nc.subscribe(self._inbox, cb=self._on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)

    async def _on_msg(self, msg: Msg) -> None:
        if not msg.data and msg.headers and msg.headers.get("Status"):
            if msg.headers["Status"] != "100":  # 404/408/409: the request is over
                self._done.set()
            return
        self._buffer.append(msg)
        if len(self._buffer) >= self._want:
            self._done.set()

    async def fetch(self, batch: int, expires_s: float) -> list[Msg]:
        """Up to ``batch`` messages, returning when the batch is full or ``expires_s`` has passed."""
        self._want = batch
        self._done.clear()
        request = json.dumps({"batch": batch, "expires": int(expires_s * 1e9)}).encode()
        try:
            await self.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}", request, reply=self._inbox)
        except Exception as exc:  # noqa: BLE001 - disconnected: wait, then pull again
            log.debug("pull request not sent: %s", exc)
            await asyncio.sleep(min(expires_s, 0.5))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._done.wait(), expires_s + 1.0)
        out, self._buffer = self._buffer, []
        return out


def deadletter_message(
    *, source: str, reason: str, detail: str, payload: bytes, msg_id: str, extra: dict[str, str] | None = None
) -> tuple[str, bytes, dict[str, str]]:
    """Subject, payload and headers that keep a rejected message with its reason on ``dlq.{source}.{reason}``."""
    headers = {
        streams.HDR_MSG_ID: msg_id,
        streams.HDR_REASON: reason,
        streams.HDR_DETAIL: streams.header_safe(detail),
        streams.HDR_STAGE: source,
    }
    if extra:
        headers.update({k: streams.header_safe(v) for k, v in extra.items()})
    limit = 512 * 1024  # NATS max_payload is 1 MiB, headers included
    if len(payload) > limit:
        headers["Kestrel-Truncated"] = str(len(payload))
        payload = payload[:limit]
    return streams.deadletter_subject(source, reason), payload, headers


async def publish_deadletter(
    publisher: JetStreamPublisher,
    *,
    source: str,
    reason: str,
    detail: str,
    payload: bytes,
    msg_id: str,
    extra: dict[str, str] | None = None,
) -> None:
    """Store a rejected message in the dead-letter stream; returns once it is stored."""
    subject, body, headers = deadletter_message(
        source=source, reason=reason, detail=detail, payload=payload, msg_id=msg_id, extra=extra
    )
    await publisher.publish(subject, body, headers)


async def forward_max_deliveries(nc: NATS, publisher: JetStreamPublisher, durable: str) -> None:
    """Copy messages that exhausted MaxDeliver into the dead-letter stream (nothing is silently dropped)."""

    async def on_advisory(msg: Msg) -> None:
        try:
            advisory = json.loads(msg.data)
            seq = int(advisory["stream_seq"])
            reply = await nc.request(
                f"$JS.API.STREAM.MSG.GET.{streams.TELEMETRY_STREAM}", json.dumps({"seq": seq}).encode(), timeout=5
            )
            stored = json.loads(reply.data)["message"]
        except (KeyError, ValueError, TimeoutError):
            log.exception("could not dead-letter an exhausted message")
            return
        await publish_deadletter(
            publisher,
            source="writer",
            reason="max_deliveries",
            detail=f"stream sequence {seq} exceeded MaxDeliver",
            payload=base64.b64decode(stored.get("data", "")),
            msg_id=f"dlq.maxdeliver.{seq}",
            extra={streams.HDR_TOPIC: stored.get("subject", "")},
        )

    subject = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{streams.TELEMETRY_STREAM}.{durable}"
    await nc.subscribe(subject, cb=on_advisory)
