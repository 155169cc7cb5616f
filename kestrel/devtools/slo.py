"""The service level objectives (docs/slo.md, ADR-0024) as Prometheus rules: for each SLO, its error ratio recorded
over the windows the alerts need, and multi-window, multi-burn-rate alerts (the SRE workbook's scheme: a page when
2 % of a 30-day budget burns within an hour or 5 % within six hours, a ticket when 10 % burns within three days),
each linking its runbook. ``render()`` writes ``helm/kestrel/files/prometheus/slo-rules.yaml`` (the chart's
PrometheusRule and a plain Prometheus read the same file); ``promtool test rules`` unit-tests the alerts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import yaml

#: Runbooks are in the repository; an operator who publishes them elsewhere rewrites this prefix.
RUNBOOKS: Final = "docs/runbooks"
WINDOWS: Final = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
#: (severity, long window, short window, burn rate, for): page fast, page slow, ticket.
BURNS: Final = (
    ("page", "1h", "5m", 14.4, "2m"),
    ("page", "6h", "30m", 6.0, "15m"),
    ("ticket", "3d", "6h", 1.0, "1h"),
)


@dataclass(frozen=True)
class Slo:
    name: str  # CamelCase, for the alerts' names
    key: str  # snake_case, for the recorded series
    objective: float  # the fraction of good events
    bad: str  # PromQL over a range ``{w}``: the rate of bad events
    total: str  # the rate of all events
    summary: str
    runbook: str


SLOS: Final = (
    Slo("IngestAvailability", "ingest_availability", 0.999,
        'sum(rate(kestrel_writer_messages_total{outcome="nak"}[{w}]))',
        'sum(rate(kestrel_writer_messages_total{outcome=~"stored|nak"}[{w}]))',
        "Telemetry is failing to reach the database (the writer is retrying)", "ingest.md"),
    Slo("IngestLatency", "ingest_latency", 0.99,
        'sum(rate(kestrel_writer_ingest_latency_seconds_count[{w}]))'
        ' - sum(rate(kestrel_writer_ingest_latency_seconds_bucket{le="2"}[{w}]))',
        'sum(rate(kestrel_writer_ingest_latency_seconds_count[{w}]))',
        "Telemetry takes more than 2 s from the bridge to the database", "ingest.md"),
    Slo("ApiAvailability", "api_availability", 0.999,
        'sum(rate(kestrel_api_requests_total{status_code=~"5.."}[{w}]))',
        'sum(rate(kestrel_api_requests_total[{w}]))',
        "The API answers with server errors", "api.md"),
    Slo("ApiLatency", "api_latency", 0.99,
        'sum(rate(kestrel_api_request_duration_seconds_count{path!~".*/(stream|ws)"}[{w}]))'
        ' - sum(rate(kestrel_api_request_duration_seconds_bucket{le="0.5",path!~".*/(stream|ws)"}[{w}]))',
        'sum(rate(kestrel_api_request_duration_seconds_count{path!~".*/(stream|ws)"}[{w}]))',
        "API requests take more than 0.5 s", "api.md"),
    Slo("CommandSuccess", "command_success", 0.99,
        'sum(rate(kestrel_devicesvc_command_transitions_total{status=~"timed_out|expired"}[{w}]))',
        'sum(rate(kestrel_devicesvc_command_transitions_total{status=~"succeeded|failed|timed_out|expired"}[{w}]))',
        "Commands end without an answer from the device (timed out or expired)", "commands.md"),
    Slo("DeviceConnect", "device_connect", 0.999,
        'sum(rate(kestrel_authsvc_authn_seconds_count{result="error"}[{w}]))',
        'sum(rate(kestrel_authsvc_authn_seconds_count[{w}]))',
        "Devices are refused for want of a decision (authsvc or its database failing)", "authn.md"),
    Slo("AuthnLatency", "authn_latency", 0.99,
        'sum(rate(kestrel_authsvc_authn_seconds_count[{w}]))'
        ' - sum(rate(kestrel_authsvc_authn_seconds_bucket{le="0.1"}[{w}]))',
        'sum(rate(kestrel_authsvc_authn_seconds_count[{w}]))',
        "Broker authentication calls take more than 100 ms", "authn.md"),
)  # fmt: skip


def _ratio(slo: Slo, window: str) -> str:
    bad, total = slo.bad.replace("{w}", window), slo.total.replace("{w}", window)
    # No bad event yet is a ratio of 0, not "no data" (a counter's labelled series appears at its first increment).
    return f"(({bad}) or vector(0)) / clamp_min({total}, 1e-12)"


def _record(slo: Slo, window: str) -> str:
    return f"kestrel:slo_{slo.key}:error_ratio_rate{window}"


def groups() -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = []
    for slo in SLOS:
        records = [{"record": _record(slo, w), "expr": _ratio(slo, w)} for w in WINDOWS]
        budget = round(1 - slo.objective, 6)
        alerts = []
        for severity, long, short, rate, wait in BURNS:
            threshold = round(rate * budget, 6)
            speed = "Fast" if (severity == "page" and long == "1h") else ("Slow" if severity == "page" else "Ticket")
            alerts.append({
                "alert": f"Kestrel{slo.name}Burn{speed}",
                "expr": f"{_record(slo, long)} > {threshold} and {_record(slo, short)} > {threshold}",
                "for": wait,
                "labels": {"severity": severity, "slo": slo.key},
                "annotations": {
                    "summary": f"{slo.summary}: the {slo.objective:.1%} objective's error budget burns {rate}x"
                               f" ({long} and {short} windows)",
                    "runbook_url": f"{RUNBOOKS}/{slo.runbook}",
                },
            })  # fmt: skip
        result.append({"name": f"kestrel-slo-{slo.key.replace('_', '-')}", "rules": records + alerts})
    return result


def render() -> str:
    header = (
        "# Generated by `python -m kestrel.devtools.contracts --write` from kestrel/devtools/slo.py: do not edit.\n"
    )
    return header + yaml.safe_dump({"groups": groups()}, sort_keys=False, width=200)
