"""The chart's ``generation:`` values (issue 17): off by default, and when on, Triton loads the generator, the
gateway gets its settings, the engine its KV-cache budget, and the autoscaler the KV-cache utilization and TTFT P99
signals; the PrometheusRule carries the generation recording rules. Real ``helm``, real Kubernetes schemas."""

from __future__ import annotations

import os
import subprocess

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError
from prometheus_client import CollectorRegistry

from service.gateway.metrics import GenerationMetrics
from service.gateway.settings import Settings
from tests.unit.test_helm import (
    CHART,
    CRD_KINDS,
    HELM,
    K8S_VERSIONS,
    REPO_ROOT,
    _adapter_rules,
    _helm,
    containers,
    one,
    render,
)


@pytest.fixture(scope="module")
def helm():
    """The helm binary (scripts/get-helm.sh, idempotent), as tests/unit/test_helm.py gets it."""
    subprocess.run(["bash", str(REPO_ROOT / "scripts" / "get-helm.sh")], check=True, timeout=300, capture_output=True)
    return HELM


GENERATION = ["-f", str(CHART / "ci" / "generation-values.yaml")]
TP_PP = ["-f", str(CHART / "ci" / "generation-tp-pp-values.yaml")]
RULES = {
    "namespace_variant:gateway_generate_time_to_first_token_seconds:p99_rate5m",
    "namespace_variant:gateway_generate_inter_token_latency_seconds:p99_rate5m",
    "namespace_pod:gateway_generate_kv_cache_utilization:ratio",
    "namespace_variant:gateway_generate_kv_cache_utilization:ratio",
}


def env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def generation_series() -> set[str]:
    """Every series name the gateway's generation metrics export (after a variant's zero samples)."""
    registry = CollectorRegistry()
    GenerationMetrics(registry).init_variant("fp32", 1)
    return {s.name for family in registry.collect() for s in family.samples}


def rule_groups(objects: list[dict]) -> dict[str, list[str]]:
    rule = one(objects, "PrometheusRule")
    return {g["name"]: [r.get("record") or r.get("alert") for r in g["rules"]] for g in rule["spec"]["groups"]}


@pytest.mark.parametrize("values", [GENERATION, TP_PP], ids=["cpu-keda", "gpu-tp-pp"])
def test_generation_profiles_lint_and_validate(helm, values):
    lint = _helm(helm, "lint", "--strict", str(CHART), *values)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    validated = 0
    for obj in render(helm, *values):
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
                validated += 1
            except SchemaNotFoundError:
                assert obj["kind"] in CRD_KINDS
    assert validated >= 12


def test_generation_is_off_by_default(helm):
    objects = render(helm, "-f", str(CHART / "ci" / "gpu-autoscaling-values.yaml"))
    text = yaml.safe_dump_all(objects)
    assert "generator_" not in text and "GATEWAY_GENERATE" not in text and "LORASERVE_GENERATOR" not in text
    # The recording rules ship with the PrometheusRule either way (they record nothing without generation series).
    assert set(rule_groups(objects)["loraserve.generation.recording"]) == RULES
    metrics = [
        m[m["type"].lower()]["metric"]["name"] for m in one(objects, "HorizontalPodAutoscaler")["spec"]["metrics"]
    ]
    assert not any(name.startswith("gateway_generate") for name in metrics)


def test_generation_values_reach_triton_and_the_gateway(helm, monkeypatch):
    objects = render(helm, *GENERATION)
    c = containers(objects)
    assert "--load-model=generator_fp32" in c["triton"]["args"]
    assert "--load-model=classifier_int8" in c["triton"]["args"]
    assert env(c["triton"])["LORASERVE_GENERATOR_MAX_KV_CACHE_BYTES"] == "536870912"
    assert env(c["triton"])["LORASERVE_GENERATOR_MAX_ACTIVE_SEQUENCES"] == "16"
    gateway_env = {k: v for k, v in env(c["gateway"]).items() if k.startswith("GATEWAY_GENERATE__")}
    assert set(gateway_env) == {f"GATEWAY_GENERATE__{n.upper()}" for n in ("enabled", "model_name_prefix", "variants",
        "default_variant", "max_new_tokens", "max_streams", "request_timeout_seconds")}  # fmt: skip
    # The gateway accepts exactly what the chart sets.
    for name in [n for n in os.environ if n.startswith("GATEWAY_")]:
        monkeypatch.delenv(name)
    for name, value in gateway_env.items():
        monkeypatch.setenv(name, value)
    g = Settings().generate
    assert g.enabled and g.variants == ("fp32",) and g.max_streams == 64 and g.request_timeout_seconds == 120
    # The recording rules, beside the classifier's.
    groups = rule_groups(objects)
    assert set(groups["loraserve.generation.recording"]) == RULES and "loraserve.recording" in groups


def test_autoscaling_signals_query_exported_series(helm):
    families = generation_series()
    so = one(render(helm, *GENERATION), "ScaledObject")
    triggers = {t["name"]: t for t in so["spec"]["triggers"]}
    assert list(triggers)[-2:] == ["gateway_generate_kv_cache_utilization_ratio", "gateway_generate_ttft_p99_seconds"]
    kv = triggers["gateway_generate_kv_cache_utilization_ratio"]["metadata"]
    ttft = triggers["gateway_generate_ttft_p99_seconds"]["metadata"]
    assert float(kv["threshold"]) == 0.7 and float(ttft["threshold"]) == 2.0
    for query, series in [
        (kv["query"], "gateway_generate_kv_cache_bytes"),
        (kv["query"], "gateway_generate_kv_cache_budget_bytes"),
        (ttft["query"], "gateway_generate_time_to_first_token_seconds_bucket"),
    ]:
        assert f"{series}{{" in query and series in families
    hpa = one(render(helm, *TP_PP), "HorizontalPodAutoscaler")["spec"]["metrics"]
    names = [(m["type"], m[m["type"].lower()]["metric"]["name"]) for m in hpa]
    assert names[-2:] == [("Pods", "gateway_generate_kv_cache_utilization_ratio"),
                          ("Object", "gateway_generate_ttft_p99_seconds")]  # fmt: skip
    # prometheus-adapter serves both names (deploy/prometheus-adapter/values.yaml) from series the gateway exports.
    rules = _adapter_rules()
    for kind, name in names[-2:]:
        rule = rules[name]
        series = rule["seriesQuery"].split("{")[0]
        assert series in families and ("pod" if kind == "Pods" else "service") in rule["resources"]["overrides"]
    assert hpa[-2]["pods"]["target"] == {"type": "AverageValue", "averageValue": "700m"}
    assert hpa[-1]["object"]["target"] == {"type": "Value", "value": "1000m"}


def test_tp_pp_profile_requests_one_unit_of_gpus(helm):
    c = containers(render(helm, *TP_PP))
    assert c["triton"]["resources"]["limits"]["nvidia.com/gpu"] in (8, "8")
    assert "--load-model=generator_fp16" in c["triton"]["args"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--set", "gpu.count=4"], "must equal generation.parallelism"),
        (["--set", "gpu.enabled=false"], "set gpu.enabled=true"),
        (["--set", "generation.model.defaultVariant=int4"], "generation.model.defaultVariant"),
        (["--set-json", "generation.autoscaling.kvCacheUtilization=1.5"], "kvCacheUtilization"),
        (["--set", "generation.surprise=1"], "surprise"),
    ],
)
def test_bad_generation_values_fail_to_render(helm, overrides, message):
    result = _helm(helm, "template", "x", str(CHART), *TP_PP, *overrides)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
