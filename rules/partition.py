"""One partition of the device space, owned by exactly one worker at a time (ADR-0019): a PostgreSQL session holding
the partition's advisory lock (it ends with the session, so a worker that dies, or loses the database, loses its
partitions), the partition's durable JetStream consumer, and the states of its (rule, device) pairs, cached while
owned. Each batch - readings and due deadlines - is evaluated, and its states, alarms, events, deliveries and actions
are committed in one transaction on the lock's own session (a worker that lost the lock cannot commit); only then
are the messages acknowledged. A redelivered message changes no state (the evaluator's (ts, seq) guard), so it
repeats nothing. Any database error ends the ownership: the state is reloaded by whoever owns it next."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any, Final

import psycopg
from nats.aio.msg import Msg
from psycopg import AsyncConnection
from psycopg.rows import dict_row

from kestrel.store.rows import fetch_all
from kestrel_core import streams
from kestrel_core.errors import InvalidInput
from kestrel_core.rules.evaluate import DeviceState
from rules import effects
from rules.decide import Deadlines, Incoming, Key, LoadedRule, Outcome, deadline, evaluate, incoming, watches
from rules.ports import Rules
from rules.store import load_deadlines, load_position, load_states, save_position, save_states, spend_actions
from rules.stream import RULES_STREAM, consumer_name, publish_after_commit, take_consumer

log = logging.getLogger("kestrel.rules")
PARTITION_LOCK: Final = 0x4B52  # advisory lock class of the partitions (the second key is the partition)
RECHECK_S: Final = 2.0  # how often an idle partition asks the server whether deliveries were lost
MAX_CACHED: Final = 200_000  # (rule, device) states kept in memory per partition; past it the cache starts over


def now_ms() -> int:
    return int(time.time() * 1000)


async def try_lock(database_url: str, partition: int) -> AsyncConnection[Any] | None:
    """A session holding the partition's lock, or None when another worker has it."""
    conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True, row_factory=dict_row)
    row = await (
        await conn.execute("SELECT pg_try_advisory_lock(%s, %s) AS got", (PARTITION_LOCK, partition))
    ).fetchone()
    if row and row["got"]:
        return conn
    await conn.close()
    return None


