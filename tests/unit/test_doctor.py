"""The autoscaling doctor against recorded Kubernetes API responses of the real shapes.

The fakes sit at the HTTP layer: the kubernetes client's urllib3 pool manager is replaced by one that answers from
JSON files (tests/unit/data/doctor/: an autoscaling/v2 HPA list rendered from our chart plus a status, an apps/v1
Deployment, a PodList, apiregistration APIServices, the custom metrics discovery APIResourceList, MetricValueLists,
and 404 Status bodies). The client's own request building, auth headers, deserialization and error handling all
run, so a request the real API would not understand gets no answer here either.
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import pytest
import urllib3
from kubernetes import client

from service.doctor.__main__ import main

DATA = Path(__file__).parent / "data" / "doctor"
NS = "loraserve"
CUSTOM = "/apis/custom.metrics.k8s.io/v1beta1"
HEALTHY = {
    f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers": (200, "hpa_list_healthy.json"),
    f"/apis/apps/v1/namespaces/{NS}/deployments/loraserve": (200, "deployment.json"),
    f"/api/v1/namespaces/{NS}/pods": (200, "pods.json"),
    "/apis/apiregistration.k8s.io/v1/apiservices/v1beta1.custom.metrics.k8s.io": (200, "apiservice_custom.json"),
    "/apis/apiregistration.k8s.io/v1/apiservices/v1beta1.external.metrics.k8s.io": (
        404,
        "apiservice_external_notfound.json",
    ),
    CUSTOM: (200, "discovery_custom_full.json"),
    f"{CUSTOM}/namespaces/{NS}/pods/*/gateway_queue_depth": (200, "queue_depth.json"),
    f"{CUSTOM}/namespaces/{NS}/services/loraserve/gateway_request_duration_p99_seconds": (200, "p99.json"),
    f"{CUSTOM}/namespaces/{NS}/pods/*/gpu_utilization_ratio": (200, "gpu.json"),
}


class RecordedApi:
    """A urllib3 pool manager answering GETs from recorded JSON files; anything else is a 404 Status."""

    def __init__(self, routes: dict[str, tuple[int, str]]) -> None:
        self.routes = routes
        self.requests: list[tuple[str, str, dict[str, list[str]], dict[str, str]]] = []

    def request(self, method: str, url: str, **kwargs) -> urllib3.HTTPResponse:
        parsed = urllib.parse.urlsplit(url)
        path = urllib.parse.unquote(parsed.path)
        self.requests.append((method, path, urllib.parse.parse_qs(parsed.query), dict(kwargs.get("headers") or {})))
        status, name = self.routes.get(path, (404, "not_found.json")) if method == "GET" else (405, "not_found.json")
        body = (DATA / name).read_bytes()
        return urllib3.HTTPResponse(
            body=body,
            status=status,
            headers={"Content-Type": "application/json"},
            reason="OK" if status == 200 else "Not Found",
            preload_content=True,
        )

    def query_of(self, path: str) -> dict[str, list[str]]:
        return next(q for _, p, q, _ in self.requests if p == path)


def api_client(routes: dict[str, tuple[int, str]]) -> tuple[client.ApiClient, RecordedApi]:
    cfg = client.Configuration(host="https://k8s.example:6443")
    cfg.api_key = {"authorization": "recorded-token"}
    cfg.api_key_prefix = {"authorization": "Bearer"}
    api = client.ApiClient(cfg)
    recorded = RecordedApi(routes)
    api.rest_client.pool_manager = recorded
    return api, recorded


def run(routes, capsys, *extra: str) -> tuple[int, str, RecordedApi]:
    api, recorded = api_client(routes)
    code = main(["-n", NS, *extra], api_client=api)
    out = capsys.readouterr()
    return code, out.out + out.err, recorded


def test_all_metrics_served(capsys):
    code, out, recorded = run(HEALTHY, capsys)
    assert code == 0, out
    assert out.count("[SERVED  ]") == 3
    assert "gateway_queue_depth  target AverageValue 16000m: 2 value(s), mean 3.5" in out
    assert "gateway_request_duration_p99_seconds  target Value 200m: 1 value(s), mean 0.084" in out
    assert "custom.metrics.k8s.io: available (monitoring/prometheus-adapter)" in out
    assert "external.metrics.k8s.io: missing" in out
    assert "OK: every metric is served" in out
    # It asked as the HPA controller does: pods of the Deployment's selector, by label; HPAs by our labels.
    selector = recorded.query_of(f"{CUSTOM}/namespaces/{NS}/pods/*/gateway_queue_depth")["labelSelector"][0]
    assert selector == "app.kubernetes.io/instance=loraserve,app.kubernetes.io/name=loraserve"
    hpa_query = recorded.query_of(f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers")
    assert hpa_query["labelSelector"] == ["app.kubernetes.io/name=loraserve"]
    assert all(
        {k.lower(): v for k, v in h.items()}["authorization"] == "Bearer recorded-token" for *_, h in recorded.requests
    )


def test_missing_p99_rule_and_empty_gpu_series_stall_scaling(capsys):
    routes = {
        **HEALTHY,
        f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers": (200, "hpa_list_stalled.json"),
        CUSTOM: (200, "discovery_custom_no_p99.json"),
        f"{CUSTOM}/namespaces/{NS}/services/loraserve/gateway_request_duration_p99_seconds": (404, "p99_notfound.json"),
        f"{CUSTOM}/namespaces/{NS}/pods/*/gpu_utilization_ratio": (200, "gpu_empty.json"),
    }
    code, out, _ = run(routes, capsys)
    assert code == 1, out
    assert "[SERVED  ] Pods     gateway_queue_depth" in out
    assert "[MISSING ] Object   gateway_request_duration_p99_seconds" in out
    assert "no adapter rule exposes services/gateway_request_duration_p99_seconds" in out
    assert "the adapter serves: namespaces/gateway_queue_depth" in out and ", pods/gateway_queue_depth," in out
    assert "[EMPTY   ] Pods     gpu_utilization_ratio" in out and "returned no value for pods matching" in out
    assert "ScalingActive=False (FailedGetObjectMetric)" in out
    assert "scaling would stall" in out


def test_unavailable_adapter_makes_every_custom_metric_missing(capsys):
    routes = {
        **HEALTHY,
        "/apis/apiregistration.k8s.io/v1/apiservices/v1beta1.custom.metrics.k8s.io": (
            200,
            "apiservice_custom_unavailable.json",
        ),
    }
    code, out, recorded = run(routes, capsys, "--json")
    assert code == 1
    report = json.loads(out)[0]
    assert report["healthy"] is False
    assert [m["status"] for m in report["metrics"]] == ["missing"] * 3
    assert "FailedDiscoveryCheck" in report["api_services"]["custom.metrics.k8s.io"]
    assert all("no adapter" in m["detail"] for m in report["metrics"])
    # It did not query metrics through an API that is down.
    assert not any(p.startswith(f"{CUSTOM}/namespaces") for _, p, _, _ in recorded.requests)


def test_nan_p99_is_reported_as_invalid(capsys):
    routes = {
        **HEALTHY,
        f"{CUSTOM}/namespaces/{NS}/services/loraserve/gateway_request_duration_p99_seconds": (200, "p99_nan.json"),
    }
    code, out, _ = run(routes, capsys)
    assert code == 1
    assert "[INVALID ] Object   gateway_request_duration_p99_seconds" in out and "NaN" in out


def test_no_hpa_found_exits_2(capsys):
    routes = {**HEALTHY, f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers": (200, "hpa_list_empty.json")}
    code, out, _ = run(routes, capsys)
    assert code == 2 and "no HorizontalPodAutoscaler with labels" in out
    code, out, _ = run(HEALTHY, capsys, "--hpa", "other")
    assert code == 2 and "no HorizontalPodAutoscaler 'other'" in out


def test_help_runs_as_a_module():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "service.doctor", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and "custom.metrics.k8s.io" in result.stdout


@pytest.mark.parametrize("text,value", [("250m", 0.25), ("16", 16.0), ("1k", 1000.0), ("2Ki", 2048.0)])
def test_quantities(text, value):
    from service.doctor.doctor import _quantity

    assert _quantity(text) == pytest.approx(value)
