"""devicesvc: presence, shadows and commands between devices (MQTT) and the registry (PostgreSQL), ADR-0013.

Everything a device sends is handled in one database transaction and acknowledged to the broker (PUBACK) only
after that transaction committed, on a persistent session: a crash loses nothing, it redelivers. Messages of one
device are handled in order (one worker per hash bucket of device ids); devices run in parallel.

Work queued by the API (desired state, commands) is found by a ``LISTEN`` wake-up and by a periodic scan, with
``FOR UPDATE SKIP LOCKED`` so that replicas share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import gmqtt
import msgspec
import psycopg
from nats.aio.client import Client as NATS
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError
from prometheus_client import CollectorRegistry, Counter, Histogram
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from kestrel.runtime.mqtt import Ack, install_manual_ack
from kestrel.runtime.nats import deadletter_config
from kestrel.store import twin
from kestrel.store.pool import checked_pool
from kestrel_core import shadow, streams
from kestrel_core.errors import InvalidInput
from kestrel_core.mqttpacket import publish_size
from kestrel_core.settings import Secret
from kestrel_core.topics import (
    CLIENT_EVENT_FILTERS,
    DEVICE_UPLINK_FILTERS,
    DEVICES_SHARE_GROUP,
    Uplink,
    command_response_topic,
    command_topic,
    desired_topic,
    is_valid_id,
    parse_uplink,
    shared_filter,
    status_topic,
    twin_event_subject,
)

log = logging.getLogger("kestrel.devicesvc")
T = TypeVar("T")

#: Retention statements: (days, chunk). Command events go before their commands (foreign key).
PRUNE = (
    "DELETE FROM shadow_history WHERE id IN (SELECT id FROM shadow_history"
    " WHERE at < now() - make_interval(days => %s) LIMIT %s)",
    "DELETE FROM device_connections WHERE ctid IN (SELECT ctid FROM device_connections"
    " WHERE disconnected_at < now() - make_interval(days => %s) LIMIT %s)",
    "DELETE FROM command_events WHERE id IN (SELECT e.id FROM command_events e JOIN commands c USING (command_id)"
    " WHERE c.completed_at < now() - make_interval(days => %s) LIMIT %s)",
    "DELETE FROM commands WHERE command_id IN (SELECT command_id FROM commands c WHERE completed_at < now()"
    " - make_interval(days => %s) AND NOT EXISTS (SELECT 1 FROM command_events e WHERE e.command_id = c.command_id)"
    " LIMIT %s)",
)
#: Commands due to be sent, in fair rounds: at most ``per_device`` of one device and ``per_tenant`` of one tenant per
#: round, tenants interleaved (the candidates are ranked without locks, then locked with SKIP LOCKED).
DUE_COMMANDS = """
WITH due AS (
    SELECT c.command_id,
           row_number() OVER (PARTITION BY c.device_id ORDER BY c.created_at) AS device_rank,
           row_number() OVER (PARTITION BY c.tenant_id ORDER BY c.created_at) AS tenant_rank
    FROM commands c JOIN device_presence p ON p.device_id = c.device_id
    WHERE p.online AND c.expires_at > now() AND (c.status = 'queued'
          OR (c.status = 'sent' AND c.next_attempt_at <= now() AND c.attempts < c.max_attempts))
)
SELECT c.command_id, c.tenant_id, c.device_id, c.name, c.params, c.status, c.attempts, c.expires_at
FROM commands c JOIN due USING (command_id)
WHERE due.device_rank <= %(per_device)s AND due.tenant_rank <= %(per_tenant)s
ORDER BY due.tenant_rank, c.created_at
LIMIT %(batch)s
FOR UPDATE OF c SKIP LOCKED
"""
EVENTS_STREAM = "DEVICE_EVENTS"
EVENTS_SUBJECTS = ("v1.*.d.*.presence", "v1.*.d.*.shadow", "v1.*.d.*.command")
NOTIFY_CHANNEL = "kestrel_twin"


class DeviceSettings(msgspec.Struct, frozen=True, kw_only=True):
    """``KESTREL_DEVICES_*``."""

    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    #: ``svc:{mqtt_username}:{instance}`` (ADR-0010).
    client_id: str = "svc:devicesvc:1"
    mqtt_username: str = ""
    mqtt_password: Secret = msgspec.field(default_factory=lambda: Secret(""))
    share_group: str = DEVICES_SHARE_GROUP
    session_expiry_s: int = 86400
    nats_url: str = "nats://127.0.0.1:4222"
    #: A device that disconnected without a clean DISCONNECT shows offline after this long, unless it returns.
    presence_grace_s: float = 30.0
    #: Shadow changes, ended connections and finished commands (with their events) older than this are deleted.
    history_days: int = 30
    #: How often the history is pruned (also once at start).
    prune_interval_s: float = 3600.0
    scan_interval_s: float = 0.5
    #: First retry of an unacknowledged command after this long; doubles with each attempt.
    retry_base_s: float = 1.0
    workers: int = 8
    #: Most messages one worker takes at once; reported states among them share one transaction.
    batch: int = 200
    max_payload_bytes: int = 64 * 1024
    #: The broker's maximum packet size when its CONNACK does not say (Mosquitto and EMQX both default to 1 MiB here).
    max_packet_bytes: int = 1024 * 1024
    #: Fairness of command dispatch: at most this many commands of one device, and of one tenant, per round.
    per_device: int = 10
    per_tenant: int = 100
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9103


class CommandResponse(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    status: Literal["delivered", "succeeded", "failed"]
    result: Any = None
    error: str | None = None


class ReportedState(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``{"state": {...merge patch...}, "ts": ms?}`` on ``…/state/reported[/{shadow}]``."""

    state: dict[str, Any]
    ts: int | None = None


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter("kestrel_devicesvc_messages", "Device messages handled", ["kind"], registry=registry)
        self.rejected = Counter(
            "kestrel_devicesvc_rejected", "Device messages dead-lettered, by reason", ["reason"], registry=registry
        )
        self.commands = Counter(
            "kestrel_devicesvc_command_transitions", "Command transitions made", ["status"], registry=registry
        )
        self.published = Counter(
            "kestrel_devicesvc_published", "Messages published to devices", ["kind"], registry=registry
        )
        self.handle_seconds = Histogram(
            "kestrel_devicesvc_handle_seconds",
            "Time to handle what one worker took at once",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=registry,
        )


