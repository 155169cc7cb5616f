"""Prometheus (Debian's package), scraping Kestrel's services and evaluating the SLO rules: `make run PROMETHEUS=1`
starts it beside the embedded default (issue 15), and the tests start it to check the rules against live services."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from kestrel.devtools.servers.base import LOOPBACK, ManagedProcess, ServerFailed, ensure_port_free

#: The SLO rules the chart ships (helm/kestrel/files/prometheus/slo-rules.yaml), loaded as they are.
SLO_RULES = Path(__file__).resolve().parents[3] / "helm" / "kestrel" / "files" / "prometheus" / "slo-rules.yaml"


def prometheus_binary() -> Path:
    found = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(found).exists():
        raise ServerFailed("prometheus not found; install Debian's prometheus package (bootstrap.sh does)")
    return Path(found)


@dataclass
class PrometheusServer(ManagedProcess):
    """Scrapes ``targets`` (job name -> loopback ``host:port`` serving /metrics) every ``interval_s``."""

    root: Path = Path()
    port: int = 9090
    targets: dict[str, str] = field(default_factory=dict)
    rule_files: list[Path] = field(default_factory=lambda: [SLO_RULES])
    interval_s: float = 5.0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _duration(self) -> str:
        """Prometheus durations are integers with a unit: 5.0 s is ``5000ms``."""
        return f"{round(self.interval_s * 1000)}ms"

    def config_text(self) -> str:
        """YAML, written as JSON (a subset Prometheus reads)."""
        config = {
            "global": {"scrape_interval": self._duration(), "evaluation_interval": self._duration()},
            "rule_files": [str(path) for path in self.rule_files],
            "scrape_configs": [{"job_name": name, "static_configs": [{"targets": [target]}]}
                               for name, target in sorted(self.targets.items())],
        }  # fmt: skip
        return json.dumps(config, indent=2) + "\n"

    def start(self, timeout: float = 30.0) -> None:
        ensure_port_free("prometheus", self.port)
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "prometheus.yml"
        config.write_text(self.config_text())
        self._spawn([
            str(prometheus_binary()), f"--config.file={config}", f"--storage.tsdb.path={self.root / 'data'}",
            f"--web.listen-address={LOOPBACK}:{self.port}", "--storage.tsdb.retention.time=7d",
        ])  # fmt: skip
        self.wait_http(f"{self.url}/-/ready", timeout, "not ready")
