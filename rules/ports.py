"""What the rule workers' loops share: settings, the database, NATS, the rules catalog, the metrics and the
wake-ups of the outbox and delivery loops."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from psycopg_pool import AsyncConnectionPool

from rules.decide import Catalog
from rules.egress import MqttEgress
from rules.settings import RulesSettings


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.readings = Counter("kestrel_rules_readings", "Readings evaluated", registry=registry)
        self.evaluations = Counter("kestrel_rules_evaluations", "Rule evaluations (rule x reading or tick)",
                                   registry=registry)  # fmt: skip
        self.errors = Counter("kestrel_rules_errors", "Evaluations that could not decide, by reason", ["reason"],
                              registry=registry)  # fmt: skip
        self.effects = Counter("kestrel_rules_effects", "Transitions, actions and deliveries by kind and outcome",
                               ["kind", "outcome"], registry=registry)  # fmt: skip
        self.deadlettered = Counter("kestrel_rules_deadlettered", "Messages dead-lettered, by reason", ["reason"],
                                    registry=registry)  # fmt: skip
        self.late = Counter("kestrel_rules_late", "Readings skipped for a rule and device: not newer than the last one"
                            " evaluated (they came later than the reorder hold)", registry=registry)  # fmt: skip
        self.resumed = Counter("kestrel_rules_resumed", "Partitions resumed after lost deliveries", registry=registry)
        self.partitions = Gauge("kestrel_rules_partitions", "Partitions this worker owns", registry=registry)
        self.batch_seconds = Histogram(
            "kestrel_rules_batch_seconds", "Time to evaluate and commit one batch",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=registry,
        )  # fmt: skip


@dataclass
class Rules:
    """The context every loop is handed."""

    settings: RulesSettings
    database_url: str
    pool: AsyncConnectionPool[Any]
    nc: NATS
    metrics: Metrics
    catalog: Catalog = field(default_factory=Catalog)
    #: The broker, for republish actions with ``to: mqtt``; None without a principal (KESTREL_RULES_MQTT_USERNAME).
    mqtt: MqttEgress | None = None
    outbox_wake: asyncio.Event = field(default_factory=asyncio.Event)
    deliveries_wake: asyncio.Event = field(default_factory=asyncio.Event)
    reload_wake: asyncio.Event = field(default_factory=asyncio.Event)

    def counted(self, kind: str, outcome: str) -> None:
        self.metrics.effects.labels(kind, outcome).inc()
