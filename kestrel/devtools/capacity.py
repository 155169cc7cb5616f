"""The capacity model (issue 15, item 8; docs/capacity.md): from the per-core costs `make bench` measured and a fleet
(devices, one reading every ``interval_s``, ``retention_days`` of raw readings), the replicas, cores, memory, disk and
network each part needs. ``python -m kestrel.devtools.capacity [DEVICES ...]`` prints the table; the Helm profiles
must cover what it asks for (tests/unit/test_capacity.py).

Every figure says where it comes from: MEASURED (bench/RESULTS.md, a 2-core machine, the load generator on the same
cores, so these are conservative), ANCHOR (a published figure of another system), or ASSUMED (a planning value to be
replaced by a measurement).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Final

#: MEASURED: CPU per stored message, bridge and writer (bench/RESULTS.md, "CPU per stored message": the bridge ~70 us,
#: the writer ~40 us at a fixed 5,000 msg/s; 107 us together).
BRIDGE_US_PER_MSG: Final = 70.0
WRITER_US_PER_MSG: Final = 40.0
#: MEASURED: JetStream alone took 39,000-75,000 msg/s on 2 cores; the lower bound, per core.
JETSTREAM_MSG_PER_CORE: Final = 19_500.0
#: MEASURED: PostgreSQL COPY alone took 51,000-113,000 rows/s on 2 cores; the lower bound, per core.
POSTGRES_ROWS_PER_CORE: Final = 25_500.0
#: MEASURED: authsvc, each device's first connect (3 database lookups): 401-636 decisions/s per process.
AUTHN_FIRST_CONNECTS_PER_PROCESS: Final = 400.0
#: MEASURED: one rule worker evaluated ~11,000 readings/s with one rule (ADR-0019); with 100 rules far fewer.
RULES_READINGS_PER_CORE: Final = 5_000.0
#: ANCHOR: EMQX 5 sustains 100M connections in one cluster and 2M msg/s on one 64-core node (EMQX's own benchmarks).
#: ASSUMED for planning, far below them: 100,000 device connections per 4-core, 8 GiB EMQX node.
CONNECTIONS_PER_BROKER_NODE: Final = 100_000
#: ANCHOR: one ThingsBoard server handles 20,000+ devices and 30,000+ MQTT publishes/s (its data-collection page).
THINGSBOARD_MSG_PER_SERVER: Final = 30_000
#: ASSUMED: bytes per stored reading (3 metrics) with its index, uncompressed; TimescaleDB's compression ratio.
ROW_BYTES: Final = 250
COMPRESSION: Final = 10.0
#: ASSUMED: bytes per message in the TELEMETRY stream (the envelope plus JetStream's headers and index).
STREAM_BYTES: Final = 400
#: ASSUMED: bytes on the wire per device message (TLS record, MQTT header, ~100 B of JSON).
WIRE_BYTES: Final = 250
#: Headroom: CPU at most 50 % busy in steady state (bursts, reconnect storms), and one replica more than needed.
UTILISATION: Final = 0.5
#: A reconnect storm: every device connects again within this many seconds (a broker restart).
STORM_S: Final = 600


@dataclass(frozen=True)
class Fleet:
    devices: int
    interval_s: float = 60.0
    retention_days: int = 30
    #: How long NATS keeps readings after they are stored (KESTREL_TELEMETRY_RETENTION_S).
    stream_retention_s: int = 7 * 86400

    @property
    def msg_per_s(self) -> float:
        return self.devices / self.interval_s


@dataclass(frozen=True)
class Plan:
    fleet: Fleet
    broker_nodes: int
    bridge: int
    writer: int
    authsvc: int
    rules: int
    nats_nodes: int
    nats_disk_gib: float
    postgres_cores: int
    postgres_disk_gib: float
    ingress_mbps: float

    def row(self) -> str:
        f = self.fleet
        return (f"| {f.devices:,} | {f.msg_per_s:,.0f} | {self.broker_nodes} | {self.bridge} | {self.writer} |"
                f" {self.authsvc} | {self.rules} | {self.nats_nodes} | {self.nats_disk_gib:,.0f} |"
                f" {self.postgres_cores} | {self.postgres_disk_gib:,.0f} | {self.ingress_mbps:,.1f} |")  # fmt: skip


def _replicas(load: float, per_replica: float, minimum: int, spare: int) -> int:
    """Replicas for ``load`` at ``UTILISATION``, plus ``spare`` to lose; never fewer than ``minimum``."""
    return max(minimum, math.ceil(load / (per_replica * UTILISATION)) + spare)


def plan(fleet: Fleet) -> Plan:
    rate = fleet.msg_per_s
    ha = fleet.devices > 10_000  # below that, the small profile: one of each, nothing to spare
    minimum, spare = (2, 1) if ha else (1, 0)
    rows_per_day = rate * 86_400
    disk = rows_per_day * fleet.retention_days * ROW_BYTES / COMPRESSION / 2**30
    return Plan(
        fleet=fleet,
        broker_nodes=max(3 if ha else 1, math.ceil(fleet.devices / CONNECTIONS_PER_BROKER_NODE) + spare),
        bridge=_replicas(rate * BRIDGE_US_PER_MSG / 1e6, 1.0, minimum, spare),
        writer=_replicas(rate * WRITER_US_PER_MSG / 1e6, 1.0, minimum, spare),
        authsvc=_replicas(fleet.devices / STORM_S, AUTHN_FIRST_CONNECTS_PER_PROCESS, minimum, spare),
        rules=_replicas(rate, RULES_READINGS_PER_CORE, minimum, spare),
        nats_nodes=3 if ha or rate / JETSTREAM_MSG_PER_CORE > UTILISATION else 1,
        # TELEMETRY and its copy in RULES_IN, kept as long; 25 % for the streams of events, alarms and dead letters
        nats_disk_gib=max(5.0, 2 * rate * STREAM_BYTES * fleet.stream_retention_s / 2**30 * 1.25),
        # ingest's COPY only, doubled for the API, the rule workers' state and devicesvc
        postgres_cores=max(4 if ha else 1, math.ceil(rate / (POSTGRES_ROWS_PER_CORE * UTILISATION)) * 2),
        postgres_disk_gib=max(10.0, disk * 1.5),  # 50 % for indexes of the recent, uncompressed chunks and WAL
        ingress_mbps=rate * WIRE_BYTES * 8 / 1e6,
    )


HEADER: Final = ("| devices | msg/s | EMQX nodes | bridges | writers | authsvc | rule workers | NATS nodes |"
                 " NATS disk (GiB) | PostgreSQL cores | PostgreSQL disk (GiB) | device ingress (Mbit/s) |\n"
                 "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")  # fmt: skip


def stream_retention(devices: int) -> int:
    """What the profiles set (nats.telemetryRetentionS): a week of replay up to 10,000 devices, two days up to
    100,000, one day beyond; what a rule worker or a stream cursor can replay after an outage."""
    return 7 * 86400 if devices <= 10_000 else 2 * 86400 if devices <= 100_000 else 86400


def main(argv: list[str]) -> int:
    sizes = [int(a) for a in argv] or [100, 10_000, 100_000, 500_000]
    print(HEADER)
    for devices in sizes:
        print(plan(Fleet(devices, stream_retention_s=stream_retention(devices))).row())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
