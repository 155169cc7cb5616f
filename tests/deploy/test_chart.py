"""The Helm chart (issue 15, ADR-0023), validated offline: strict lint and a render for every profile with Helm's
own Go SDK; every core object against the Kubernetes schemas in strict mode for each supported version; checkov on
the rendered manifests (every skip carries its reason); and the invariants production relies on."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO
from tests.deploy.conftest import CHART, KUBE_VERSIONS, NAMESPACE, PROFILES, profile_values, rendered, workloads

CORE = {"v1", "apps/v1", "batch/v1", "policy/v1", "autoscaling/v2", "networking.k8s.io/v1"}
CHECKOV = REPO / ".venv-checkov" / "bin" / "checkov"


@pytest.mark.parametrize("profile", PROFILES)
def test_the_chart_lints_strictly(profile: str) -> None:
    report = helm.lint(CHART, profile_values(profile), strict=True, namespace=NAMESPACE, kube_version="v1.33.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []  # 1 (info) is "icon is recommended"


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_core_object_passes_the_kubernetes_schema_strictly(profile: str, version: str) -> None:
    core = [d for d in rendered(profile) + rendered(profile, upgrade=True) if d["apiVersion"] in CORE]
    assert len(core) > 40
    for doc in core:
        kubernetes_validate.validate(doc, version, strict=True)


def test_a_broken_object_is_caught_by_the_schema() -> None:
    """The control: the validation rejects what it should (a typo in a container field)."""
    deployment = next(d for d in rendered("default") if d["kind"] == "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSIONS[0], strict=True)


@pytest.mark.parametrize("profile", ["default", "500k"])
def test_checkov_passes_with_every_skip_justified(profile: str, tmp_path: Path) -> None:
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all(rendered(profile) + rendered(profile, upgrade=True)))
    run = subprocess.run(
        [str(CHECKOV), "-f", str(manifest), "--framework", "kubernetes", "--compact", "--skip-download", "-o", "json"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    report = yaml.safe_load(run.stdout)
    summary = report["summary"]
    assert summary["failed"] == 0, [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    assert summary["passed"] > 500 and summary["parsing_errors"] == 0
    assert report["results"]["skipped_checks"], "the justified skips are expected to be seen as skips"
    for skipped in report["results"]["skipped_checks"]:
        assert len(skipped["check_result"].get("suppress_comment", "")) > 20, skipped["check_id"]


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


@pytest.mark.parametrize("profile", PROFILES)
def test_every_container_has_limits_probes_and_a_locked_down_security_context(profile: str) -> None:
    for workload in workloads(profile):
        pod = workload["spec"]["template"]["spec"]
        name = workload["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        for container in _containers(workload):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert container["resources"]["limits"]["cpu"] and container["resources"]["limits"]["memory"], name
            assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"], name
            if workload["kind"] != "Job":  # a Job's container runs to its end: nothing to probe
                assert "livenessProbe" in container and "readinessProbe" in container, name


def _selects(policy: dict[str, Any], labels: dict[str, str]) -> bool:
    wanted = policy["spec"]["podSelector"].get("matchLabels", {})
    return all(labels.get(k) == v for k, v in wanted.items())


@pytest.mark.parametrize("profile", PROFILES)
def test_every_workload_is_covered_by_a_network_policy_and_the_default_denies(profile: str) -> None:
    policies = [d for d in rendered(profile) if d["kind"] == "NetworkPolicy"]
    default = next(p for p in policies if p["metadata"]["name"].endswith("-default-deny"))
    assert default["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in default["spec"] and "egress" not in default["spec"]
    for workload in workloads(profile):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert _selects(default, labels), workload["metadata"]["name"]
        specific = [p for p in policies if p is not default and _selects(p, labels)]
        if workload["kind"] != "Job":
            assert specific, f"{workload['metadata']['name']} has no policy of its own"


def test_the_network_policies_allow_only_the_architectures_flows() -> None:
    """Spot checks of who may talk to whom: devices reach only EMQX's TLS listeners; only backends reach its
    internal listener; the writer never talks to the broker; only the rule workers leave the cluster."""
    policies = {p["metadata"]["name"]: p for p in rendered("default") if p["kind"] == "NetworkPolicy"}
    emqx = policies["k-kestrel-emqx"]["spec"]["ingress"]
    open_to_all = [rule for rule in emqx if "from" not in rule]
    assert [sorted(p["port"] for p in rule["ports"]) for rule in open_to_all] == [[8883, 8884]]
    internal = next(rule for rule in emqx if any(p["port"] == 1883 for p in rule["ports"]))
    components = sorted(peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for peer in internal["from"])
    assert components == ["bridge", "devicesvc", "provisioner", "rules"]
    writer_egress = policies["k-kestrel-writer"]["spec"]["egress"]
    assert not any(p.get("port") in (1883, 8883) for rule in writer_egress for p in rule.get("ports", []))
    leaving = [name for name, p in policies.items()
               if any("ipBlock" in peer for rule in p["spec"].get("egress", []) for peer in rule.get("to", []))]  # fmt: skip
    assert leaving == ["k-kestrel-rules"]
    rules_out = next(peer["ipBlock"] for rule in policies["k-kestrel-rules"]["spec"]["egress"]
                     for peer in rule.get("to", []) if "ipBlock" in peer)  # fmt: skip
    assert "10.0.0.0/8" in rules_out["except"] and "169.254.0.0/16" in rules_out["except"]


def _strings(node: Any, path: str = "") -> list[tuple[str, str]]:
    if isinstance(node, dict):
        return [pair for key, value in node.items() for pair in _strings(value, f"{path}.{key}")]
    if isinstance(node, list):
        return [pair for item in node for pair in _strings(item, path)]
    return [(path, node)] if isinstance(node, str) else []


def test_no_secret_is_a_value_and_every_credential_comes_from_a_secret() -> None:
    """Values name Secrets, never hold what is in them; the chart creates no Secret; every credential a container
    gets comes from a secretKeyRef (or a value composed only of such variables)."""
    for path in [CHART / "values.yaml", *CHART.glob("values-*.yaml")]:
        for where, value in _strings(yaml.safe_load(path.read_text()) or {}):
            leaf = where.rsplit(".", 1)[-1].lower()
            assert not any(word in leaf for word in ("password", "token", "apikey", "passphrase")), (path.name, where)
            assert "-----BEGIN" not in value and len(value) < 120, (path.name, where)
    assert not [d for d in rendered("default") if d["kind"] == "Secret"]  # the chart creates no Secret
    credential = ("PASSWORD", "SECRET", "TOKEN", "KEY", "COOKIE", "PASSPHRASE", "DATABASE_URL")
    checked = 0
    for workload in workloads("default"):
        for container in _containers(workload):
            for env in container.get("env", []):
                if not any(w in env["name"] for w in credential) or env["name"].endswith("_FILE"):  # a path
                    continue
                checked += 1
                if "value" in env:  # composed from secret-backed variables only
                    assert "$(" in env["value"], (workload["metadata"]["name"], env["name"])
                else:
                    assert "secretKeyRef" in env["valueFrom"], (workload["metadata"]["name"], env["name"])
    assert checked > 15


@pytest.mark.parametrize("profile", PROFILES)
def test_stateless_services_scale_on_cpu_and_every_workload_has_a_disruption_budget(profile: str) -> None:
    docs = rendered(profile)
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    for workload in (w for w in workloads(profile) if w["kind"] != "Job"):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert any(all(labels.get(k) == v for k, v in b["spec"]["selector"]["matchLabels"].items())
                   for b in budgets), workload["metadata"]["name"]  # fmt: skip
    scaled = {d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"}
    bridge = next(w for w in workloads(profile) if w["metadata"]["name"] == "k-kestrel-bridge")
    assert bridge["kind"] == "StatefulSet" and bridge["metadata"]["name"] not in scaled  # stable identities
    if profile != "small":
        assert {"k-kestrel-api", "k-kestrel-authsvc", "k-kestrel-writer"} <= scaled


def test_the_clusters_are_three_nodes_in_production_profiles() -> None:
    for profile in ("default", "ha", "500k"):
        docs = rendered(profile)
        emqx = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "k-kestrel-emqx")
        nats = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "k-kestrel-nats")
        cluster = next(d for d in docs if d["kind"] == "Cluster")
        assert emqx["spec"]["replicas"] >= 3 and nats["spec"]["replicas"] == 3 and cluster["spec"]["instances"] == 3
        anti = emqx["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        assert anti["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == "kubernetes.io/hostname"
        env = {e["name"]: e.get("value") for e in emqx["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["EMQX_CLUSTER__DISCOVERY_STRATEGY"] == "dns"
        config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "k-kestrel-nats")
        assert config["data"]["nats.conf"].count("nats://k-kestrel-nats-") == 3
        assert cluster["spec"]["backup"]["barmanObjectStore"]["destinationPath"].startswith("s3://")
        assert any(d["kind"] == "ScheduledBackup" for d in docs)


def test_emqx_runs_the_repositorys_fail_closed_configuration() -> None:
    config = next(
        d for d in rendered("default") if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "k-kestrel-emqx"
    )
    assert config["data"]["emqx.conf"].strip() == (REPO / "broker" / "emqx" / "emqx.conf").read_text().strip()
    emqx = next(
        d for d in rendered("default") if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "k-kestrel-emqx"
    )
    env = {e["name"]: e for e in emqx["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KESTREL_AUTHSVC_URL"]["value"] == "http://k-kestrel-authsvc:8090/mqtt/authn"
    assert "secretKeyRef" in env["KESTREL_AUTHSVC_BROKER_KEY"]["valueFrom"]
    service = next(
        d for d in rendered("default") if d["kind"] == "Service" and d["metadata"]["name"] == "k-kestrel-emqx"
    )
    assert service["spec"]["type"] == "LoadBalancer"
    assert sorted(p["port"] for p in service["spec"]["ports"]) == [8883, 8884]  # TLS passed through, no plain MQTT


def test_migrations_run_as_a_hook_before_upgrades_and_after_the_first_install() -> None:
    """After the first install (the database is one of the release's objects, so it cannot come first) and before
    every upgrade's new pods."""
    for upgrade in (False, True):
        job = next(d for d in rendered("default", upgrade) if d["kind"] == "Job")
        assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,pre-upgrade"
        assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["kestrel", "db", "migrate"]


def test_streams_are_replicated_on_the_nats_cluster() -> None:
    for profile, replicas in (("default", "3"), ("small", "1")):
        for workload in workloads(profile):
            env = {e["name"]: e.get("value") for c in _containers(workload) for e in c.get("env", [])}
            if any(name.endswith("_NATS_URL") for name in env):
                assert env["KESTREL_NATS_REPLICAS"] == replicas, (profile, workload["metadata"]["name"])


def test_the_api_never_gets_the_owners_connection() -> None:
    """The API runs as kestrel_api and kestrel_platform (no table owned, no BYPASSRLS: ADR-0012); the owner's URL,
    which the migrations and the other services use, is not in its pod."""
    api = next(w for w in workloads("default") if w["metadata"]["name"] == "k-kestrel-api")
    env = {e["name"]: e for c in _containers(api) for e in c.get("env", [])}
    assert "KESTREL_DATABASE_URL" not in env
    assert env["KESTREL_API_DATABASE_URL"]["value"].startswith("postgresql://kestrel_api:$(")
    assert env["KESTREL_API_PLATFORM_DATABASE_URL"]["value"].startswith("postgresql://kestrel_platform:$(")


TRACED = {"k-kestrel-bridge", "k-kestrel-writer", "k-kestrel-devicesvc"}


def test_traces_reach_only_the_collector_and_only_when_configured() -> None:
    """With ``tracing.otlpEndpoint`` the bridge, the writer and devicesvc get the endpoint and an egress rule to the collector's
    pods on its port; without it (the default) no pod has either."""
    endpoint = "http://otel-collector.observability.svc:4318/v1/traces"
    chart = helm.Chart.load(CHART)
    out = chart.render({"tracing": {"otlpEndpoint": endpoint, "sampleRatio": 0.01}}, name="k", namespace=NAMESPACE)
    objects = [doc for text in out.values() for doc in yaml.safe_load_all(text) if doc]
    for profile_objects, on in ((objects, True), (list(rendered("default")), False)):
        with_endpoint = set()
        for workload in (o for o in profile_objects if o["kind"] in ("Deployment", "StatefulSet")):
            env = {e["name"]: e.get("value") for c in _containers(workload) for e in c.get("env", [])}
            if env.get("KESTREL_OTLP_ENDPOINT") == endpoint:
                with_endpoint.add(workload["metadata"]["name"])
            assert env.get("KESTREL_OTLP_ENDPOINT") in (endpoint, None), workload["metadata"]["name"]
        assert with_endpoint == (TRACED if on else set())
        for policy in (o for o in profile_objects if o["kind"] == "NetworkPolicy"):
            to_collector = [rule for rule in policy["spec"].get("egress", []) for peer in rule.get("to", [])
                            if peer.get("namespaceSelector", {}).get("matchLabels") ==
                            {"kubernetes.io/metadata.name": "observability"}]  # fmt: skip
            traced = policy["metadata"]["name"] in TRACED and on
            assert [r["ports"] for r in to_collector] == ([[{"protocol": "TCP", "port": 4318}]] if traced else []), (
                policy["metadata"]["name"]
            )
