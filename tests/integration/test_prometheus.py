"""A real Prometheus (Debian's) scraping a service's metrics with the chart's SLO rules loaded, as `make run
PROMETHEUS=1` runs it: the target is up, every SLO group loads, and a recorded error ratio equals what the service
counted (1 NAK in 10 messages: 0.1)."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, start_http_server

from ingest.writer import WriterMetrics
from kestrel.devtools import slo
from kestrel.devtools.servers import PrometheusServer, free_port
from tests.conftest import wait_until

pytestmark = pytest.mark.integration


def query(server: PrometheusServer, expr: str) -> list[dict[str, object]]:
    url = f"{server.url}/api/v1/query?query={urllib.parse.quote(expr)}"
    with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310 - loopback, our own server
        result: list[dict[str, object]] = json.load(answer)["data"]["result"]
    return result


def test_prometheus_scrapes_a_service_and_evaluates_the_slo_rules(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    writer = WriterMetrics(registry)
    port = free_port()
    start_http_server(port, "127.0.0.1", registry=registry)
    server = PrometheusServer(name="prometheus", log_path=tmp_path / "prometheus.log", root=tmp_path / "prom",
                              port=free_port(), targets={"writer": f"127.0.0.1:{port}"}, interval_s=1)  # fmt: skip
    server.start()
    try:

        def feed() -> bool:
            writer.messages.labels("stored").inc(9)
            writer.messages.labels("nak").inc(1)
            ratio = query(server, "kestrel:slo_ingest_availability:error_ratio_rate5m")
            return bool(ratio) and abs(float(ratio[0]["value"][1]) - 0.1) < 1e-9  # type: ignore[index]

        assert wait_until(lambda: query(server, 'up{job="writer"}') != [], 30)
        assert query(server, 'up{job="writer"}')[0]["value"][1] == "1"  # type: ignore[index]
        assert wait_until(feed, 30, interval=0.5), query(server, "kestrel:slo_ingest_availability:error_ratio_rate5m")
        with urllib.request.urlopen(f"{server.url}/api/v1/rules", timeout=5) as answer:  # noqa: S310
            groups = json.load(answer)["data"]["groups"]
        assert {g["name"] for g in groups} == {group["name"] for group in slo.groups()}
        assert all(rule["health"] == "ok" for g in groups for rule in g["rules"] if "health" in rule)
    finally:
        server.stop()
