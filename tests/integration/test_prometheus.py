"""A real Prometheus scrapes a real gateway process and a real tritonserver while bounded traffic flows, evaluates the
recording rules from deploy/prometheus, and serves the recorded P99 and queue depth through its HTTP API. The
prometheus-adapter queries of deploy/prometheus-adapter are run against the same Prometheus, as the adapter would.

Prometheus comes from Debian's ``prometheus`` package; it is started by hand on 127.0.0.1 with a scratch config and a
temporary storage directory and stopped by PID. Missing outside CI: skipped; missing in CI: failure.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request

import httpx
import pytest
import yaml

from tests.helpers.gateway_process import REPO_ROOT, GatewayProcess
from tests.helpers.prometheus import QUESTIONS, TARGET_LABELS, PrometheusProcess, get_json, prometheus_binary

pytestmark = pytest.mark.integration

GRPC_LINE = re.compile(r"gateway gRPC \(v2 GRPCInferenceService, health\) at (127\.0\.0\.1:\d+)")
ADAPTER_VALUES = REPO_ROOT / "deploy" / "prometheus-adapter" / "values.yaml"
TRAFFIC_REQUESTS = 240
TRAFFIC_MAX_SECONDS = 25.0
CONCURRENCY = 8
# Pause between one client's requests, so the traffic spans several scrape intervals, as real traffic does.
CLIENT_PAUSE_SECONDS = 0.1


@pytest.fixture
def gateway_process(triton_server, model_repository, tmp_path):
    gw = GatewayProcess(
        [],
        {
            "GATEWAY_TRITON__GRPC_URL": triton_server.grpc_url,
            "GATEWAY_TRITON__MODEL_REPOSITORY": str(model_repository),
            "GATEWAY_RESOURCE_SAMPLE_INTERVAL_SECONDS": "1",
            "GATEWAY_DRAIN_GRACE_SECONDS": "0",
        },
        tmp_path / "gateway.log",
    )
    try:
        gw.wait_ready(60)
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def grpc_gateway_process(triton_server, model_repository, tmp_path):
    """A gateway with its gRPC port open and a batching wait, so every request spends time in the queue."""
    gw = GatewayProcess(
        [],
        {
            "GATEWAY_TRITON__GRPC_URL": triton_server.grpc_url,
            "GATEWAY_TRITON__MODEL_REPOSITORY": str(model_repository),
            "GATEWAY_GRPC_PORT": "0",
            "GATEWAY_DRAIN_GRACE_SECONDS": "0",
            "GATEWAY_BATCH__MAX_WAIT_SECONDS": "0.4",
            "GATEWAY_BATCH__FLUSH_WHEN_IDLE": "false",
        },
        tmp_path / "gateway-grpc.log",
    )
    try:
        gw.wait_ready(60)
        match = GRPC_LINE.search(gw.log())
        assert match, gw.log()[-2000:]
        gw.grpc_url = match.group(1)  # type: ignore[attr-defined]
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def prometheus(gateway_process, triton_server, tmp_path):
    binary = prometheus_binary()
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    triton_target = triton_server.metrics_url.removeprefix("http://").removesuffix("/metrics")
    prom = PrometheusProcess(
        binary, workdir, {"gateway": gateway_process.url.removeprefix("http://"), "triton": triton_target}
    )
    try:
        prom.wait_ready(30)
        yield prom
    finally:
        prom.stop()


async def _traffic(url: str) -> dict[int, int]:
    """Send TRAFFIC_REQUESTS classify requests from CONCURRENCY clients, bounded by TRAFFIC_MAX_SECONDS."""
    give_up = time.monotonic() + TRAFFIC_MAX_SECONDS
    codes: dict[int, int] = {}
    counter = iter(range(TRAFFIC_REQUESTS))

    async def client(http: httpx.AsyncClient) -> None:
        for i in counter:
            if time.monotonic() > give_up:
                return
            variant = "int8" if i % 4 else "fp16"
            resp = await http.post("/v1/classify", json={"text": QUESTIONS[i % len(QUESTIONS)], "variant": variant})
            codes[resp.status_code] = codes.get(resp.status_code, 0) + 1
            await asyncio.sleep(CLIENT_PAUSE_SECONDS)

    async with httpx.AsyncClient(base_url=url, timeout=30.0) as http:
        await asyncio.gather(*(client(http) for _ in range(CONCURRENCY)))
    return codes


def _texts_input(texts: list[str]):
    import numpy as np
    import tritonclient.grpc.aio as grpcaio

    tensor = grpcaio.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    return tensor


async def _protocol_traffic(protocol: str, http_url: str, grpc_url: str, model: str, seconds: float) -> dict[int, int]:
    """Classify over one protocol only (v2 REST or v2 gRPC) from CONCURRENCY clients for ``seconds`` (bounded)."""
    import tritonclient.grpc.aio as grpcaio
    from tritonclient.utils import InferenceServerException

    give_up = time.monotonic() + seconds
    codes: dict[int, int] = {}
    counter = iter(range(TRAFFIC_REQUESTS))

    async def rest_client(http: httpx.AsyncClient) -> None:
        for i in counter:
            if time.monotonic() > give_up:
                return
            body = {
                "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [QUESTIONS[i % len(QUESTIONS)]]}]
            }
            resp = await http.post(f"/v2/models/{model}/infer", json=body)
            codes[resp.status_code] = codes.get(resp.status_code, 0) + 1
            await asyncio.sleep(CLIENT_PAUSE_SECONDS)

    async def grpc_client(client: grpcaio.InferenceServerClient) -> None:
        for i in counter:
            if time.monotonic() > give_up:
                return
            try:
                await client.infer(model, [_texts_input([QUESTIONS[i % len(QUESTIONS)]])], client_timeout=30)
                code = 200
            except InferenceServerException:
                code = 500
            codes[code] = codes.get(code, 0) + 1
            await asyncio.sleep(CLIENT_PAUSE_SECONDS)

    if protocol == "grpc":
        client = grpcaio.InferenceServerClient(grpc_url)
        try:
            await asyncio.gather(*(grpc_client(client) for _ in range(CONCURRENCY)))
        finally:
            await client.close()
    else:
        async with httpx.AsyncClient(base_url=http_url, timeout=30.0) as http:
            await asyncio.gather(*(rest_client(http) for _ in range(CONCURRENCY)))
    return codes


def _render_adapter_query(template: str, matchers: str, group_by: str) -> str:
    # What prometheus-adapter does with a rule's metricsQuery (Go template with << >> delimiters).
    series = "gateway_request_duration_seconds_bucket" if "histogram_quantile" in template else None
    out = template.replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", group_by)
    if series is not None:
        out = out.replace("<<.Series>>", series)
    return out


async def test_prometheus_records_p99_and_queue_depth_from_live_traffic(prometheus, gateway_process):
    # Both targets are up before traffic starts, so the rate windows hold the whole run.
    prometheus.wait_for('up{job="gateway"} == 1', 30)
    prometheus.wait_for('up{job="triton"} == 1', 30)
    codes = await _traffic(gateway_process.url)
    assert codes.get(200, 0) >= 50, codes

    ns = TARGET_LABELS["namespace"]
    p99 = prometheus.wait_for('namespace_variant:gateway_request_duration_seconds:p99_rate2m{variant="int8"}', 30)
    p50 = prometheus.wait_for('namespace_variant:gateway_request_duration_seconds:p50_rate2m{variant="int8"}', 30)
    p99_value, p50_value = float(p99[0]["value"][1]), float(p50[0]["value"][1])
    assert p99[0]["metric"] == {
        "__name__": "namespace_variant:gateway_request_duration_seconds:p99_rate2m",
        "namespace": ns,
        "variant": "int8",
    }
    assert p99_value >= p50_value > 0.0
    assert p99_value < 30.0  # below the request timeout: a plausible latency, not a bucket overflow
    fp16 = prometheus.wait_for('namespace_variant:gateway_request_duration_seconds:p99_rate2m{variant="fp16"}', 30)
    assert float(fp16[0]["value"][1]) > 0.0

    depth = prometheus.wait_for("namespace_pod:gateway_queue_depth:sum", 30)
    assert depth[0]["metric"]["pod"] == TARGET_LABELS["pod"] and float(depth[0]["value"][1]) >= 0.0
    batch = prometheus.wait_for('namespace_variant:gateway_batch_size:mean_rate2m{variant="int8"}', 30)
    assert float(batch[0]["value"][1]) >= 1.0
    throughput = prometheus.wait_for('namespace_variant_code:gateway_requests:rate2m{code="200"}', 30)
    assert sum(float(r["value"][1]) for r in throughput) > 0.0

    # Triton's own metrics port is scraped next to ours: its request counters saw the same traffic.
    triton_ok = prometheus.wait_for('sum(nv_inference_request_success{job="triton"})', 30)
    assert float(triton_ok[0]["value"][1]) > 0.0
    # Resource gauges sampled off the request path; no GPU here, so no GPU series at all.
    assert prometheus.wait_for('process_resident_memory_bytes{job="gateway"}', 30)
    assert prometheus.wait_for('gateway_process_cpu_utilization_ratio{job="gateway"}', 30)
    assert prometheus.query("gateway_gpu_utilization_ratio") == [] or os.path.exists("/dev/nvidiactl")

    # The prometheus-adapter rules, rendered the way the adapter renders them for an HPA in namespace `ns`.
    rules = {r["name"]["as"]: r for r in yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]}
    depth_q = _render_adapter_query(
        rules["gateway_queue_depth"]["metricsQuery"].replace("<<.Series>>", "gateway_queue_depth"),
        f'namespace="{ns}",pod=~"{TARGET_LABELS["pod"]}"',
        "pod",
    )
    served = prometheus.wait_for(depth_q, 10)
    assert served[0]["metric"] == {"pod": TARGET_LABELS["pod"]}
    p99_q = _render_adapter_query(
        rules["gateway_request_duration_p99_seconds"]["metricsQuery"],
        f'namespace="{ns}",service="{TARGET_LABELS["service"]}"',
        "service",
    )
    served = prometheus.wait_for(p99_q, 10)
    assert served[0]["metric"] == {"service": TARGET_LABELS["service"]}
    assert 0.0 < float(served[0]["value"][1]) < 30.0


async def test_grpc_only_and_v2_rest_only_traffic_reach_the_autoscaling_series(
    grpc_gateway_process, triton_server, tmp_path
):
    """A client that switches to tritonclient (v2 REST or gRPC) stays visible to the P99, rate and queue signals.

    Phase 1 sends gRPC traffic only, to classifier_fp16; phase 2 v2-REST traffic only, to classifier_int8; no v1
    request is made. Each variant's recorded P99 and rate can then only come from one protocol, and the pod's queue
    depth is read over each phase's own time window.
    """
    gw = grpc_gateway_process
    workdir = tmp_path / "prometheus-protocols"
    workdir.mkdir()
    prom = PrometheusProcess(prometheus_binary(), workdir, {"gateway": gw.url.removeprefix("http://")})
    try:
        prom.wait_ready(30)
        prom.wait_for('up{job="gateway"} == 1', 30)
        phases = {}
        for protocol, model in (("grpc", "classifier_fp16"), ("rest_v2", "classifier_int8")):
            start = time.time()
            codes = await _protocol_traffic(protocol, gw.url, gw.grpc_url, model, seconds=8.0)
            assert codes.get(200, 0) >= 20 and set(codes) == {200}, (protocol, codes)
            await asyncio.sleep(2.5)  # two scrapes and rule evaluations after the last request
            phases[protocol] = (start, time.time())

        for protocol, variant in (("grpc", "fp16"), ("rest_v2", "int8")):
            p99 = prom.wait_for(
                f'namespace_variant:gateway_request_duration_seconds:p99_rate2m{{variant="{variant}"}}', 30
            )
            assert 0.0 < float(p99[0]["value"][1]) < 30.0, (protocol, p99)
            rate = prom.wait_for(
                f'namespace_variant_code:gateway_requests:rate2m{{variant="{variant}",code="200"}}', 30
            )
            assert float(rate[0]["value"][1]) > 0.0, (protocol, rate)
            # The raw series carry the protocol: the only classify traffic of this variant came over it.
            by_protocol = prom.query(
                f'sum by (protocol) (gateway_requests_total{{operation="classify",variant="{variant}",code="200"}}) > 0'
            )
            assert [r["metric"]["protocol"] for r in by_protocol] == [protocol]
            # The queue depth the HPA reads moved during this phase (each request waits up to 0.4 s in the queue).
            start, end = phases[protocol]
            window = max(2, round(end - start))
            params = {"query": f"max_over_time(namespace_pod:gateway_queue_depth:sum[{window}s])", "time": f"{end:.3f}"}
            data = get_json(f"{prom.url}/api/v1/query?" + urllib.parse.urlencode(params))
            assert data["status"] == "success" and data["data"]["result"], data
            assert float(data["data"]["result"][0]["value"][1]) >= 1.0, (protocol, data)
    finally:
        prom.stop()
