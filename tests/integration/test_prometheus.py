"""A real Prometheus (Debian's) scraping a service's metrics with the chart's SLO rules loaded, as `make run
PROMETHEUS=1` runs it: the target is up, every SLO group loads, and a recorded error ratio equals what the service
counted (1 NAK in 10 messages: 0.1)."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, start_http_server

from devicesvc.ports import Metrics as DeviceMetrics
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
    devices = DeviceMetrics(registry)
    port = free_port()
    start_http_server(port, "127.0.0.1", registry=registry)
    server = PrometheusServer(name="prometheus", log_path=tmp_path / "prometheus.log", root=tmp_path / "prom",
                              port=free_port(), targets={"writer": f"127.0.0.1:{port}"}, interval_s=1.0)  # fmt: skip
    server.start()
    try:

        def feed() -> bool:
            writer.messages.labels("stored").inc(9)
            writer.messages.labels("nak").inc(1)
            devices.commands.labels("succeeded").inc()  # no command timed out: a ratio of 0, not "no data"
            ratio = query(server, "kestrel:slo_ingest_availability:error_ratio_rate5m")
            return bool(ratio) and abs(float(ratio[0]["value"][1]) - 0.1) < 1e-9  # type: ignore[index]

        assert wait_until(lambda: query(server, 'up{job="writer"}') != [], 30)
        assert query(server, 'up{job="writer"}')[0]["value"][1] == "1"  # type: ignore[index]
        assert wait_until(feed, 30, interval=0.5), query(server, "kestrel:slo_ingest_availability:error_ratio_rate5m")
        # Each rule group evaluates on its own schedule: wait for the commands' group too.
        command_ratio = "kestrel:slo_command_success:error_ratio_rate5m"
        assert wait_until(lambda: query(server, command_ratio) != [], 30), "no command ratio: 'no data', not 0"
        assert float(query(server, command_ratio)[0]["value"][1]) == 0.0  # type: ignore[index]
        with urllib.request.urlopen(f"{server.url}/api/v1/rules", timeout=5) as answer:  # noqa: S310
            groups = json.load(answer)["data"]["groups"]
        assert {g["name"] for g in groups} == {group["name"] for group in slo.groups()}
        assert all(rule["health"] == "ok" for g in groups for rule in g["rules"] if "health" in rule)
    finally:
        server.stop()


def test_the_configuration_is_one_prometheus_accepts_whatever_the_interval(tmp_path: Path) -> None:
    """``make run PROMETHEUS=1`` once failed on its default: a 5.0 s interval written as "5.0s"."""
    for interval in (5.0, 0.5, 15):
        server = PrometheusServer(name="p", log_path=tmp_path / "p.log", root=tmp_path, interval_s=interval)
        (tmp_path / "prometheus.yml").write_text(server.config_text())
        checked = subprocess.run(["promtool", "check", "config", "--syntax-only", str(tmp_path / "prometheus.yml")],
                                 capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
        assert checked.returncode == 0, checked.stdout + checked.stderr
