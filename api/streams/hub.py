"""The process's fan-out (ADR-0021): one ordered JetStream consumer per tenant and stream (readings, twin events,
alarms), shared by every client of that tenant in this API process, started with the first and stopped with the
last. A message is matched against each client's filter and put on the client's bounded queue without waiting: a
client that does not keep up overflows its own queue and is told where it stopped (``Lagged``), never slowing the
others or growing the process.

Positions: the feed knows the last sequence it dispatched of each stream; the cursor of an event is that position of
all three streams as the event was dispatched, so a client resuming from it misses nothing and repeats nothing. A
client that joins with a cursor is first given what lies between its cursor and the feed's position (``replay``,
from the streams themselves), then the live events queued meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from prometheus_client import Counter, Gauge

from kestrel_core.errors import RateLimited
from kestrel_core.live import FAMILIES, Cursor, Filter, LiveEvent, parse_cursor
from kestrel_core.messages.telemetry import decode_envelope

log = logging.getLogger("kestrel.api.streams")
CLIENTS = Gauge("kestrel_api_stream_clients", "Stream subscriptions open in this process")
QUEUED = Gauge("kestrel_api_stream_queued_bytes", "Bytes of events waiting for stream clients in this process")
LAGGED = Counter("kestrel_api_stream_lagged", "Subscriptions ended because their client fell behind")
FEEDS = Gauge("kestrel_api_stream_feeds", "Tenants with a feed (three JetStream consumers) in this process")
_any = msgspec.json.Decoder()
_metrics = msgspec.json.Decoder(dict[str, Any])
#: Most bytes of events one client may have waiting; past it the client is told it lagged and is ended.
QUEUE_BYTES: Final = 1 << 20
QUEUE_EVENTS: Final = 10_000


@dataclass(frozen=True, slots=True)
class Item:
    """A stream message as the feed read it: which stream, where, of which kind and device, its body."""

    family: str
    seq: int
    kind: str
    device: str
    data: Any
    size: int


def item_of(family: str, msg: Msg) -> Item | None:
    """The message as an item; None when it is not a device's event (another subject) or not readable."""
    parts = msg.subject.split(".")
    if len(parts) < 5 or parts[2] != "d":
        return None
    device, kind = parts[3], parts[4]
    try:
        if kind == "telemetry":
            envelope = decode_envelope(msg.data)
            readings = [{"ts": p.ts_us // 1000, "seq": p.seq, "metrics": _metrics.decode(p.metrics)}
                        for p in envelope.points]  # fmt: skip
            data: Any = {"stream": envelope.stream, "readings": readings}
        else:
            data = _any.decode(msg.data)
    except Exception:  # noqa: BLE001 - an unreadable message is skipped, never fatal to a feed
        log.warning("unreadable stream message skipped", extra={"subject": msg.subject[:200]})
        return None
    return Item(family, msg.metadata.sequence.stream, kind, device, data, len(msg.data))


@dataclass(eq=False)
class Subscriber:
    """One client's subscription in this process: what it wants and the events waiting for it."""

    tenant: str
    kinds: frozenset[str]
    wanted: Filter
    #: The devices its groups and tags select, with the devices it names (None: every device of the tenant).
    devices: frozenset[str] | None
    queue: deque[tuple[LiveEvent, int]] = field(default_factory=deque)
    queued_bytes: int = 0
    #: Set when it fell too far behind: it is sent what was queued, then told to resume from ``delivered``.
    lagged: bool = False
    delivered: Cursor = field(default_factory=Cursor)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def event(self, item: Item, cursor: Cursor) -> LiveEvent | None:
        """The event this subscriber receives for ``item``, if any (readings trimmed to its metrics)."""
        if item.kind not in self.kinds or (self.devices is not None and item.device not in self.devices):
            return None
        data = item.data
        if item.kind == "telemetry" and self.wanted.metrics:
            names = set(self.wanted.metrics)
            readings = [{**r, "metrics": {k: v for k, v in r["metrics"].items() if k in names}}
                        for r in data["readings"]]  # fmt: skip
            readings = [r for r in readings if r["metrics"]]
            if not readings:
                return None
            data = {"stream": data["stream"], "readings": readings}
        return LiveEvent(kind=item.kind, device=item.device, cursor=str(cursor), data=data)  # type: ignore[arg-type]

    def offer(self, event: LiveEvent, size: int) -> None:
        """Queue without waiting; past the bounds the subscriber has lagged (it keeps what was queued)."""
        if self.lagged:
            return
        if self.queued_bytes + size > QUEUE_BYTES or len(self.queue) >= QUEUE_EVENTS:
            self.lagged = True
            LAGGED.inc()
            self.ready.set()
            return
        self.queue.append((event, size))
        self.queued_bytes += size
        self.ready.set()

    async def next(self, wait_s: float) -> LiveEvent | None:
        """The next queued event, once it is the client's (``delivered`` moves to it); None after ``wait_s`` with
        nothing to send, or once the subscriber lagged and what it had queued is sent."""
        if not self.queue:
            if self.lagged:
                return None
            self.ready.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ready.wait(), wait_s)
            if not self.queue:
                return None
        event, size = self.queue.popleft()
        self.queued_bytes -= size
        self.delivered = parse_cursor(event.cursor)
        return event