def _decode(payload: bytes, kind: type[T], reason: str) -> T:
    """A device payload as ``kind``: ``bad_json`` if it is not JSON, ``reason`` if it is not that shape."""
    try:
        return msgspec.json.decode(payload, type=kind)
    except msgspec.ValidationError as exc:
        raise InvalidInput(reason, f"{reason.replace('_', ' ')}: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise InvalidInput("bad_json", "payload is not JSON") from exc
    except RecursionError as exc:
        raise InvalidInput("too_deep", "payload nests too deeply") from exc


def _is_report(topic: str) -> bool:
    try:
        return parse_uplink(topic).kind == "reported"
    except InvalidInput:
        return False


def _first(properties: Any, name: str) -> Any:
    value = (properties or {}).get(name)
    return value[0] if isinstance(value, list) and value else value


def _ms(ts: datetime | None) -> int | None:
    return None if ts is None else int(ts.timestamp() * 1000)


class DeviceService:
    def __init__(
        self,
        settings: DeviceSettings,
        database_url: str,
        pool: AsyncConnectionPool[Any],
        nc: NATS,
        client: gmqtt.Client,
        registry: CollectorRegistry,
    ) -> None:
        self.settings = settings
        self.database_url = database_url
        self.pool = pool
        self.js = nc.jetstream()
        self.client = client
        self.metrics = Metrics(registry)
        self.wake = asyncio.Event()
        self.queues: list[asyncio.Queue[tuple[str, bytes, Any, Ack]]] = [
            asyncio.Queue() for _ in range(max(1, settings.workers))
        ]
        self.handled = 0
        self.next_prune = 0.0
        #: The broker's limit for one packet: its CONNACK's Maximum Packet Size, else the setting.
        self.max_packet_bytes = settings.max_packet_bytes

    # ---------------------------------------------------------------------------------------- intake

    def on_message(self, topic: str, payload: bytes, properties: Any, ack: Ack) -> None:
        """gmqtt callback: route to the worker of this device (its messages stay in order)."""
        parts = topic.split("/")
        index = 4 if topic.startswith("$SYS/") else 3
        key = parts[index] if len(parts) > index else topic
        bucket = int.from_bytes(hashlib.blake2s(key.encode(), digest_size=4).digest(), "big") % len(self.queues)
        self.queues[bucket].put_nowait((topic, payload, properties, ack))

    async def worker(self, queue: asyncio.Queue[tuple[str, bytes, Any, Ack]]) -> None:
        """Take what is queued (up to ``batch``); runs of reported-state messages share one transaction."""
        while True:
            batch = [await queue.get()]
            while len(batch) < self.settings.batch and not queue.empty():
                batch.append(queue.get_nowait())
            started = time.perf_counter()
            index = 0
            while index < len(batch):
                end = index
                while end < len(batch) and _is_report(batch[end][0]):
                    end += 1
                try:
                    if end > index:
                        await self.reported_batch(batch[index:end])
                    else:
                        await self.handle_one(*batch[index])
                except Exception:  # a bug must not end this worker: its devices' messages would wait forever
                    log.exception("unexpected error handling device messages; they stay unacknowledged")
                index = max(end, index + 1)
            self.metrics.handle_seconds.observe(time.perf_counter() - started)

    async def handle_one(self, topic: str, payload: bytes, properties: Any, ack: Ack) -> None:
        try:
            await self.handle(topic, payload, properties)
        except InvalidInput as exc:
            if not await self.deadletter(topic, payload, exc):
                return  # not stored anywhere: no PUBACK, the broker redelivers after a reconnect
        except (psycopg.Error, OSError):
            log.exception("could not handle a device message; it stays unacknowledged", extra={"topic": topic})
            return
        self.handled += 1
        ack()

    async def handle(self, topic: str, payload: bytes, properties: Any) -> None:
        self._check_size(payload)
        if topic.startswith("$SYS/brokers/"):
            self.metrics.messages.labels("client_event").inc()
            await self.client_event(topic, payload)
            return
        uplink = parse_uplink(topic)
        self.metrics.messages.labels(uplink.kind).inc()
        if uplink.kind == "cmd-res":
            await self.command_response(uplink, payload, properties)
        elif uplink.kind == "status":
            await self.device_status(uplink, payload)

    async def deadletter(self, topic: str, payload: bytes, exc: InvalidInput) -> bool:
        self.metrics.rejected.labels(exc.reason).inc()
        log.info("rejected device message", extra={"reason": exc.reason, "topic": topic[:200]})
        headers = {
            streams.HDR_REASON: exc.reason,
            streams.HDR_DETAIL: streams.header_safe(exc.detail),
            streams.HDR_TOPIC: streams.header_safe(topic),
            streams.HDR_STAGE: "devicesvc",
        }
        try:
            await self.js.publish(streams.deadletter_subject("twin", exc.reason), payload, headers=headers, timeout=5)
        except Exception:
            log.exception("could not dead-letter a device message")
            return False
        return True

    async def event(self, tenant: str, device: str, kind: str, body: dict[str, Any], msg_id: str) -> None:
        """A notification on NATS after the commit; the database row is the record, so a failure is logged."""
        try:
            await self.js.publish(
                twin_event_subject(tenant, device, kind),
                msgspec.json.encode({"tenant": tenant, "device": device, **body}),
                headers={streams.HDR_MSG_ID: msg_id},
                timeout=5,
            )
        except Exception:  # noqa: BLE001 - NATS errors of every kind
            log.warning("could not publish a %s event", kind, extra={"device": device})

    # -------------------------------------------------------------------------------------- presence

    async def _presence_locked(self, conn: AsyncConnection[Any], tenant: str, device: str) -> dict[str, Any]:
        await conn.execute(
            "INSERT INTO device_presence (tenant_id, device_id) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (tenant, device),
        )
        cur = conn.cursor(row_factory=dict_row)
        row = await (
            await cur.execute("SELECT * FROM device_presence WHERE device_id = %s FOR UPDATE", (device,))
        ).fetchone()
        assert row is not None
        return row

    async def client_event(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        if len(parts) != 6 or parts[3] != "clients" or parts[5] not in ("connected", "disconnected"):
            raise InvalidInput("bad_topic", "not a client event topic")
        node, clientid, what = parts[2], parts[4], parts[5]
        if not is_valid_id(clientid):
            return  # backend principals and provisioning connections are not devices
        body = _decode(payload, Any, "bad_client_event")
        if not isinstance(body, dict) or not isinstance(body.get("connected_at"), int):
            raise InvalidInput("bad_client_event", "client events carry connected_at (ms)")
        connected_ms = body["connected_at"]
        at = datetime.fromtimestamp(int(body.get("ts") or connected_ms) / 1000, UTC)
        async with self.pool.connection() as conn, conn.transaction():
            device = await (
                await conn.execute("SELECT tenant_id FROM devices WHERE device_id = %s", (clientid,))
            ).fetchone()
            if device is None:
                return
            tenant = device[0]
            before = await self._presence_locked(conn, tenant, clientid)
            if what == "connected":
                await conn.execute(
                    "INSERT INTO device_connections (tenant_id, device_id, node, connected_ms, connected_at, peer,"
                    " protocol) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    (tenant, clientid, node, connected_ms, at, str(body.get("ipaddress", ""))[:64],
                     body.get("proto_ver") if isinstance(body.get("proto_ver"), int) else None),
                )  # fmt: skip
                await conn.execute(
                    "UPDATE devices SET status = 'active', version = version + 1, updated_at = now()"
                    " WHERE device_id = %s AND status IN ('registered', 'provisioned')",
                    (clientid,),
                )
            else:
                await conn.execute(
                    "INSERT INTO device_connections (tenant_id, device_id, node, connected_ms, connected_at,"
                    " disconnected_at, reason) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (device_id, node, connected_ms) DO UPDATE"
                    " SET disconnected_at = EXCLUDED.disconnected_at, reason = EXCLUDED.reason",
                    (tenant, clientid, node, connected_ms, datetime.fromtimestamp(connected_ms / 1000, UTC), at,
                     str(body.get("reason", ""))[:120]),
                )  # fmt: skip
            live = await (
                await conn.execute(
                    "SELECT count(*) FROM device_connections WHERE device_id = %s AND disconnected_at IS NULL",
                    (clientid,),
                )
            ).fetchone()
            connections = int(live[0]) if live else 0
            # A clean goodbye: EMQX says "normal"; Mosquitto 2.0 gives plugins no reason, so the SDK says "offline"
            # on its status topic just before its DISCONNECT (same device, same worker: it is handled first).
            said_goodbye = before["reported_status"] == "offline" and (before["reported_status_at"] or at) >= (
                before["connected_at"] or at
            )
            clean = what == "disconnected" and (body.get("reason") == "normal" or said_goodbye)
            # Online at once on connect; offline at once only when the last connection ended cleanly (a device
            # leaving on purpose sends no will); otherwise after the grace period (see sweep_presence).
            online = connections > 0 or (before["online"] and not clean)
            await conn.execute(
                "UPDATE device_presence SET online = %s, connections = %s, last_seen = greatest(last_seen, %s),"
                " connected_at = CASE WHEN %s THEN %s ELSE connected_at END,"
                " disconnected_at = CASE WHEN %s THEN %s ELSE disconnected_at END,"
                " disconnect_reason = CASE WHEN %s THEN %s ELSE disconnect_reason END,"
                " protocol = coalesce(%s, protocol), changed_at = CASE WHEN online <> %s THEN now() ELSE changed_at END"
                " WHERE device_id = %s",
                (online, connections, at, what == "connected", at, what == "disconnected", at,
                 what == "disconnected", str(body.get("reason", ""))[:120],
                 body.get("proto_ver") if what == "connected" and isinstance(body.get("proto_ver"), int) else None,
                 online, clientid),
            )  # fmt: skip
        if what == "connected":
            self.wake.set()  # queued commands may go now
        await self.event(
            tenant,
            clientid,
            "presence",
            {"event": what, "online": online, "connections": connections, "node": node, "at": _ms(at)},
            f"presence:{clientid}:{node}:{connected_ms}:{what}",
        )

    async def device_status(self, uplink: Uplink, payload: bytes) -> None:
        """The device's own retained status (``online``/``offline``; the offline one is usually its will)."""
        if not payload:
            return  # a retained status being cleared
        body = _decode(payload, Any, "bad_status")
        value = body.get("status") if isinstance(body, dict) else body
        if value not in ("online", "offline"):
            raise InvalidInput("bad_status", 'status must be {"status": "online"|"offline"}')
        async with self.pool.connection() as conn, conn.transaction():
            if not await self._owned(conn, uplink):
                return
            before = await self._presence_locked(conn, uplink.tenant, uplink.device)
            went_offline = value == "offline" and before["online"] and before["connections"] == 0
            # A device saying "online" is online, even when its connect event was never seen (devicesvc deployed
            # after the devices connected): its retained status arrives when devicesvc subscribes.
            came_online = value == "online" and not before["online"]
            await conn.execute(
                "UPDATE device_presence SET reported_status = %s, reported_status_at = now(),"
                " last_seen = CASE WHEN %s = 'online' THEN now() ELSE last_seen END,"
                " online = CASE WHEN %s THEN false WHEN %s THEN true ELSE online END,"
                " changed_at = CASE WHEN %s OR %s THEN now() ELSE changed_at END WHERE device_id = %s",
                (value, value, went_offline, came_online, went_offline, came_online, uplink.device),
            )
        if value == "online":
            self.wake.set()  # it has subscribed by now: send what waits for it
        if went_offline or came_online:
            await self.event(
                uplink.tenant,
                uplink.device,
                "presence",
                {
                    "event": f"status_{value}",
                    "online": came_online,
                    "connections": before["connections"],
                    "at": twin.now_ms(),
                },
                f"presence:{uplink.device}:will:{twin.now_ms()}",
            )

    async def sweep_presence(self) -> None:
        async with self.pool.connection() as conn, conn.transaction():
            rows = await (
                await conn.execute(
                    "UPDATE device_presence SET online = false, changed_at = now() WHERE online AND connections = 0"
                    " AND disconnected_at <= now() - make_interval(secs => %s) RETURNING tenant_id, device_id",
                    (self.settings.presence_grace_s,),
                )
            ).fetchall()
        for tenant, device in rows:
            now = twin.now_ms()
            await self.event(
                tenant,
                device,
                "presence",
                {"event": "grace_expired", "online": False, "connections": 0, "at": now},
                f"presence:{device}:grace:{now}",
            )

    async def _owned(self, conn: AsyncConnection[Any], uplink: Uplink) -> bool:
        """The topic's device belongs to the topic's tenant (the broker ACL already bound the sender to it)."""
        row = await (
            await conn.execute(
                "SELECT 1 FROM devices WHERE device_id = %s AND tenant_id = %s AND status <> 'decommissioned'",
                (uplink.device, uplink.tenant),
            )
        ).fetchone()
        return row is not None

    # --------------------------------------------------------------------------------------- shadows

    def _check_size(self, payload: bytes) -> None:
        if len(payload) > self.settings.max_payload_bytes:
            raise InvalidInput("payload_too_large", f"payloads are limited to {self.settings.max_payload_bytes} bytes")

    def _report(self, topic: str, payload: bytes) -> twin.Patch:
        """Validate one reported-state message (no I/O): the patch it asks for, or ``InvalidInput``."""
        self._check_size(payload)
        uplink = parse_uplink(topic)
        report = _decode(payload, ReportedState, "bad_report")
        now = twin.now_ms()
        # A device clock far in the future would freeze fields; bound it by the receive time.
        ts = min(report.ts, now + 5_000) if report.ts is not None else now
        return twin.Patch(
            uplink.tenant, uplink.device, uplink.arg, "reported", report.state, ts, f"device:{uplink.device}"
        )

    async def reported_batch(self, items: list[tuple[str, bytes, Any, Ack]]) -> None:
        """Reported state of many devices in one transaction (in arrival order per device), then the PUBACKs."""
        self.metrics.messages.labels("reported").inc(len(items))
        rejected: list[tuple[str, bytes, Ack, InvalidInput]] = []
        accepted: list[tuple[twin.Patch, str, bytes, Ack]] = []
        for topic, payload, _properties, ack in items:
            try:
                accepted.append((self._report(topic, payload), topic, payload, ack))
            except InvalidInput as exc:
                rejected.append((topic, payload, ack, exc))
        done: list[Ack] = []
        if accepted:
            try:
                async with self.pool.connection() as conn, conn.transaction():
                    owners = dict(
                        await (
                            await conn.execute(
                                "SELECT device_id, tenant_id FROM devices WHERE device_id = ANY(%s)"
                                " AND status <> 'decommissioned'",
                                (list({p.device for p, *_ in accepted}),),
                            )
                        ).fetchall()
                    )
                    known = []
                    for patch, topic, payload, ack in accepted:
                        if owners.get(patch.device) == patch.tenant:
                            known.append((patch, topic, payload, ack))
                        else:
                            rejected.append((topic, payload, ack, InvalidInput("unknown_device", "no such device")))
                    if known:
                        results = await twin.apply_patches(conn, [p for p, *_ in known])
                        for (_, topic, payload, ack), result in zip(known, results, strict=True):
                            if isinstance(result, InvalidInput):
                                rejected.append((topic, payload, ack, result))
                            else:
                                done.append(ack)
                        await conn.execute(
                            "UPDATE device_presence SET last_seen = now() WHERE device_id = ANY(%s)",
                            (list({p.device for p, *_ in known}),),
                        )
            except (psycopg.Error, OSError):
                log.exception("could not store reported state; the messages stay unacknowledged")
                return
        for ack in done:
            ack()
        self.handled += len(done)
        for topic, payload, ack, refusal in rejected:
            if await self.deadletter(topic, payload, refusal):
                ack()

    async def publish_shadows(self) -> int:
        """The outbox: publish desired state and delta (retained) for shadows that changed, and a NATS event."""
        if not self.client.is_connected:
            return 0
        async with self.pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            rows = await (
                await cur.execute(
                    "SELECT tenant_id, device_id, name, version, desired, reported, published FROM device_shadows"
                    " WHERE version > published_version ORDER BY updated_at LIMIT 500 FOR UPDATE SKIP LOCKED"
                )
            ).fetchall()
            documents = [{"desired": r["desired"], "delta": shadow.delta(r["desired"], r["reported"])} for r in rows]
            for row, document in zip(rows, documents, strict=True):
                if document != row["published"]:  # a reported change that leaves the delta alone: nothing to send
                    body = {"version": row["version"], **document, "ts": twin.now_ms()}
                    self.client.publish(
                        desired_topic(row["tenant_id"], row["device_id"], row["name"]),
                        msgspec.json.encode(body),
                        qos=1,
                        retain=True,
                    )
                    self.metrics.published.labels("desired").inc()
            async with conn.cursor() as write:
                await write.executemany(
                    "UPDATE device_shadows SET published_version = %s, published = %s"
                    " WHERE device_id = %s AND name = %s",
                    [(r["version"], Jsonb(d), r["device_id"], r["name"]) for r, d in zip(rows, documents, strict=True)],
                )
        for row, document in zip(rows, documents, strict=True):
            await self.event(
                row["tenant_id"],
                row["device_id"],
                "shadow",
                {"name": row["name"], "version": row["version"], "reported": row["reported"], **document},
                f"shadow:{row['device_id']}:{row['name']}:{row['version']}",
            )
        return len(rows)

    # -------------------------------------------------------------------------------------- commands

    async def command_response(self, uplink: Uplink, payload: bytes, properties: Any) -> None:
        request_id = uplink.arg
        correlation = _first(properties, "correlation_data")
        if correlation is not None and bytes(correlation) != request_id.encode():
            raise InvalidInput("correlation_mismatch", "correlation data does not match the request id")
        response = _decode(payload, CommandResponse, "bad_command_response")
        if response.error is not None and len(response.error) > 2000:
            raise InvalidInput("bad_command_response", "error is limited to 2000 characters")
        async with self.pool.connection() as conn, conn.transaction():
            row = await (
                await conn.execute(
                    "SELECT tenant_id, device_id, status FROM commands WHERE command_id = %s FOR UPDATE",
                    (request_id,),
                )
            ).fetchone()
            if row is None or row[0] != uplink.tenant or row[1] != uplink.device:
                # Unknown, or another device's command: the same answer, so nothing is learnt from it.
                raise InvalidInput("unknown_command", "no such command for this device")
            fields: dict[str, Any] = {}
            if response.status != "delivered":
                fields = {"result": response.result, "error": response.error}
            moved = await twin.transition(conn, request_id, response.status, **fields)
            if moved is None:
                late = row[2] in twin.TERMINAL
                await twin.command_event(
                    conn, uplink.tenant, request_id, "late_response" if late else "duplicate_response",
                    {"status": response.status},
                )  # fmt: skip
            await conn.execute("UPDATE device_presence SET last_seen = now() WHERE device_id = %s", (uplink.device,))
        if moved is not None:
            self.metrics.commands.labels(response.status).inc()

    async def dispatch_commands(self) -> int:
        """Send queued commands to connected devices; re-send unacknowledged ones whose backoff elapsed.

        Fair: each round takes at most ``per_device`` commands of one device and ``per_tenant`` of one tenant, in
        rounds across tenants, so no device or tenant with a backlog delays another's commands. A command the broker
        could never carry (its packet above the broker's maximum) fails at once with the reason, instead of being
        published: the broker would drop devicesvc's connection, and every other command with it (issue 10).
        """
        if not self.client.is_connected:
            return 0
        async with self.pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            rows = await (
                await cur.execute(
                    DUE_COMMANDS,
                    {"per_device": self.settings.per_device, "per_tenant": self.settings.per_tenant, "batch": 500},
                )
            ).fetchall()
            now = datetime.now(UTC)
            for row in rows:
                left = max(1, int((row["expires_at"] - now).total_seconds()))
                body = {
                    "request_id": row["command_id"],
                    "name": row["name"],
                    "params": row["params"],
                    "expires_at": _ms(row["expires_at"]),
                    "attempt": row["attempts"] + 1,
                }
                topic = command_topic(row["tenant_id"], row["device_id"], row["name"])
                response_topic = command_response_topic(row["tenant_id"], row["device_id"], row["command_id"])
                payload = msgspec.json.encode(body)
                attempt = str(row["attempts"] + 1)
                size = publish_size(
                    topic, payload, response_topic, row["command_id"].encode(), [("kestrel-attempt", attempt)]
                )
                if size > self.max_packet_bytes:
                    limit = self.max_packet_bytes
                    error = f"the command is {size} bytes as an MQTT packet; the broker carries at most {limit}"
                    await twin.transition(
                        conn, row["command_id"], "failed", error=error, detail={"reason": "too_large"}
                    )
                    self.metrics.commands.labels("failed").inc()
                    log.warning(
                        "command too large for the broker; failed", extra={"command": row["command_id"], "bytes": size}
                    )
                    continue
                self.client.publish(
                    topic,
                    payload,
                    qos=1,
                    response_topic=response_topic,
                    correlation_data=row["command_id"].encode(),
                    message_expiry_interval=left,
                    user_property=[("kestrel-attempt", attempt)],
                )
                self.metrics.published.labels("command").inc()
                backoff = self.settings.retry_base_s * (2 ** row["attempts"])
                next_at = datetime.fromtimestamp(now.timestamp() + backoff, UTC)
                if row["status"] == "queued":
                    await twin.transition(
                        conn, row["command_id"], "sent", attempts=row["attempts"] + 1, next_attempt_at=next_at
                    )
                    self.metrics.commands.labels("sent").inc()
                else:
                    await conn.execute(
                        "UPDATE commands SET attempts = attempts + 1, next_attempt_at = %s, updated_at = now()"
                        " WHERE command_id = %s",
                        (next_at, row["command_id"]),
                    )
                    await twin.command_event(
                        conn, row["tenant_id"], row["command_id"], "retry", {"attempt": row["attempts"] + 1}
                    )
        return len(rows)

    async def expire_commands(self) -> None:
        """Commands past their expiry before delivery, and commands past their timeout once sent."""
        async with self.pool.connection() as conn, conn.transaction():
            for status, deadline in (
                ("expired", "expires_at"),
                ("timed_out", "sent_at + make_interval(secs => timeout_s)"),
            ):
                rows = await (
                    await conn.execute(
                        f"WITH moved AS (UPDATE commands SET status = %s, completed_at = now(), updated_at = now()"  # noqa: S608 - fixed deadlines
                        f" WHERE status = ANY(%s) AND {deadline} <= now() RETURNING tenant_id, command_id)"
                        f" INSERT INTO command_events (tenant_id, command_id, event)"
                        f" SELECT tenant_id, command_id, %s FROM moved RETURNING command_id",
                        (status, list(twin.PREDECESSORS[status]), status),
                    )
                ).fetchall()
                if rows:
                    self.metrics.commands.labels(status).inc(len(rows))

    async def publish_command_events(self) -> None:
        """Every command transition (including the API's queued and cancelled) as a NATS event, in order."""
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute("INSERT INTO twin_cursors (name) VALUES ('command_events') ON CONFLICT DO NOTHING")
            cursor = await (
                await conn.execute(
                    "SELECT last_id FROM twin_cursors WHERE name = 'command_events' FOR UPDATE SKIP LOCKED"
                )
            ).fetchone()
            if cursor is None:
                return  # another replica is publishing
            cur = conn.cursor(row_factory=dict_row)
            rows = await (
                await cur.execute(
                    "SELECT e.id, e.tenant_id, c.device_id, e.command_id, e.event, e.detail, e.at, c.status"
                    " FROM command_events e JOIN commands c USING (command_id) WHERE e.id > %s ORDER BY e.id"
                    " LIMIT 1000",
                    (cursor[0],),
                )
            ).fetchall()
            for row in rows:
                await self.event(
                    row["tenant_id"],
                    row["device_id"],
                    "command",
                    {"command_id": row["command_id"], "event": row["event"], "status": row["status"],
                     "detail": row["detail"], "at": _ms(row["at"])},
                    f"command-event:{row['id']}",
                )  # fmt: skip
            if rows:
                await conn.execute(
                    "UPDATE twin_cursors SET last_id = %s WHERE name = 'command_events'", (rows[-1]["id"],)
                )

    # --------------------------------------------------------------------------------- decommission

    async def clear_retained(self, device: str) -> None:
        """A decommissioned device's retained topics are emptied (the broker drops a retained empty payload)."""
        async with self.pool.connection() as conn:
            row = await (
                await conn.execute(
                    "SELECT tenant_id FROM devices WHERE device_id = %s AND status = 'decommissioned'", (device,)
                )
            ).fetchone()
            if row is None:
                return
            names = await (
                await conn.execute("SELECT name FROM device_shadows WHERE device_id = %s", (device,))
            ).fetchall()
        for (name,) in names:
            self.client.publish(desired_topic(row[0], device, name), b"", qos=1, retain=True)
        self.client.publish(status_topic(row[0], device), b"", qos=1, retain=True)

    # ------------------------------------------------------------------------------------------ loop

    async def listen(self) -> None:
        """Wake the scan loop on the API's notifications (a lost one only delays work until the next scan)."""
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.database_url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self.wake.set()
                    async for note in conn.notifies():
                        kind, _, device = note.payload.partition(":")
                        if kind == "devices":
                            await self.clear_retained(device)
                        self.wake.set()
            except (psycopg.Error, OSError) as exc:
                log.warning("devicesvc lost its notification connection", extra={"error": str(exc)})
                await asyncio.sleep(1.0)

    async def scan(self, periodic: bool) -> None:
        """Notifications (desired state, commands, connects) need the outbox and the dispatcher; deadlines,
        presence grace, command events and retention run on the scan interval."""
        await self.publish_shadows()
        await self.dispatch_commands()
        if not periodic:
            return
        await self.expire_commands()
        await self.sweep_presence()
        await self.publish_command_events()
        if time.monotonic() >= self.next_prune:
            self.next_prune = time.monotonic() + self.settings.prune_interval_s
            await self.prune_history()

    async def prune_history(self, chunk: int = 10_000) -> int:
        """Retention: delete history older than ``history_days``, in chunks so no transaction grows large. The
        current state (shadows, presence, open commands) is never pruned."""
        deleted = 0
        for statement in PRUNE:
            while True:
                async with self.pool.connection() as conn, conn.transaction():
                    cur = await conn.execute(statement, (self.settings.history_days, chunk))
                    deleted += cur.rowcount
                if cur.rowcount < chunk:
                    break
        if deleted:
            log.info("history pruned", extra={"rows": deleted, "older_than_days": self.settings.history_days})
        return deleted

    async def scan_loop(self, stop: asyncio.Event) -> None:
        next_periodic = 0.0
        while not stop.is_set():
            self.wake.clear()
            periodic = time.monotonic() >= next_periodic
            if periodic:
                next_periodic = time.monotonic() + self.settings.scan_interval_s
            try:
                await self.scan(periodic)
            except (psycopg.Error, OSError):
                log.exception("devicesvc scan failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), max(0.0, next_periodic - time.monotonic()))


async def ensure_events_stream(nc: NATS) -> None:
    js = nc.jetstream()
    config = StreamConfig(
        name=EVENTS_STREAM,
        subjects=list(EVENTS_SUBJECTS),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=7 * 86400,
        discard=DiscardPolicy.OLD,
        duplicate_window=streams.DUPLICATE_WINDOW_S,
        num_replicas=1,
    )
    for stream in (config, deadletter_config()):
        try:
            await js.add_stream(stream)
        except BadRequestError:
            await js.update_stream(stream)


async def run_devicesvc(
    settings: DeviceSettings,
    database_url: str,
    stop: asyncio.Event,
    nc: NATS,
    registry: CollectorRegistry,
    ready: asyncio.Event | None = None,
) -> None:
    await ensure_events_stream(nc)
    async with checked_pool(database_url, min_size=2, max_size=settings.workers + 4) as pool:
        client = gmqtt.Client(
            settings.client_id,
            clean_session=False,
            optimistic_acknowledgement=False,
            session_expiry_interval=settings.session_expiry_s,
            receive_maximum=1000,
        )
        client.set_config({"reconnect_retries": -1, "reconnect_delay": 1})
        if settings.mqtt_username:
            client.set_auth_credentials(settings.mqtt_username, settings.mqtt_password.reveal() or None)
        service = DeviceService(settings, database_url, pool, nc, client, registry)
        install_manual_ack(client, service.on_message)
        # Client events are not shared: Mosquitto 2.0 does not deliver $SYS topics to shared subscriptions. Every
        # replica handles every event; that is idempotent (connection rows are keyed by connected_at, the count is
        # recomputed, and the NATS event's Nats-Msg-Id is the same, so JetStream drops the repeat).
        subscriptions = [
            gmqtt.Subscription(shared_filter(settings.share_group, f), qos=1) for f in DEVICE_UPLINK_FILTERS
        ]
        subscriptions += [gmqtt.Subscription(f, qos=1) for f in CLIENT_EVENT_FILTERS]

        def on_connect(c: Any, flags: Any, rc: Any, properties: Any) -> None:
            c.subscribe(subscriptions)
            announced = _first(properties, "maximum_packet_size")
            service.max_packet_bytes = int(announced) if announced else settings.max_packet_bytes
            service.wake.set()
            log.info("devicesvc connected", extra={"client_id": settings.client_id})

        def on_subscribe(c: Any, mid: Any, granted: Any, properties: Any) -> None:
            if any(code >= 0x80 for code in granted):
                log.error("the broker refused devicesvc's subscriptions", extra={"reason_codes": list(granted)})

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        tasks = [asyncio.create_task(service.worker(q)) for q in service.queues]
        tasks.append(asyncio.create_task(service.listen()))
        await client.connect(settings.mqtt_host, settings.mqtt_port, keepalive=30, version=gmqtt.constants.MQTTv50)
        tasks.append(asyncio.create_task(service.scan_loop(stop)))
        if ready is not None:
            ready.set()
        await stop.wait()
        deadline = time.monotonic() + 10
        while any(q.qsize() for q in service.queues) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with contextlib.suppress(TimeoutError):  # a broker that is gone gets no goodbye
            await asyncio.wait_for(client.disconnect(), 5)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        log.info("devicesvc stopped", extra={"handled": service.handled})
