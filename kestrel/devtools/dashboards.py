"""Grafana dashboards for ingest, the broker's authentication, the API, devices and rules (issue 15), generated from
one table so that every query names a metric a service exposes (tests/deploy/test_dashboards.py checks both that and
the queries' PromQL with promtool). ``render()`` gives ``helm/kestrel/files/grafana/<name>.json``; the chart ships
them as ConfigMaps for Grafana's dashboard sidecar."""

from __future__ import annotations

import json
from typing import Any, Final


def _rate(metric: str, by: str = "", selector: str = "") -> str:
    """``sum [by (...)] (rate(metric{selector}[5m]))``."""
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}{selector}[5m]))"


def _quantile(q: float, histogram: str, by: str = "le", selector: str = "") -> str:
    return f"histogram_quantile({q}, sum by ({by}) (rate({histogram}_bucket{selector}[5m])))"


#: Dashboard -> its panels: (title, unit, [PromQL]).
DASHBOARDS: Final[dict[str, tuple[str, list[tuple[str, str, list[str]]]]]] = {
    "ingest": ("Kestrel / Ingest", [
        ("Messages forwarded by the bridges", "ops",
         [_rate("kestrel_bridge_messages_total", selector='{outcome="forwarded"}')]),
        ("Rejected at the edge, by reason", "ops", [_rate("kestrel_bridge_rejected_total", "reason")]),
        ("Bridge: awaiting JetStream", "short", ["sum(kestrel_bridge_in_flight)"]),
        ("Bridge: JetStream ack p99", "s", [_quantile(0.99, "kestrel_bridge_jetstream_ack_seconds")]),
        ("Writer: messages by outcome", "ops", [_rate("kestrel_writer_messages_total", "outcome")]),
        ("Writer: readings inserted and duplicate", "ops", [_rate("kestrel_writer_rows_total", "outcome")]),
        ("Bridge to database latency p50 / p99", "s", [
            _quantile(0.5, "kestrel_writer_ingest_latency_seconds"),
            _quantile(0.99, "kestrel_writer_ingest_latency_seconds")]),
        ("Dead-lettered by the writer, by reason", "ops", [_rate("kestrel_writer_deadlettered_total", "reason")]),
        ("SLO error ratios (1 h)", "percentunit", ["kestrel:slo_ingest_availability:error_ratio_rate1h",
                                                  "kestrel:slo_ingest_latency:error_ratio_rate1h"]),
    ]),
    "broker": ("Kestrel / Broker authentication", [
        ("Decisions by result", "ops", [_rate("kestrel_authsvc_authn_seconds_count", "result")]),
        ("Decision time p50 / p99", "s", [
            _quantile(0.5, "kestrel_authsvc_authn_seconds"),
            _quantile(0.99, "kestrel_authsvc_authn_seconds")]),
        ("JIT provisioning by outcome", "ops", [_rate("kestrel_provisioner_requests_total", "outcome")]),
        ("SLO error ratios (1 h)", "percentunit", ["kestrel:slo_device_connect:error_ratio_rate1h",
                                                  "kestrel:slo_authn_latency:error_ratio_rate1h"]),
    ]),
    "api": ("Kestrel / API", [
        ("Requests by status", "reqps", [_rate("kestrel_api_requests_total", "status_code")]),
        ("Latency p99 by route", "s", [_quantile(0.99, "kestrel_api_request_duration_seconds", "le, path",
                                                 '{path!~".*/(stream|ws)"}')]),
        ("Open streams and tenants with a feed", "short",
         ["sum(kestrel_api_stream_clients)", "sum(kestrel_api_stream_feeds)"]),
        ("Stream bytes queued", "bytes", ["sum(kestrel_api_stream_queued_bytes)"]),
        ("Streams ended for lagging", "ops", [_rate("kestrel_api_stream_lagged_total")]),
        ("SLO error ratios (1 h)", "percentunit", ["kestrel:slo_api_availability:error_ratio_rate1h",
                                                  "kestrel:slo_api_latency:error_ratio_rate1h"]),
    ]),
    "devices": ("Kestrel / Devices", [
        ("Device messages by kind", "ops", [_rate("kestrel_devicesvc_messages_total", "kind")]),
        ("Command transitions by status", "ops", [_rate("kestrel_devicesvc_command_transitions_total", "status")]),
        ("Published to devices, by kind", "ops", [_rate("kestrel_devicesvc_published_total", "kind")]),
        ("Rejected device messages, by reason", "ops", [_rate("kestrel_devicesvc_rejected_total", "reason")]),
        ("Retried after a passing failure", "ops", [_rate("kestrel_devicesvc_retries_total")]),
        ("Handling time p99", "s", [_quantile(0.99, "kestrel_devicesvc_handle_seconds")]),
        ("SLO error ratio: commands (1 h)", "percentunit", ["kestrel:slo_command_success:error_ratio_rate1h"]),
    ]),
    "rules": ("Kestrel / Rules", [
        ("Readings and evaluations", "ops", [_rate("kestrel_rules_readings_total"),
                                             _rate("kestrel_rules_evaluations_total")]),
        ("Transitions, actions and deliveries", "ops", [_rate("kestrel_rules_effects_total", "kind, outcome")]),
        ("Could not decide, by reason", "ops", [_rate("kestrel_rules_errors_total", "reason")]),
        ("Late readings skipped", "ops", [_rate("kestrel_rules_late_total")]),
        ("Partitions owned per worker", "short", ["kestrel_rules_partitions"]),
        ("Batch time p99", "s", [_quantile(0.99, "kestrel_rules_batch_seconds")]),
        ("Resumed after lost deliveries", "ops", [_rate("kestrel_rules_resumed_total")]),
    ]),
}  # fmt: skip


def dashboard(name: str) -> dict[str, Any]:
    title, panels = DASHBOARDS[name]
    return {
        "uid": f"kestrel-{name}",
        "title": title,
        "tags": ["kestrel"],
        "timezone": "utc",
        "schemaVersion": 39,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Data source"}]},
        "panels": [
            {
                "id": number + 1,
                "type": "timeseries",
                "title": panel_title,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 12, "x": 12 * (number % 2), "y": 8 * (number // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [{"refId": chr(ord("A") + i), "expr": expr, "datasource": {"type": "prometheus",
                                                                                      "uid": "${datasource}"}}
                            for i, expr in enumerate(queries)],
            }
            for number, (panel_title, unit, queries) in enumerate(panels)
        ],
    }  # fmt: skip


def queries() -> list[str]:
    return [q for _, panels in DASHBOARDS.values() for _, _, exprs in panels for q in exprs]


def render() -> dict[str, str]:
    """File name -> JSON text."""
    return {f"kestrel-{name}.json": json.dumps(dashboard(name), indent=2) + "\n" for name in DASHBOARDS}
