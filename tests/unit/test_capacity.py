"""The capacity model (docs/capacity.md) scales as a fleet does, and each Helm profile asks for at least what the
model says its fleet needs (issue 15, item 8)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import yaml

from kestrel.devtools.capacity import Fleet, main, plan, stream_retention
from tests.conftest import REPO

CHART = REPO / "helm" / "kestrel"


def values(profile: str) -> dict[str, Any]:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    override = yaml.safe_load((CHART / f"values-{profile}.yaml").read_text())

    def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
        return {**base, **{k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                           for k, v in top.items()}}  # fmt: skip

    return merge(defaults, override)


def gib(size: str) -> float:
    """``10Gi``, ``2Ti`` (Kubernetes) or ``18G`` (NATS) in GiB."""
    number, unit = float(size.rstrip("GTMiB")), size.lstrip("0123456789.")
    return number * {"Gi": 1, "Ti": 1024, "G": 1, "T": 1024, "M": 1 / 1024}[unit]


def replicas(service: dict[str, Any]) -> int:
    scaling = service.get("autoscaling") or {}
    return int(scaling["minReplicas"]) if scaling.get("enabled") else int(service["replicas"])


@pytest.mark.parametrize(("profile", "devices"), [("small", 10_000), ("ha", 100_000), ("500k", 500_000)])
def test_each_profile_covers_what_the_model_asks_for_its_fleet(profile: str, devices: int) -> None:
    need, have = plan(Fleet(devices, stream_retention_s=stream_retention(devices))), values(profile)
    services = have["services"]
    assert have["emqx"]["replicas"] >= need.broker_nodes
    assert have["nats"]["replicas"] >= need.nats_nodes
    for name in ("bridge", "writer", "authsvc", "rules"):
        assert replicas(services[name]) >= getattr(need, name), (profile, name)
    assert gib(have["database"]["cnpg"]["storage"]["size"]) >= need.postgres_disk_gib, profile
    nats = have["nats"]
    assert int(nats["telemetryRetentionS"]) == stream_retention(devices)
    assert gib(nats["storage"]["size"]) >= need.nats_disk_gib, profile
    assert need.nats_disk_gib / 1.25 <= gib(nats["maxFile"]) < gib(nats["storage"]["size"]), profile  # JetStream's
    # budget holds the streams and fits the volume


def test_the_model_grows_with_the_fleet_and_never_below_one_of_each() -> None:
    sizes = [plan(Fleet(n)) for n in (100, 10_000, 100_000, 500_000, 2_000_000)]
    for small, large in itertools.pairwise(sizes):
        for field in ("broker_nodes", "bridge", "writer", "authsvc", "rules", "postgres_cores"):
            assert getattr(large, field) >= getattr(small, field) >= 1, field
        assert large.postgres_disk_gib >= small.postgres_disk_gib
    assert plan(Fleet(500_000, interval_s=6)).bridge > plan(Fleet(500_000)).bridge  # ten times the rate


def test_the_script_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["100", "500000"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| devices |") and lines[-1].startswith("| 500,000 | 8,333 |")
