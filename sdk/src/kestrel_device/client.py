"""The Kestrel device SDK (ADR-0013): telemetry, shadow sync, commands and just-in-time provisioning over MQTT.

Usable by real devices and gateways (asyncio, gmqtt) and used by the simulator and the tests::

    device = DeviceClient("acme", "pump-7", host, 8883, ssl=context)   # certificate, or jwt="..."
    device.on_command("reboot", reboot)                                 # async (params) -> result
    device.on_desired(apply)                                            # (shadow name, {version, desired, delta})
    await device.connect()
    await device.report({"fw": "1.2"})
    await device.send_telemetry({"temp": 21.5})

Commands are answered first with ``delivered``, then with ``succeeded`` (the handler's return value) or ``failed``
(its exception). Request ids already executed are answered again from memory and never run twice, so the
platform's retries after a lost acknowledgement are harmless. The device publishes ``online`` on its retained
status topic and leaves ``offline`` as its Last Will with a Will Delay, so short drops do not flap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import gmqtt
import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kestrel_core.messages.telemetry import Reading
from kestrel_core.messages.twin import (
    MAX_ERROR_CHARS,
    CommandRequest,
    CommandResponse,
    DesiredDocument,
    ProvisionDenied,
    ProvisionGranted,
    ProvisionRequest,
    ProvisionResponse,
    ReportedState,
    StatusReport,
)
from kestrel_core.topics import (
    PROVISION_CLIENT_PREFIX,
    command_response_topic,
    device_base,
    provision_topics,
    reported_topic,
    status_topic,
    telemetry_topic,
)

log = logging.getLogger("kestrel_device.client")

#: gmqtt reconnects while ``failed_connections <= reconnect_retries`` (so 0 still allows one attempt); -1 is
#: unlimited. Below -1 means never: the caller decides when to connect again (``kestrel agent`` does, and stops
#: when the broker refuses the device for good).
NO_RECONNECT = -2

CommandHandler = Callable[[dict[str, Any]], Awaitable[Any]]
DesiredHandler = Callable[[str, dict[str, Any]], Any]
DELIVERED = CommandResponse("delivered")
EXPIRED_ON_ARRIVAL = CommandResponse("failed", error="expired before it arrived; not run")
ONLINE: bytes = msgspec.json.encode(StatusReport("online"))
OFFLINE: bytes = msgspec.json.encode(StatusReport("offline"))
_desired = msgspec.json.Decoder(DesiredDocument)
_command = msgspec.json.Decoder(CommandRequest)
_provisioned: msgspec.json.Decoder[ProvisionGranted | ProvisionDenied] = msgspec.json.Decoder(ProvisionResponse)


class ProvisioningRefused(Exception):
    """The provisioner answered with an error (``error`` is its stable reason)."""

    def __init__(self, error: str, detail: str) -> None:
        super().__init__(f"{error}: {detail}")
        self.error = error
        self.detail = detail


class DeviceClient:
    def __init__(
        self,
        tenant: str,
        device: str,
        host: str,
        port: int,
        *,
        ssl: ssl.SSLContext | None = None,
        jwt: str | None = None,
        protocol: int = 5,
        will_delay_s: int = 30,
        session_expiry_s: int = 3600,
        remembered: int = 1000,
    ) -> None:
        self.tenant, self.device, self.host, self.port = tenant, device, host, port
        self.ssl, self.jwt, self.protocol = ssl, jwt, protocol
        self.will_delay_s, self.session_expiry_s = will_delay_s, session_expiry_s
        self.seq = 0
        self.base = device_base(tenant, device)
        self.desired: dict[str, dict[str, Any]] = {}
        self.executed: OrderedDict[str, CommandResponse] = OrderedDict()  # request id -> final answer
        self.remembered = remembered
        self.running: set[str] = set()
        self.commands: dict[str, CommandHandler] = {}
        self.desired_handlers: list[DesiredHandler] = []
        self.subscribed = asyncio.Event()
        self.desired_changed = asyncio.Event()
        self.client: gmqtt.Client | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # ----------------------------------------------------------------------------------- connection

    def on_command(self, name: str, handler: CommandHandler) -> None:
        self.commands[name] = handler

    def on_desired(self, handler: DesiredHandler) -> None:
        self.desired_handlers.append(handler)

    async def connect(self, wait_s: float = 10.0) -> None:
        will = gmqtt.Message(
            status_topic(self.tenant, self.device),
            OFFLINE,
            qos=1,
            retain=True,
            **({"will_delay_interval": self.will_delay_s} if self.protocol == 5 else {}),
        )
        client = gmqtt.Client(
            self.device,
            clean_session=False,
            session_expiry_interval=self.session_expiry_s if self.protocol == 5 else None,
            will_message=will,
        )
        client.set_config({"reconnect_retries": NO_RECONNECT})  # the caller decides when to connect again
        if self.jwt:
            client.set_auth_credentials(self.device, self.jwt)
        client.on_message = self._on_message
        client.on_subscribe = lambda *_: self.subscribed.set()
        self.client = client
        self.subscribed.clear()
        version = gmqtt.constants.MQTTv50 if self.protocol == 5 else gmqtt.constants.MQTTv311
        await asyncio.wait_for(
            client.connect(self.host, self.port, ssl=self.ssl or False, keepalive=30, version=version), wait_s
        )
        client.subscribe(
            [
                gmqtt.Subscription(f"{self.base}/cmd/+", qos=1),
                gmqtt.Subscription(f"{self.base}/state/desired", qos=1),
                gmqtt.Subscription(f"{self.base}/state/desired/+", qos=1),
            ]
        )
        await asyncio.wait_for(self.subscribed.wait(), wait_s)
        client.publish(status_topic(self.tenant, self.device), ONLINE, qos=1, retain=True)

    async def disconnect(self) -> None:
        """Leave on purpose: say ``offline`` on the status topic, then a clean DISCONNECT (the broker discards the
        will), so the platform shows the device offline at once instead of after its grace period."""
        if self.client is not None:
            if self.client.is_connected:
                self.client.publish(status_topic(self.tenant, self.device), b'{"status":"offline"}', qos=1, retain=True)
            # The broker may close the TLS session first, right after our DISCONNECT: that is the goodbye done.
            with contextlib.suppress(ssl.SSLError, OSError):
                await self.client.disconnect()
        for task in list(self._tasks):
            task.cancel()

    def drop(self) -> None:
        """Lose the connection without a DISCONNECT (power cut, radio loss): the broker will send the will."""
        if self.client is not None:

            async def stay_down(*_: Any, **__: Any) -> None:
                return None

            self.client._package_handler._reconnect_callback = stay_down  # noqa: SLF001 - this link stays dead
            self.client._connection._transport.abort()  # noqa: SLF001 - simulate a dead link

    # ------------------------------------------------------------------------------------ telemetry

    async def send_telemetry(self, metrics: dict[str, Any], *, ts: int | None = None, stream: str = "") -> None:
        """One reading (ADR-0005): the device's time and a sequence number, so it is stored exactly once."""
        assert self.client is not None
        self.seq += 1
        body = Reading(ts=ts if ts is not None else time.time_ns() // 1_000_000, seq=self.seq, metrics=metrics)
        self.client.publish(telemetry_topic(self.tenant, self.device, stream).mqtt, msgspec.json.encode(body), qos=1)

    # --------------------------------------------------------------------------------------- shadow

    async def report(self, state: dict[str, Any], *, shadow: str = "", ts: int | None = None) -> None:
        """Publish a reported-state merge patch, stamped with the device's time so reordering never regresses."""
        assert self.client is not None
        body = ReportedState(state=state, ts=ts if ts is not None else time.time_ns() // 1_000_000)
        self.client.publish(reported_topic(self.tenant, self.device, shadow), msgspec.json.encode(body), qos=1)

    async def wait_desired(
        self, predicate: Callable[[dict[str, Any]], bool], shadow: str = "", wait_s: float = 10.0
    ) -> dict[str, Any]:
        """Wait until the retained desired document of ``shadow`` satisfies ``predicate``; return it."""
        deadline = time.monotonic() + wait_s
        while True:
            doc = self.desired.get(shadow)
            if doc is not None and predicate(doc):
                return doc
            self.desired_changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"desired state of {self.device} did not arrive")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.desired_changed.wait(), left)

    # ------------------------------------------------------------------------------------- messages

    def _on_message(self, client: Any, topic: str, payload: bytes, qos: int, properties: Any) -> int:
        tail = topic[len(self.base) + 1 :].split("/")
        if tail[:2] == ["state", "desired"]:
            name = tail[2] if len(tail) == 3 else ""
            if payload:
                try:
                    doc = msgspec.structs.asdict(_desired.decode(payload))
                except (msgspec.DecodeError, RecursionError):
                    log.warning("unreadable desired state ignored", extra={"shadow": name})
                    return 0
                current = self.desired.get(name)
                if current is None or doc["version"] >= current["version"]:
                    self.desired[name] = doc
                    for handler in self.desired_handlers:
                        handler(name, doc)
                self.desired_changed.set()
        elif tail[0] == "cmd" and len(tail) == 2:
            self._spawn(self._command(tail[1], payload, properties or {}))
        return 0

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _publish_response(self, topic: str, body: CommandResponse, correlation: bytes | None) -> None:
        """Send one command answer (a test may override this to lose answers)."""
        assert self.client is not None
        extra = {"correlation_data": correlation} if correlation is not None and self.protocol == 5 else {}
        self.client.publish(topic, msgspec.json.encode(body), qos=1, **extra)

    async def _command(self, name: str, payload: bytes, properties: dict[str, Any]) -> None:
        try:
            request = _command.decode(payload)
        except (msgspec.DecodeError, RecursionError):
            log.warning("unreadable command ignored", extra={"command": name})
            return
        request_id = request.request_id
        response_topic = _first(properties, "response_topic") or command_response_topic(
            self.tenant, self.device, request_id
        )
        correlation = _first(properties, "correlation_data")
        correlation = bytes(correlation) if correlation is not None else None
        if request_id in self.executed:  # a retry after a lost answer: answer again, never run again
            self._publish_response(response_topic, self.executed[request_id], correlation)
            return
        if request_id in self.running:
            self._publish_response(response_topic, DELIVERED, correlation)
            return
        if request.answer_only:  # it ran before this client's memory (a restart): running it again could do harm
            log.warning("asked to answer a command this device does not remember; not run", extra={"command": name})
            return
        if request.expires_at is not None and request.expires_at < time.time_ns() // 1_000_000:
            # The broker's message expiry counts whole seconds (Mosquitto's clock has second resolution), so a
            # command can arrive a moment after the platform gave up on it: never run it then.
            self._publish_response(response_topic, EXPIRED_ON_ARRIVAL, correlation)
            return
        self.running.add(request_id)
        self._publish_response(response_topic, DELIVERED, correlation)
        handler = self.commands.get(name)
        answer = CommandResponse("failed", error=f"no handler for command {name}")
        if handler is not None:
            try:
                answer = CommandResponse("succeeded", result=await handler(request.params))
            except Exception as exc:  # noqa: BLE001 - any failure of the handler is the command's failure
                answer = CommandResponse("failed", error=f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS])
        self.running.discard(request_id)
        self.executed[request_id] = answer
        while len(self.executed) > self.remembered:
            self.executed.popitem(last=False)
        self._publish_response(response_topic, answer, correlation)


