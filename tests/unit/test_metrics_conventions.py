"""Every gateway metric on /metrics of the real app factory follows the Prometheus conventions, and every metric
name the deploy/ rules, adapter rules and dashboard read is one the gateway really exports.

Also unit tests of the resource sampler: CPU gauges are sampled off the request path, GPU gauges exist only when
NVML reports a GPU (no fake zeros on a CPU machine).
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.gateway.backend.fake import FakeBackend
from service.gateway.errors import BackendError
from service.gateway.metrics import (
    OPERATIONS,
    PROTOCOLS,
    REJECT_REASONS,
    REQUEST_DURATION_BUCKETS_SECONDS,
    GatewayMetrics,
)
from service.gateway.sampler import GpuSample, ResourceSampler
from tests.helpers.gateway import LABELS, SHORT, make_settings, serve

REPO_ROOT = Path(__file__).resolve().parents[2]

#: name (without _total for counters) -> (type, label names). The contract operators and the autoscaler rely on.
EXPECTED = {
    "gateway_requests": ("counter", {"operation", "protocol", "variant", "code"}),
    "gateway_request_duration_seconds": ("histogram", {"operation", "protocol", "variant"}),
    "gateway_queue_wait_seconds": ("histogram", {"variant"}),
    "gateway_batch_size": ("histogram", {"variant"}),
    "gateway_batch_sequence_length": ("histogram", {"variant"}),
    "gateway_tokenize_duration_seconds": ("histogram", {"variant"}),
    "gateway_backend_request_duration_seconds": ("histogram", {"model"}),
    "gateway_backend_errors": ("counter", {"model", "status"}),
    "gateway_queue_depth": ("gauge", {"variant"}),
    "gateway_inflight_batches": ("gauge", {"variant"}),
    "gateway_requests_rejected": ("counter", {"reason"}),
    "gateway_build_info": ("gauge", {"version", "git_sha"}),
    "gateway_service_time_intercept_seconds": ("gauge", {"variant"}),
    "gateway_service_time_per_token_seconds": ("gauge", {"variant"}),
    "gateway_predicted_drain_seconds": ("gauge", {"variant"}),
    "gateway_admission_budget_scale": ("gauge", {"variant"}),
    "gateway_backend_retries": ("counter", {"variant"}),
    "gateway_shadow_comparisons": ("counter", {"primary", "shadow"}),
    "gateway_shadow_agreements": ("counter", {"primary", "shadow"}),
    "gateway_shadow_probability_difference": ("histogram", {"primary", "shadow"}),
    "gateway_process_cpu_utilization_ratio": ("gauge", set()),
    "gateway_host_cpu_utilization_ratio": ("gauge", set()),
}
GPU_EXPECTED = {
    "gateway_gpu_utilization_ratio": ("gauge", {"gpu"}),
    "gateway_gpu_memory_used_bytes": ("gauge", {"gpu"}),
    "gateway_gpu_memory_total_bytes": ("gauge", {"gpu"}),
}
#: Exported only with generation on (GATEWAY_GENERATE__ENABLED; GenerationMetrics in service/gateway/metrics.py;
#: tests/generator/test_gateway.py checks them and their labels).
GENERATION_EXPECTED = {
    "gateway_generate_time_to_first_token_seconds": ("histogram", {"variant"}),
    "gateway_generate_inter_token_latency_seconds": ("histogram", {"variant"}),
    "gateway_generate_tokens_per_second": ("histogram", {"variant"}),
    "gateway_generate_tokens": ("counter", {"variant", "kind"}),
    "gateway_generate_kv_cache_bytes": ("gauge", {"variant"}),
    "gateway_generate_kv_cache_budget_bytes": ("gauge", {"variant"}),
    "gateway_generate_active_sequences": ("gauge", {"variant"}),
    "gateway_generate_kv_cache_evictions": ("counter", {"variant", "reason"}),
}
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


async def _scrape(settings, backend) -> str:
    async with serve(settings, backend) as client:
        assert (await client.post("/v1/classify", json={"text": SHORT})).status_code == 200
        assert (await client.post("/v1/classify", json={"text": SHORT, "variant": "fp16"})).status_code == 200
        assert (await client.post("/v1/classify", json={"text": SHORT, "variant": "nope"})).status_code == 422
        assert (await client.get("/readyz")).status_code == 200
        backend.fail_with = BackendError("boom")
        assert (await client.post("/v1/classify", json={"text": SHORT})).status_code == 502
        backend.fail_with = None
        return (await client.get("/metrics")).text


def check_family(fam, kind: str, labels: set[str]) -> None:
    """Assert one metric family's type, naming and label set against the conventions."""
    name = fam.name
    assert fam.type == kind, f"{name}: type {fam.type}, expected {kind}"
    assert re.fullmatch(r"gateway_[a-z][a-z0-9_]*[a-z0-9]", name) and "__" not in name, name
    assert fam.documentation.strip(), f"{name} has no HELP text"
    parts = name.split("_")
    assert not {"ms", "us", "milliseconds", "microseconds", "percent", "kb", "mb"} & set(parts), name
    if "duration" in parts or "wait" in parts:
        assert name.endswith("_seconds"), name
    if "memory" in parts:
        assert name.endswith("_bytes"), name
    if "utilization" in parts:
        assert name.endswith("_ratio"), name
    if kind == "gauge" and name in ("gateway_queue_depth", "gateway_inflight_batches"):
        assert not name.endswith(("_total", "_seconds", "_bytes")), "gauges of counts carry no unit"
    assert fam.samples, f"{name} has no samples: its series must exist before the first event"
    for s in fam.samples:
        assert s.name.startswith(name)
        suffix = s.name[len(name) :]
        if kind == "counter":
            assert suffix in ("_total", "_created"), s.name
        elif kind == "histogram":
            assert suffix in ("_bucket", "_count", "_sum", "_created"), s.name
        else:
            assert suffix == "", s.name
        got = set(s.labels) - ({"le"} if suffix == "_bucket" else set())
        assert got == labels, f"{s.name}: labels {sorted(got)}, expected {sorted(labels)}"
    if kind == "histogram":
        les = {s.labels["le"] for s in fam.samples if s.name.endswith("_bucket")}
        assert "+Inf" in les, name


