"""A real Prometheus scrapes a real gateway process and a real tritonserver while bounded traffic flows, evaluates the
recording rules from deploy/prometheus, and serves the recorded P99 and queue depth through its HTTP API. The
prometheus-adapter queries of deploy/prometheus-adapter are run against the same Prometheus, as the adapter would.

Prometheus comes from Debian's ``prometheus`` package; it is started by hand on 127.0.0.1 with a scratch config and a
temporary storage directory and stopped by PID. Missing outside CI: skipped; missing in CI: failure.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers.gateway_process import REPO_ROOT, GatewayProcess, closed_port

pytestmark = pytest.mark.integration

RULES_DIR = REPO_ROOT / "deploy" / "prometheus"
ADAPTER_VALUES = REPO_ROOT / "deploy" / "prometheus-adapter" / "values.yaml"
# Static target labels standing in for what the Prometheus Operator adds in a cluster (namespace, pod, service),
# so the recording rules and the adapter's label matchers see the shapes they will see there.
TARGET_LABELS = {"namespace": "loraserve-test", "pod": "loraserve-0", "service": "loraserve"}
SCRAPE_INTERVAL = "1s"
TRAFFIC_REQUESTS = 240
TRAFFIC_MAX_SECONDS = 25.0
CONCURRENCY = 8
# Pause between one client's requests, so the traffic spans several scrape intervals, as real traffic does.
CLIENT_PAUSE_SECONDS = 0.1
QUESTIONS = [
    "What is the capital of France?",
    "Who wrote Hamlet?",
    "How many legs does a spider have?",
    "When did the Berlin wall fall?",
    "What does NASA stand for?",
    "Where is Mount Kilimanjaro?",
    "Why is the sky blue during the day but red at sunset?",
    "Name a famous Dutch painter.",
]


def _prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("prometheus is missing in CI: install Debian's 'prometheus' package (scripts/setup.sh does)")
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    return path


def _get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


class PrometheusProcess:
    """A Prometheus server on a free 127.0.0.1 port with a scratch config and storage under ``workdir``."""

    def __init__(self, binary: str, workdir: Path, scrape_targets: dict[str, str]) -> None:
        self.port = closed_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
            "rule_files": [str(RULES_DIR / "recording-rules.yml"), str(RULES_DIR / "alert-rules.yml")],
            "scrape_configs": [
                {
                    "job_name": job,
                    "metrics_path": "/metrics",
                    "static_configs": [{"targets": [target], "labels": TARGET_LABELS}],
                }
                for job, target in scrape_targets.items()
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout_seconds: float) -> None:
        give_up = time.monotonic() + timeout_seconds
        while time.monotonic() < give_up:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.25)
        raise AssertionError(f"prometheus not ready in {timeout_seconds} s:\n{self.log()}")

    def query(self, expr: str) -> list[dict]:
        data = _get_json(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert data["status"] == "success", data
        return data["data"]["result"]

    def wait_for(self, expr: str, timeout_seconds: float) -> list[dict]:
        """Poll (bounded) until ``expr`` returns at least one finite sample, and return the result."""
        give_up = time.monotonic() + timeout_seconds
        result: list[dict] = []
        while time.monotonic() < give_up:
            result = [r for r in self.query(expr) if math.isfinite(float(r["value"][1]))]
            if result:
                return result
            time.sleep(0.5)
        raise AssertionError(f"no finite sample for {expr!r} within {timeout_seconds} s (last {result})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


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
def prometheus(gateway_process, triton_server, tmp_path):
    binary = _prometheus_binary()
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
