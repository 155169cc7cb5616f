"""What the deployment tests share: the chart rendered offline with Helm's Go SDK (helm-python-sdk), per profile."""

from __future__ import annotations

from functools import cache
from typing import Any, Final

import helm_python as helm
import yaml

from tests.conftest import REPO

CHART: Final = REPO / "helm" / "kestrel"
PROFILES: Final = ("default", "small", "ha", "500k")
#: The Kubernetes versions the chart supports (Chart.yaml's kubeVersion and the last releases).
KUBE_VERSIONS: Final = ("1.33.0", "1.34.0", "1.35.0", "1.36.0", "1.37.0")
NAMESPACE: Final = "kestrel"


def profile_values(profile: str) -> dict[str, Any]:
    if profile == "default":
        return {}
    loaded = yaml.safe_load((CHART / f"values-{profile}.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


@cache
def rendered(profile: str, upgrade: bool = False) -> tuple[dict[str, Any], ...]:
    """Every object the chart renders for ``profile`` (install, or upgrade: the hooks differ)."""
    chart = helm.Chart.load(CHART)
    out = chart.render(profile_values(profile), name="k", namespace=NAMESPACE, revision=2 if upgrade else 1,
                       is_install=not upgrade, is_upgrade=upgrade)  # fmt: skip
    return tuple(doc for text in out.values() for doc in yaml.safe_load_all(text) if doc)


def workloads(profile: str) -> list[dict[str, Any]]:
    return [d for d in rendered(profile) if d["kind"] in ("Deployment", "StatefulSet", "Job")]