class Partition:
    def __init__(self, rules: Rules, number: int, conn: AsyncConnection[Any]) -> None:
        self.rules = rules
        self.number = number
        self.conn = conn
        self.cache: dict[Key, DeviceState] = {}
        self.deadlines = Deadlines()
        self.release = asyncio.Event()
        #: The last stream sequence whose effects are committed (RULES_IN), and the next consumer sequence expected.
        self.position = 0
        self.expected = 1
        self.checked = 0.0

    async def _subscribe(self) -> Any:
        """Consume from right after the committed position; the consumer sequence starts again at 1."""
        await take_consumer(self.rules.nc, self.number, self.position)
        self.expected = 1
        self.checked = time.monotonic()
        return await self.rules.nc.jetstream().pull_subscribe_bind(consumer_name(self.number), RULES_STREAM)

    def _in_order(self, msgs: list[Msg]) -> bool:
        """Whether these deliveries follow the last ones without a gap (a delivery lost on the way, e.g. while NATS
        restarted, shows as a jump of the consumer sequence)."""
        for msg in msgs:
            if msg.metadata.sequence.consumer != self.expected or msg.metadata.num_delivered != 1:
                return False
            self.expected += 1
        return True

    async def _lost_at_the_end(self, sub: Any) -> bool:
        """Idle: whether the server delivered more than arrived (the newest deliveries were lost)."""
        self.checked = time.monotonic()
        info = await sub.consumer_info()
        return int(info.delivered.consumer_seq) >= self.expected

    async def run(self) -> None:
        settings = self.rules.settings
        try:
            self.position = await load_position(self.conn, self.number)
            sub = await self._subscribe()
            for key, at_ms in await load_deadlines(self.conn, self.number):
                self.deadlines.set(key, at_ms)
            log.info("partition owned", extra={"partition": self.number, "after": self.position})
            held: list[Msg] = []  # fetched, not yet evaluated (the reorder hold), in stream order
            held_until = 0.0
            while not self.release.is_set():
                upcoming = self.deadlines.next()
                wait = settings.fetch_wait_s
                if upcoming is not None:
                    wait = min(wait, max(0.005, (upcoming - now_ms()) / 1000))
                if held:
                    wait = min(wait, max(0.001, held_until - time.monotonic()))
                try:
                    msgs = await sub.fetch(max(1, settings.batch_size - len(held)), timeout=wait)
                except TimeoutError:  # nats' and asyncio's (disconnected) alike
                    msgs = []
                gap = not self._in_order(msgs) if msgs else (
                    time.monotonic() - self.checked > RECHECK_S and await self._lost_at_the_end(sub))  # fmt: skip
                if gap:
                    self.rules.metrics.resumed.inc()
                    log.warning("deliveries lost; resuming after the committed position",
                                extra={"partition": self.number, "after": self.position})  # fmt: skip
                    held = []  # all after the committed position: fetched again
                    await sub.unsubscribe()
                    sub = await self._subscribe()
                    continue
                if msgs and not held:
                    held_until = time.monotonic() + settings.reorder_ms / 1000
                held += msgs
                ready = bool(held) and (time.monotonic() >= held_until or len(held) >= settings.batch_size)
                if ready or (upcoming is not None and upcoming <= now_ms()):
                    await self.batch(held)
                    held = []
            await sub.unsubscribe()
        finally:
            await self.conn.close()  # releases the lock
            log.info("partition released", extra={"partition": self.number})

    async def _deadletter(self, msg: Msg, refusal: InvalidInput) -> None:
        self.rules.metrics.deadlettered.labels(refusal.reason).inc()
        headers = {streams.HDR_REASON: refusal.reason, streams.HDR_DETAIL: streams.header_safe(refusal.detail),
                   streams.HDR_TOPIC: streams.header_safe(msg.subject), streams.HDR_STAGE: "rules",
                   streams.HDR_MSG_ID: f"rules-{msg.metadata.sequence.stream}"}  # fmt: skip
        await self.rules.nc.jetstream().publish(
            streams.deadletter_subject("rules", refusal.reason), msg.data, headers=headers, timeout=5
        )

    async def _shadows(self, devices: set[str]) -> dict[str, dict[str, Any]]:
        if not devices:
            return {}
        rows = await fetch_all(
            self.conn,
            "SELECT device_id, reported FROM device_shadows WHERE name = '' AND device_id = ANY(%s)",
            (sorted(devices),),
        )
        return {r["device_id"]: r["reported"] for r in rows}

    async def batch(self, msgs: list[Msg]) -> None:
        started = time.perf_counter()
        catalog, now = self.rules.catalog, now_ms()
        work: list[tuple[Incoming, list[LoadedRule]]] = []
        good: list[Msg] = []
        for msg in msgs:
            try:
                came = incoming(msg.subject, msg.data, msg.metadata.sequence.stream)
            except InvalidInput as refusal:
                await self._deadletter(msg, refusal)
                continue
            good.append(msg)
            rules = catalog.for_device(came.tenant, came.device)
            work.append((came, [r for r in rules if r.rule_id == came.rule_id] if came.rule_id else rules))
        due = self.deadlines.due(now)
        needed = {(lr.rule_id, came.device) for came, rules in work for lr in rules} | set(due)
        if len(self.cache) > MAX_CACHED:
            self.cache.clear()
        self.cache.update(await load_states(self.conn, [k for k in needed if k not in self.cache]))
        shadows = await self._shadows({came.device for came, rules in work
                                       if came.shadow is None and any(lr.needs_shadow for lr in rules)})  # fmt: skip
        outcome = Outcome()
        evaluations = 0
        late = 0
        # Each device's readings in time order, as the dry run reads them from storage: one that overtook an older
        # one on the way is put back in its place (arrival order across devices does not matter).
        steps = sorted(((came, reading, rules) for came, rules in work for reading in came.readings),
                       key=lambda step: (step[0].device, step[1].ts_ms, step[1].seq))  # fmt: skip
        for came, reading, rules in steps:
            shadow = came.shadow if came.shadow is not None else shadows.get(came.device)
            for lr in rules:
                if watches(lr.rule, reading):
                    key = (lr.rule_id, came.device)
                    state = self.cache.get(key, DeviceState())
                    late += (reading.ts_ms, reading.seq) <= state.last_key
                    self.cache[key] = evaluate(
                        lr, came.device, state, outcome, until_ms=now, reading=reading, shadow=shadow
                    )
                    evaluations += 1
        if late:
            self.rules.metrics.late.inc(late)
            log.info("late readings skipped", extra={"partition": self.number, "count": late})
        for rule_id, device in due:
            loaded, stored = catalog.by_id.get(rule_id), self.cache.get((rule_id, device))
            if loaded is not None and stored is not None:
                self.cache[(rule_id, device)] = evaluate(loaded, device, stored, outcome, until_ms=now)
                evaluations += 1
        changed = {}
        for key, state in outcome.changed.items():
            loaded = catalog.by_id[key[0]]
            changed[key] = (loaded, state, deadline(loaded, state))
            self.deadlines.set(key, changed[key][2])
        budget = await spend_actions(self.conn, effects.wanted(outcome.fired)) if outcome.fired else {}

        def allow_action(tenant: str) -> bool:
            left = budget.get(tenant, 0)
            budget[tenant] = left - 1
            return left > 0

        async with self.conn.transaction():
            if msgs:
                await save_position(self.conn, self.number, msgs[-1].metadata.sequence.stream)
            await save_states(self.conn, self.number, changed)
            published = await effects.apply(self.conn, outcome.fired, allow_action=allow_action,
                                            counted=self.rules.counted)  # fmt: skip
        if msgs:
            self.position = msgs[-1].metadata.sequence.stream
        self._count(outcome, len(good), evaluations, time.perf_counter() - started)
        if outcome.fired:
            self.rules.outbox_wake.set()
            self.rules.deliveries_wake.set()
        await publish_after_commit(self.rules.nc, published, self.rules.mqtt, self.rules.counted)

    def _count(self, outcome: Outcome, messages: int, evaluations: int, seconds: float) -> None:
        metrics = self.rules.metrics
        metrics.readings.inc(messages)
        metrics.evaluations.inc(evaluations)
        metrics.batch_seconds.observe(seconds)
        for (rule_id, reason), count in Counter((r, e.reason) for r, e in outcome.errors).items():
            metrics.errors.labels(reason).inc(count)
            log.info("rule could not decide", extra={"rule": rule_id, "reason": reason, "count": count})
