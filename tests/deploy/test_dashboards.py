"""The Grafana dashboards (issue 15): every query is valid PromQL (promtool checks them as rules), every metric a
query names is one a Kestrel service exposes or an SLO rule records (so a renamed metric cannot leave a dashboard
silently empty), and the chart ships each as a ConfigMap for Grafana's sidecar."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from api.streams import hub
from authsvc.app import _metrics as authsvc_metrics
from devicesvc.ports import Metrics as DeviceMetrics
from ingest.bridge import BridgeMetrics
from ingest.writer import WriterMetrics
from kestrel.devtools import dashboards, slo
from pki.provisioner import ProvisionerMetrics
from rules.ports import Metrics as RulesMetrics
from tests.deploy.conftest import rendered
from tests.deploy.test_slo_rules import PROMTOOL

#: The API's HTTP metrics come from Litestar's middleware with the prefix kestrel_api (api/app.py).
API_HTTP = {"kestrel_api_requests_total", "kestrel_api_request_duration_seconds_bucket"}


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def exposed() -> set[str]:
    """Every sample name the services' metric classes expose (counters' _total, histograms' _bucket/_count/_sum),
    labelled or not."""
    registry = CollectorRegistry()
    for make in (BridgeMetrics, WriterMetrics, DeviceMetrics, RulesMetrics, ProvisionerMetrics):
        make(registry)
    families = [*registry.collect(), *authsvc_metrics()[0].collect()]
    families += [family for metric in (hub.CLIENTS, hub.QUEUED, hub.LAGGED, hub.FEEDS) for family in metric.collect()]
    return {family.name + suffix for family in families for suffix in SUFFIXES[family.type]} | API_HTTP


def recorded() -> set[str]:
    return {rule["record"] for group in slo.groups() for rule in group["rules"] if "record" in rule}


def names_in(expr: str) -> set[str]:
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*(?=\{|\[|\)|\s|$)", expr))
    return {w for w in words if w.startswith(("kestrel_", "kestrel:"))}


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"dashboard:query:{i}", "expr": expr} for i, expr in enumerate(dashboards.queries())]}]}  # fmt: skip
    (tmp_path / "queries.yaml").write_text(yaml.safe_dump(rules))
    checked = subprocess.run([PROMTOOL, "check", "rules", "queries.yaml"], capture_output=True, text=True,
                             timeout=60, check=False, cwd=tmp_path)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump({"groups": [{"name": "b", "rules": [
        {"record": "x:y", "expr": "sum(rate(kestrel_writer_rows_total[5m])"}]}]}))  # fmt: skip
    control = subprocess.run([PROMTOOL, "check", "rules", "broken.yaml"], capture_output=True, text=True,
                             timeout=60, check=False, cwd=tmp_path)  # fmt: skip
    assert control.returncode != 0  # the check catches a broken query


def test_every_metric_a_dashboard_names_exists() -> None:
    known = exposed() | recorded()
    used = set().union(*(names_in(q) for q in dashboards.queries()))
    assert used and used <= known, sorted(used - known)
    assert "kestrel_writer_ingest_latency_seconds_bucket" in used and "kestrel_rules_late_total" in used
    assert "kestrel_nonexistent_total" not in known  # the control: the set is not everything


def test_the_dashboards_are_well_formed_and_shipped_by_the_chart() -> None:
    for name in dashboards.DASHBOARDS:
        board = dashboards.dashboard(name)
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids)) and all(panel["targets"] for panel in board["panels"])
    maps = [d for d in rendered("default") if d["kind"] == "ConfigMap" and "-dashboard-" in d["metadata"]["name"]]
    assert sorted(m["metadata"]["name"] for m in maps) == sorted(
        f"k-kestrel-dashboard-{n}" for n in dashboards.DASHBOARDS
    )
    assert all(m["metadata"]["labels"]["grafana_dashboard"] == "1" for m in maps)