class Feed:
    """One tenant's three ordered consumers in this process and the subscribers they serve."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.position = Cursor()
        self.subscribers: set[Subscriber] = set()
        self.subs: list[Any] = []
        self.started: set[str] = set()

    async def start(self, nc: NATS) -> None:
        """Consume each stream from right after its last message; a stream that does not exist yet (its service has
        not started) is tried again when the next client joins."""
        js = nc.jetstream()
        for family, stream in FAMILIES.items():
            if family in self.started:
                continue
            try:
                last = int((await js.stream_info(stream)).state.last_seq)
            except NotFoundError:
                continue
            self.started.add(family)
            self.position = self.position.moved(family, last)
            self.subs.append(await js.subscribe(
                f"v1.{self.tenant}.d.*.>", stream=stream, ordered_consumer=True, cb=self._receiver(family),
                config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=last + 1),
            ))  # fmt: skip

    def _receiver(self, family: str) -> Any:
        async def receive(msg: Msg) -> None:
            item = item_of(family, msg)
            if item is None:
                return
            self.position = self.position.moved(family, item.seq)
            for subscriber in self.subscribers:
                if (event := subscriber.event(item, self.position)) is not None:
                    subscriber.offer(event, item.size)

        return receive

    async def stop(self) -> None:
        for sub in self.subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


class Hub:
    """Every tenant's feed in this process."""

    def __init__(self, nc: NATS, per_tenant: int = 1000) -> None:
        self.nc = nc
        self.per_tenant = per_tenant
        self._stopping: set[asyncio.Task[None]] = set()
        self.feeds: dict[str, Feed] = {}
        self._lock = asyncio.Lock()
        CLIENTS.set_function(lambda: self.clients)
        QUEUED.set_function(lambda: self.queued_bytes)
        FEEDS.set_function(lambda: len(self.feeds))

    @property
    def clients(self) -> int:
        return sum(len(f.subscribers) for f in self.feeds.values())

    @property
    def queued_bytes(self) -> int:
        return sum(s.queued_bytes for f in list(self.feeds.values()) for s in list(f.subscribers))

    def admit(self, tenant: str) -> None:
        """``RateLimited`` when the tenant already has ``per_tenant`` subscriptions in this process (checked as a
        stream opens; concurrent opens may pass it by a few)."""
        feed = self.feeds.get(tenant)
        if feed is not None and len(feed.subscribers) >= self.per_tenant:
            raise RateLimited(f"the tenant has {self.per_tenant} streams open on this API process"
                              " (KESTREL_API_STREAM_MAX_PER_TENANT)", retry_after=5.0)  # fmt: skip

    async def join(self, subscriber: Subscriber) -> Cursor:
        """Start delivering live events to ``subscriber``; the feed's position at that instant (where live begins)."""
        async with self._lock:
            feed = self.feeds.get(subscriber.tenant)
            if feed is None:
                feed = self.feeds[subscriber.tenant] = Feed(subscriber.tenant)
            if len(feed.started) < len(FAMILIES):
                await feed.start(self.nc)
            feed.subscribers.add(subscriber)
            subscriber.delivered = feed.position
            return feed.position

    def leave(self, subscriber: Subscriber) -> None:
        """Stop delivering to ``subscriber`` at once, without awaiting: it is called as a stream ends, often because
        its client went away and its task is being cancelled, when an await would be cancelled too and leave it in
        the feed. A feed left without subscribers is stopped by a task of its own."""
        feed = self.feeds.get(subscriber.tenant)
        if feed is None:
            return
        feed.subscribers.discard(subscriber)
        if not feed.subscribers:
            task = asyncio.get_running_loop().create_task(self._stop_if_unused(subscriber.tenant))
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    async def _stop_if_unused(self, tenant: str) -> None:
        async with self._lock:  # after any join in progress: a subscriber that came meanwhile keeps the feed
            feed = self.feeds.get(tenant)
            if feed is not None and not feed.subscribers:
                del self.feeds[tenant]
                await feed.stop()

    def position(self, tenant: str) -> Cursor | None:
        feed = self.feeds.get(tenant)
        return feed.position if feed is not None else None

    async def replay(self, subscriber: Subscriber, start: Cursor, until: Cursor) -> AsyncIterator[LiveEvent | str]:
        """What the subscriber missed: each stream's events after ``start`` up to ``until`` (its live start), stream
        by stream; a ``str`` names a stream whose retention no longer holds the start (a gap the client is told of)."""
        js = self.nc.jetstream()
        cursor = start
        for family, stream in FAMILIES.items():
            first, last = start.at(family) + 1, until.at(family)
            if first > last:
                continue
            info = await js.stream_info(stream)
            if (info.state.first_seq or 0) > first:
                yield family
            config = ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                    opt_start_seq=first, inactive_threshold=30.0)  # fmt: skip
            sub = await js.pull_subscribe(f"v1.{subscriber.tenant}.d.*.>", stream=stream, config=config)
            try:
                pending = int((await sub.consumer_info()).num_pending or 0)
                while pending > 0:
                    msgs = await sub.fetch(min(pending, 256), timeout=5)
                    pending -= len(msgs)
                    for msg in msgs:
                        if msg.metadata.sequence.stream > last:
                            pending = 0
                            break
                        item = item_of(family, msg)
                        cursor = cursor.moved(family, msg.metadata.sequence.stream)
                        if item is not None and (event := subscriber.event(item, cursor)) is not None:
                            yield event
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
