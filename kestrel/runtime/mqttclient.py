"""A small asyncio MQTT client (v5 and 3.1.1): authsvc's kicks, simulated devices, load generation, tests.

It does only what a telemetry device does: CONNECT, PUBLISH at QoS 0/1 with a future per PUBACK,
PINGREQ, DISCONNECT. Knowing exactly which publishes the broker acknowledged is what loss counting
needs (reliability.md), and a raw client costs a fraction of paho's CPU per message
(performance.md §3). Devices and services with richer needs use gmqtt or paho.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14
#: ``MqttError.reason_code`` when the broker closed the connection instead of answering the CONNECT.
CLOSED_WITHOUT_CONNACK = -1


class MqttError(Exception):
    """The broker refused us or the connection broke."""

    def __init__(self, detail: str, reason_code: int = 0) -> None:
        super().__init__(detail)
        self.reason_code = reason_code


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _decode_varint(data: bytes, pos: int) -> tuple[int, int]:
    """An MQTT variable byte integer at ``pos``: (value, position after it)."""
    value, mult = 0, 1
    while True:
        byte = data[pos]
        pos += 1
        value += (byte & 0x7F) * mult
        mult *= 128
        if not byte & 0x80:
            return value, pos


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([(kind << 4) | flags]) + _varint(len(body)) + body


@dataclass
class MqttPublisher:
    """One device connection. ``version`` 5 (MQTT 5) or 4 (MQTT 3.1.1)."""

    host: str
    port: int
    client_id: str
    version: int = 5
    keepalive: int = 30
    clean_start: bool = True
    #: MQTT 5 Session Expiry Interval (seconds); with ``clean_start=False`` the broker keeps the session.
    session_expiry: int = 0
    max_inflight: int = 100
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None
    _reader: asyncio.StreamReader | None = None
    _writer: asyncio.StreamWriter | None = None
    _pending: dict[int, asyncio.Future[int]] = field(default_factory=dict)
    _ids: Iterator[int] = field(default_factory=lambda: iter(()))
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _limit: int = 0
    _in_flight: int = 0
    _space: asyncio.Event = field(default_factory=asyncio.Event)
    _topics: dict[str, bytes] = field(default_factory=dict)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    #: Messages delivered to this client's subscriptions: (topic, payload).
    received: asyncio.Queue[tuple[str, bytes]] = field(default_factory=asyncio.Queue)
    #: The DISCONNECT reason code when the broker closed the session with one.
    disconnect_reason: int | None = None

    async def connect(self, connect_timeout: float = 10.0) -> None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self.tls), connect_timeout
        )
        self._reader, self._writer = reader, writer
        flags = 0x02 if self.clean_start else 0x00
        flags |= (0x80 if self.username is not None else 0) | (0x40 if self.password is not None else 0)
        props = b""
        if self.version == 5:
            expiry = b"\x11" + self.session_expiry.to_bytes(4, "big") if self.session_expiry else b""
            props = _varint(len(expiry)) + expiry
        body = _str("MQTT") + bytes([self.version, flags]) + struct.pack("!H", self.keepalive) + props
        body += _str(self.client_id)
        if self.username is not None:
            body += _str(self.username)
        if self.password is not None:
            body += _str(self.password)
        writer.write(_packet(CONNECT, 0, body))
        try:
            kind, _, data = await asyncio.wait_for(self._read_packet(), connect_timeout)
        except asyncio.IncompleteReadError as exc:  # a transient refusal: the broker could not decide yet
            writer.close()
            raise MqttError("the broker closed the connection without a CONNACK", CLOSED_WITHOUT_CONNACK) from exc
        if kind != CONNACK:
            raise MqttError(f"expected CONNACK, got packet type {kind}")
        code = data[1]
        if code != 0:
            raise MqttError(f"connection refused (reason code {code:#x})", code)
        receive_max = self._connack_receive_maximum(data) if self.version == 5 else 65535
        self._limit = min(self.max_inflight, receive_max)
        self._ids = self._packet_ids()
        self._tasks = [
            asyncio.create_task(self._read_loop(), name=f"mqtt-read-{self.client_id}"),
            asyncio.create_task(self._ping_loop(), name=f"mqtt-ping-{self.client_id}"),
        ]

    @staticmethod
    def _connack_receive_maximum(data: bytes) -> int:
        # CONNACK v5: flags, reason, properties(varint length + properties); Receive Maximum is id 0x21.
        length, pos = _decode_varint(data, 2)
        end = pos + length
        while pos < end:
            prop = data[pos]
            pos += 1
            if prop == 0x21:
                return int(struct.unpack_from("!H", data, pos)[0])
            # Skip the other CONNACK properties by their encoded size.
            if prop in (0x24, 0x25, 0x28, 0x29, 0x2A, 0x01):
                pos += 1
            elif prop in (0x13, 0x22):
                pos += 2
            elif prop in (0x11, 0x27):
                pos += 4
            elif prop == 0x26:
                pos += 2 + struct.unpack_from("!H", data, pos)[0]
                pos += 2 + struct.unpack_from("!H", data, pos)[0]
            else:  # strings and binary data
                pos += 2 + struct.unpack_from("!H", data, pos)[0]
        return 65535

    @staticmethod
    def _packet_ids() -> Iterator[int]:
        while True:
            yield from range(1, 65536)

    async def _read_packet(self) -> tuple[int, int, bytes]:
        assert self._reader is not None
        head = await self._reader.readexactly(1)
        mult, length = 1, 0
        while True:
            byte = (await self._reader.readexactly(1))[0]
            length += (byte & 0x7F) * mult
            mult *= 128
            if not byte & 0x80:
                break
        data = await self._reader.readexactly(length) if length else b""
        return head[0] >> 4, head[0] & 0x0F, data

    async def _read_loop(self) -> None:
        """Read in bulk and parse every complete packet in the buffer (one await per read, not per packet)."""
        assert self._reader is not None
        buffer = bytearray()
        try:
            while True:
                chunk = await self._reader.read(65536)
                if not chunk:
                    break
                buffer += chunk
                pos = 0
                while len(buffer) - pos >= 2:
                    kind = buffer[pos] >> 4
                    mult, length, i = 1, 0, pos + 1
                    while i < len(buffer):
                        byte = buffer[i]
                        length += (byte & 0x7F) * mult
                        mult *= 128
                        i += 1
                        if not byte & 0x80:
                            break
                    else:
                        break  # length bytes incomplete
                    if i + length > len(buffer):
                        break  # body incomplete
                    if kind == PUBACK:
                        packet_id = (buffer[i] << 8) | buffer[i + 1]
                        reason = buffer[i + 2] if length > 2 else 0
                        future = self._pending.pop(packet_id, None)
                        if future is not None and not future.done():
                            future.set_result(reason)
                    elif kind == SUBACK:
                        self._on_suback(bytes(buffer[i : i + length]))
                    elif kind == PUBLISH:
                        self._on_publish(buffer[pos] & 0x0F, bytes(buffer[i : i + length]))
                    elif kind == DISCONNECT:
                        self.disconnect_reason = buffer[i] if length else 0
                        return
                    pos = i + length
                del buffer[:pos]
        except (ConnectionError, OSError):
            pass
        finally:
            self._fail_pending()

    def _on_suback(self, body: bytes) -> None:
        packet_id = (body[0] << 8) | body[1]
        pos = 2
        if self.version == 5:
            length, pos = _decode_varint(body, pos)
            pos += length
        future = self._pending.pop(packet_id, None)
        if future is not None and not future.done():
            future.set_result(body[pos])

    def _on_publish(self, flags: int, body: bytes) -> None:
        qos = (flags >> 1) & 0x03
        topic_len = (body[0] << 8) | body[1]
        topic = body[2 : 2 + topic_len].decode()
        pos = 2 + topic_len
        packet_id = 0
        if qos:
            packet_id = (body[pos] << 8) | body[pos + 1]
            pos += 2
        if self.version == 5:
            length, pos = _decode_varint(body, pos)
            pos += length
        self.received.put_nowait((topic, body[pos:]))
        if qos == 1 and self._writer is not None:
            self._writer.write(_packet(PUBACK, 0, packet_id.to_bytes(2, "big")))

    async def subscribe(self, topic_filter: str, qos: int = 1) -> int:
        """SUBSCRIBE one filter; return the SUBACK reason code (granted QoS 0-2, or >= 0x80 refused)."""
        if self.closed.is_set() or self._writer is None:
            raise MqttError("not connected")
        packet_id = next(self._ids)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending[packet_id] = future
        props = b"\x00" if self.version == 5 else b""
        body = packet_id.to_bytes(2, "big") + props + _str(topic_filter) + bytes([qos])
        self._writer.write(_packet(SUBSCRIBE, 0x02, body))
        return await asyncio.wait_for(future, 10.0)

    def _fail_pending(self) -> None:
        self.closed.set()
        self._space.set()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(MqttError("connection lost before PUBACK"))
        self._pending.clear()

    async def _ping_loop(self) -> None:
        while not self.closed.is_set():
            await asyncio.sleep(self.keepalive / 2)
            if self._writer is not None and not self._writer.is_closing():
                self._writer.write(_packet(PINGREQ, 0, b""))

    def can_send(self) -> bool:
        """True when connected and one more QoS 1 publish fits the in-flight window (Receive Maximum)."""
        return not self.closed.is_set() and self._in_flight < self._limit

    def send_nowait(self, topic: str, payload: bytes) -> asyncio.Future[int]:
        """QoS 1 publish without awaiting; call only when ``can_send()``. Returns the PUBACK future."""
        if not self.can_send() or self._writer is None:
            raise MqttError("not connected or in-flight window full")
        encoded_topic = self._topics.get(topic)
        if encoded_topic is None:
            encoded_topic = self._topics[topic] = _str(topic)
        packet_id = next(self._ids)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        future.add_done_callback(self._release)
        self._in_flight += 1
        self._pending[packet_id] = future
        props = b"\x00" if self.version == 5 else b""
        self._writer.write(_packet(PUBLISH, 0x02, encoded_topic + packet_id.to_bytes(2, "big") + props + payload))
        return future

    def _release(self, _: asyncio.Future[int]) -> None:
        self._in_flight -= 1
        self._space.set()

    async def send(self, topic: str, payload: bytes, qos: int = 1) -> asyncio.Future[int] | None:
        """Write a PUBLISH now; for QoS 1 return the future of its PUBACK reason code.

        Waits only while the in-flight window (Receive Maximum) is full.
        """
        if self.closed.is_set() or self._writer is None:
            raise MqttError("not connected")
        if qos == 0:
            props = b"\x00" if self.version == 5 else b""
            self._writer.write(_packet(PUBLISH, 0, _str(topic) + props + payload))
            return None
        while self._in_flight >= self._limit and not self.closed.is_set():
            self._space.clear()
            await self._space.wait()
        return self.send_nowait(topic, payload)

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> int:
        """Publish; for QoS 1 wait for the PUBACK and return its reason code (0 = success)."""
        future = await self.send(topic, payload, qos)
        return 0 if future is None else await future

    async def close(self) -> None:
        if self._writer is not None and not self._writer.is_closing():
            with contextlib.suppress(OSError):
                self._writer.write(_packet(DISCONNECT, 0, b"\x00\x00" if self.version == 5 else b""))
                await self._writer.drain()
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_pending()
