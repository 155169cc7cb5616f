"""``KESTREL_DEVICES_*``: devicesvc's settings."""

from __future__ import annotations

from kestrel_core.settings import MqttSettings
from kestrel_core.topics import DEVICES_SHARE_GROUP


class DeviceSettings(MqttSettings, frozen=True, kw_only=True):
    """``KESTREL_DEVICES_*``."""

    #: ``svc:{mqtt_username}:{instance}`` (ADR-0010).
    client_id: str = "svc:devicesvc:1"
    #: Shared subscription group: replicas in the same group split the device messages.
    share_group: str = DEVICES_SHARE_GROUP
    #: NATS JetStream, for twin events and dead letters.
    nats_url: str = "nats://127.0.0.1:4222"
    #: A device that disconnected without a clean DISCONNECT shows offline after this long, unless it returns.
    presence_grace_s: float = 30.0
    #: Shadow changes, ended connections and finished commands (with their events) older than this are deleted.
    history_days: int = 30
    #: How often the history is pruned (also once at start).
    prune_interval_s: float = 3600.0
    #: How often deadlines, presence grace, command events and retention are checked.
    scan_interval_s: float = 0.5
    #: First retry of an unacknowledged command after this long; doubles with each attempt.
    retry_base_s: float = 1.0
    #: Device messages are handled by this many workers, each device always by the same one (in order).
    workers: int = 8
    #: Most messages one worker takes at once; reported states among them share one transaction.
    batch: int = 200
    #: Larger device messages are dead-lettered (payload_too_large).
    max_payload_bytes: int = 64 * 1024
    #: The broker's maximum packet size when its CONNACK does not say (Mosquitto and EMQX both default to 1 MiB here).
    max_packet_bytes: int = 1024 * 1024
    #: Fairness of command dispatch: at most this many commands of one device, and of one tenant, per round.
    per_device: int = 10
    #: At most this many commands of one tenant per dispatch round.
    per_tenant: int = 100
    #: Prometheus metrics (/metrics) listen here; port 0 turns them off.
    metrics_host: str = "127.0.0.1"
    #: 0: no metrics endpoint.
    metrics_port: int = 9103