async def test_every_gateway_metric_follows_the_conventions(repo):
    backend = FakeBackend(len(LABELS))
    text = await _scrape(make_settings(repo), backend)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # The text format 0.0.4 shows prometheus-client's <counter|histogram>_created timestamps as separate gauges.
    gateway = {
        n: f
        for n, f in families.items()
        if n.startswith("gateway_") and not (n.endswith("_created") and n[: -len("_created")] in EXPECTED)
    }
    assert set(gateway) == set(EXPECTED), "exported metrics differ from the documented set (docs/observability.md)"
    for name, (kind, labels) in EXPECTED.items():
        check_family(gateway[name], kind, labels)
    # Bounded label values.
    for s in families["gateway_requests"].samples:
        assert s.labels["variant"] in {"int8", "fp16", "none"}, s.labels  # the unknown "nope" became "none"
        assert s.labels["operation"] in OPERATIONS and s.labels["protocol"] in PROTOCOLS, s.labels
        assert re.fullmatch(r"\d{3}", s.labels["code"])
    reasons = {s.labels["reason"] for s in families["gateway_requests_rejected"].samples}
    assert reasons == set(REJECT_REASONS)
    statuses = {s.labels["status"] for s in families["gateway_backend_errors"].samples if s.name.endswith("_total")}
    assert statuses == {"backend_error"}
    # Standard process collector: resident memory in bytes, CPU in seconds.
    assert families["process_resident_memory_bytes"].samples[0].value > 10_000_000
    assert families["process_cpu_seconds"].type == "counter"
    # No GPU on this machine (or NVML not importable): the GPU series are absent, not zero.
    if not any(n.startswith("gateway_gpu_") for n in families):
        assert "gateway_gpu_utilization_ratio" not in text


async def test_classify_latency_series_exist_at_zero_for_every_variant_before_traffic(repo):
    # A variant's first burst that fits inside one scrape interval must still give rate() two samples (0, then n):
    # otherwise its P99 recording rule reads "no data" until the second burst.
    async with serve(make_settings(repo)) as client:
        text = (await client.get("/metrics")).text
    fam = {f.name: f for f in text_string_to_metric_families(text)}["gateway_request_duration_seconds"]
    counts = {
        (s.labels["variant"], s.labels["protocol"]): s.value
        for s in fam.samples
        if s.name.endswith("_count") and s.labels["operation"] == "classify"
    }
    assert counts == {(v, p): 0.0 for v in ("int8", "fp16") for p in PROTOCOLS}
    fam = {f.name: f for f in text_string_to_metric_families(text)}["gateway_requests"]
    ok = {
        (s.labels["variant"], s.labels["protocol"]): s.value
        for s in fam.samples
        if s.name.endswith("_total") and s.labels["operation"] == "classify" and s.labels["code"] == "200"
    }
    assert ok == {(v, p): 0.0 for v in ("int8", "fp16") for p in PROTOCOLS}


def test_request_duration_buckets_resolve_p99_between_5ms_and_2s():
    edges = [b for b in REQUEST_DURATION_BUCKETS_SECONDS if 0.005 <= b <= 2.5]
    assert edges[0] == 0.005 and edges[-1] >= 2.0
    # Linear interpolation inside a bucket errs by at most its width: adjacent edges within a factor 2.5.
    assert all(b / a <= 2.5 for a, b in itertools.pairwise(edges)), edges
    assert 0.2 in REQUEST_DURATION_BUCKETS_SECONDS  # the 200 ms SLO is an exact edge: no interpolation at the alert