def _first(properties: dict[str, Any], name: str) -> Any:
    value = properties.get(name)
    return value[0] if isinstance(value, list) and value else value


def new_device_key(device: str) -> tuple[bytes, bytes]:
    """A fresh EC P-256 key (PEM, never leaves the device) and a CSR naming ``device`` (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


async def provision(
    tenant: str,
    claim_token: str,
    device: str,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    csr_pem: bytes,
    wait_s: float = 15.0,
) -> ProvisionGranted:
    """Just-in-time provisioning: connect with the claim as ``prov:{device}``, send the CSR, return the answer
    (``certificate``, ``chain``, ``root``). Raises ``ProvisioningRefused`` with the provisioner's reason."""
    claim_id = claim_token.split("_")[1]
    request_topic, response_topic = provision_topics(tenant, claim_id, device)
    answer: asyncio.Future[ProvisionGranted | ProvisionDenied] = asyncio.get_running_loop().create_future()
    subscribed = asyncio.Event()
    client = gmqtt.Client(f"{PROVISION_CLIENT_PREFIX}{device}", clean_session=True)
    client.set_config({"reconnect_retries": NO_RECONNECT})
    client.set_auth_credentials("claim", claim_token)

    def on_message(c: Any, topic: str, payload: bytes, qos: int, properties: Any) -> int:
        if not answer.done():
            try:
                answer.set_result(_provisioned.decode(payload))
            except (msgspec.DecodeError, RecursionError) as exc:
                answer.set_exception(ProvisioningRefused("bad_response", f"unreadable provisioning answer: {exc}"))
        return 0

    client.on_message = on_message
    client.on_subscribe = lambda *_: subscribed.set()
    await asyncio.wait_for(client.connect(host, port, ssl=ssl_context, version=gmqtt.constants.MQTTv50), wait_s)
    try:
        client.subscribe(response_topic, qos=1)
        await asyncio.wait_for(subscribed.wait(), wait_s)
        client.publish(request_topic, msgspec.json.encode(ProvisionRequest(csr_pem.decode())), qos=1)
        result = await asyncio.wait_for(answer, wait_s)
    finally:
        await client.disconnect()
    if isinstance(result, ProvisionDenied):
        raise ProvisioningRefused(result.error, result.detail)
    return result
