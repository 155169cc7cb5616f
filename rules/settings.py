"""``KESTREL_RULES_*``: the rule workers' settings."""

from __future__ import annotations

import msgspec

from kestrel_core.settings import MqttSettings, Secret


class RulesSettings(MqttSettings, frozen=True, kw_only=True):
    """``KESTREL_RULES_*``; the database comes from ``KESTREL_DATABASE_URL``. The broker (``KESTREL_RULES_MQTT_*``,
    the ``rules`` principal) carries republish actions with ``to: mqtt``; without ``KESTREL_RULES_MQTT_USERNAME`` the
    workers do not connect and such actions fail (counted ``failed``, logged)."""

    #: NATS JetStream (the telemetry is sourced into the partitioned stream RULES_IN).
    nats_url: str = "nats://127.0.0.1:4222"
    #: This worker's name in logs and metrics.
    worker: str = "rules-1"
    #: Partitions of the device space; fixed for a deployment (changing it re-partitions the stream, ADR-0019).
    partitions: int = 16
    #: Most readings one partition evaluates in one transaction.
    batch_size: int = 500
    #: A caught-up partition waits at most this long for more readings before it evaluates what it has (latency).
    fetch_wait_s: float = 0.5
    #: How long a partition holds what it fetched, for readings that overtook older ones on the way (two bridges, a
    #: resend after a NATS restart), before it evaluates each device's readings in time order. A reading that comes
    #: later than that behind a newer one of the same device is skipped for the rules and counted
    #: (``kestrel_rules_late_total``); it is stored all the same. The added alarm latency is at most this (ms).
    reorder_ms: int = 100
    #: How often partitions are rebalanced between the live workers.
    rebalance_interval_s: float = 2.0
    #: Rules are re-read this often even without a change notification.
    reload_interval_s: float = 30.0
    #: Notification deliveries in flight at once (each independently; a hanging receiver holds one).
    delivery_concurrency: int = 64
    #: A delivery is dead after this many attempts.
    delivery_attempts: int = 8
    #: First retry after this long; doubles with each attempt (jittered), up to the cap.
    delivery_backoff_s: float = 1.0
    #: The longest wait between two attempts.
    delivery_backoff_cap_s: float = 300.0
    #: Notifications past a channel's rate are folded into one digest per channel and window of this many seconds.
    digest_window_s: int = 60
    #: One webhook or mail attempt gives up after this long.
    delivery_timeout_s: float = 5.0
    #: Webhooks to loopback, private and link-local addresses are refused unless this is set (SSRF protection).
    webhook_allow_private: bool = False
    #: SMTP relay for email channels; empty: email deliveries fail (smtp_not_configured) and are dead-lettered.
    smtp_host: str = ""
    #: Its port.
    smtp_port: int = 587
    #: Upgrade the connection with STARTTLS before authenticating (required when a username is set).
    smtp_starttls: bool = True
    #: CA bundle that signs the relay's certificate (a private CA); empty: the system's.
    smtp_ca_file: str = ""
    #: Login, if the relay needs one.
    smtp_username: str = ""
    #: Its password.
    smtp_password: Secret = msgspec.field(default_factory=lambda: Secret(""))
    #: The sender address.
    smtp_from: str = "kestrel@localhost"
    #: Prometheus metrics (/metrics) listen here; port 0 turns them off.
    metrics_host: str = "127.0.0.1"
    #: 0: no metrics endpoint.
    metrics_port: int = 9105