class _FakeNvml:
    """Stands in for NvmlReader: two GPUs with fixed readings."""

    def __init__(self) -> None:
        self.closed = False

    def read(self) -> list[GpuSample]:
        return [GpuSample("0", 0.25, 4e9, 16e9), GpuSample("1", 0.5, 8e9, 16e9)]

    def close(self) -> None:
        self.closed = True


def test_sampler_exports_gpu_gauges_only_with_a_gpu():
    with_gpu = GatewayMetrics(version="t", git_sha="x")
    fake = _FakeNvml()
    sampler = ResourceSampler(with_gpu, 60.0, gpu_reader=fake)  # type: ignore[arg-type]
    sampler.start()
    try:
        families = {f.name: f for f in text_string_to_metric_families(with_gpu.render()[0].decode())}
    finally:
        sampler.stop()
    assert fake.closed
    for name, (kind, labels) in GPU_EXPECTED.items():
        check_family(families[name], kind, labels)
    util = {s.labels["gpu"]: s.value for s in families["gateway_gpu_utilization_ratio"].samples}
    assert util == {"0": 0.25, "1": 0.5}

    without = GatewayMetrics(version="t", git_sha="x")
    sampler = ResourceSampler(without, 60.0, enable_gpu=False)
    sampler.start()
    sampler.stop()
    text = without.render()[0].decode()
    assert "gateway_gpu_" not in text  # not even HELP/TYPE lines: absent, never a fake 0


def test_sampler_measures_process_cpu_between_samples():
    m = GatewayMetrics(version="t", git_sha="x")
    sampler = ResourceSampler(m, 60.0, enable_gpu=False)
    sampler.sample_once()  # first sample: no interval yet, gauges stay at their initial 0
    total = 0
    for i in range(3_000_000):  # burn some CPU so the process ratio must be positive
        total += i * i
    sampler.sample_once()
    assert total > 0
    assert m.process_cpu_utilization_ratio._value.get() > 0.0
    assert 0.0 <= m.host_cpu_utilization_ratio._value.get() <= 1.0
    with pytest.raises(ValueError, match="interval_seconds"):
        ResourceSampler(m, 0.0)


def _promql_metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b((?:gateway|nv)_[a-z0-9_]+)", expr))
    families = set()
    for n in names:
        for suffix in SUFFIXES:
            if n.endswith(suffix) and not n.startswith("nv_"):
                n = n[: -len(suffix)]
                break
        families.add(n)
    return families


def _deploy_exprs() -> list[str]:
    exprs = []
    for name in ("recording-rules.yml", "alert-rules.yml"):
        for g in yaml.safe_load((REPO_ROOT / "deploy/prometheus" / name).read_text())["groups"]:
            exprs += [r["expr"] for r in g["rules"]]
    adapter = yaml.safe_load((REPO_ROOT / "deploy/prometheus-adapter/values.yaml").read_text())
    for rule in adapter["rules"]["custom"]:
        exprs += [rule["seriesQuery"], rule["metricsQuery"]]
    dashboard = json.loads((REPO_ROOT / "deploy/grafana/loraserve-dashboard.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    return exprs


#: Triton 2.51 metric names we read (docs/observability.md lists them with their meaning).
TRITON_METRICS = {
    "nv_gpu_utilization",
    "nv_gpu_memory_used_bytes",
    "nv_gpu_memory_total_bytes",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_request_success",
}


def test_deploy_rules_and_dashboard_read_only_exported_metrics():
    exported = set(EXPECTED) | set(GPU_EXPECTED) | set(GENERATION_EXPECTED)
    used = set().union(*(_promql_metric_names(e) for e in _deploy_exprs()))
    gateway_used = {n for n in used if n.startswith("gateway_")}
    assert gateway_used - exported == set(), "rules or dashboard read gateway metrics that do not exist"
    assert {n for n in used if n.startswith("nv_")} <= TRITON_METRICS
    # The autoscaling signals are among them.
    assert {"gateway_queue_depth", "gateway_request_duration_seconds"} <= gateway_used


def test_nvml_reader_is_absent_without_a_gpu_and_real_with_one():
    """On a CPU machine NVML must report "no GPU" (None), never a zero reading; on a GPU machine it reads the
    device for real (the same test runs in the GPU check script, where a GPU exists)."""
    from service.gateway.sampler import NvmlReader

    reader = NvmlReader.open()
    if reader is None:
        assert not Path("/dev/nvidiactl").exists() or not _nvml_importable(), "a GPU exists but NVML found none"
        return
    try:
        samples = reader.read()
    finally:
        reader.close()
    assert samples, "NVML listed GPUs but none could be read"
    for s in samples:
        assert 0.0 <= s.utilization_ratio <= 1.0
        assert 0 < s.memory_used_bytes <= s.memory_total_bytes


def _nvml_importable() -> bool:
    try:
        import pynvml  # noqa: F401 - imported to probe availability
    except ImportError:
        return False
    return True
