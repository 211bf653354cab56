"""The load test as users run it: locust's CLI, headless and bounded, against the real gateway and Triton.

Locust runs as a subprocess (its console script), never imported here: importing locust after ``requests`` in one
process recurses inside gevent's monkey-patching, and a subprocess also tests exactly what the README tells users
to type. The gateway is configured to shed on purpose (a queue of 8 texts that waits 200 ms for companions, lists
of up to 8 texts), so one short run exercises both outcomes the locustfile must keep apart: answered requests and
429s. Thresholds are generous except in the run built to miss one: timings on a shared 2-core machine vary.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.gateway_process import REPO_ROOT, GatewayProcess

pytestmark = pytest.mark.integration

LOCUST = Path(sys.executable).parent / "locust"
LOCUSTFILE = REPO_ROOT / "loadtest" / "locustfile.py"
SHAPES = REPO_ROOT / "loadtest" / "shapes.py"
SHED_SUFFIX = " [shed]"
# Far above anything this service does even on a loaded machine (its own deadline is 30 s); only a hang misses it.
GENEROUS_P99_MS = "15000"


@pytest.fixture(scope="module")
def shedding_gateway(triton_server, model_repository, tmp_path_factory) -> str:
    """A gateway process on the shared Triton with a small queue, so that some lists are refused with 429."""
    if not LOCUST.exists():
        pytest.skip(f"locust is not installed next to {sys.executable} (pip install '.[loadtest]')")
    env = {
        "GATEWAY_TRITON__GRPC_URL": triton_server.grpc_url,
        "GATEWAY_TRITON__MODEL_REPOSITORY": str(model_repository),
        "GATEWAY_GRPC_PORT": "-1",
        "GATEWAY_DRAIN_GRACE_SECONDS": "0",
        "GATEWAY_MAX_CLIENT_BATCH_SIZE": "8",
        "GATEWAY_BATCH__MAX_QUEUE_SIZE": "8",
        "GATEWAY_BATCH__MAX_BATCH_SIZE": "8",
        "GATEWAY_BATCH__MAX_WAIT_SECONDS": "0.2",
        "GATEWAY_BATCH__FLUSH_WHEN_IDLE": "false",
    }
    gw = GatewayProcess([], env, tmp_path_factory.mktemp("gw-locust") / "gateway.log")
    try:
        yield gw.wait_ready(90)
    finally:
        gw.stop()


def _locust(host: str, csv_prefix: Path, *args: str, timeout_seconds: float = 90) -> subprocess.CompletedProcess:
    cmd = [
        str(LOCUST),
        "--headless",
        "--host",
        host,
        "--csv",
        str(csv_prefix),
        "--only-summary",
        "--stop-timeout",
        "10",
        *args,
    ]
    # -t bounds the run; the subprocess timeout only guards against a hung locust.
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_seconds, check=False)


def _classify_counts(url: str) -> dict[str, float]:
    """gateway_requests_total of v1 REST classify requests by status code, summed over variants."""
    counts: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in fam.samples:
            labels = s.labels
            if s.name == "gateway_requests_total" and (labels.get("operation"), labels.get("protocol")) == (
                "classify",
                "rest_v1",
            ):
                counts[s.labels["code"]] = counts.get(s.labels["code"], 0.0) + s.value
    return counts


def test_headless_run_passes_thresholds_and_counts_shedding_apart(shedding_gateway, tmp_path):
    before = _classify_counts(shedding_gateway)
    prefix = tmp_path / "spike"
    run = _locust(
        shedding_gateway,
        prefix,
        "-f",
        f"{LOCUSTFILE},{SHAPES}",
        "--shape",
        "spike",
        "-u",
        "8",
        "-t",
        "12s",
        "--list-share",
        "0.5",
        "--max-list-size",
        "8",
        "--max-error-rate",
        "0",
        "--max-p99-ms",
        GENEROUS_P99_MS,
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]

    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] != "Aggregated"]
    served = [r for r in rows if not r["Name"].endswith(SHED_SUFFIX)]
    shed = [r for r in rows if r["Name"].endswith(SHED_SUFFIX)]
    assert sum(int(r["Request Count"]) for r in served) > 0, rows
    # Both precisions and both request kinds were sent, and every served request passed its body checks.
    assert {r["Name"] for r in served} == {
        "classify text int8",
        "classify text fp16",
        "classify list int8",
        "classify list fp16",
    }, rows
    assert all(int(r["Failure Count"]) == 0 for r in served), rows
    assert all(r["Failure Count"] == r["Request Count"] for r in shed), rows
    with open(f"{prefix}_failures.csv", newline="") as f:
        errors = [r["Error"] for r in csv.DictReader(f)]
    assert all("shed: 429" in e for e in errors), errors

    # The locustfile's own summary is written after the last request; it must agree with the gateway's counters.
    summary = json.loads(Path(f"{prefix}_summary.json").read_text())
    assert summary["misses"] == [] and summary["client"]["errors"] == 0, summary
    assert summary["client"]["shed"] > 0, "the small queue should have refused some lists; nothing was shed"
    after = _classify_counts(shedding_gateway)
    grew = {code: after.get(code, 0.0) - before.get(code, 0.0) for code in after}
    assert grew.get("429", 0.0) == summary["client"]["shed"], (grew, summary)
    assert grew.get("200", 0.0) == summary["client"]["requests"] - summary["client"]["shed"], (grew, summary)
    assert all(v == 0 for code, v in grew.items() if code not in ("200", "429")), grew
    # The gateway's histograms over the run sit next to locust's percentiles.
    assert summary["server"]["requests"] == grew["200"] + grew["429"], summary


def test_missed_threshold_exits_non_zero(shedding_gateway, tmp_path):
    prefix = tmp_path / "impossible"
    run = _locust(
        shedding_gateway,
        prefix,
        "-f",
        str(LOCUSTFILE),
        "-u",
        "2",
        "-r",
        "2",
        "-t",
        "4s",
        "--list-share",
        "0",
        "--max-p99-ms",
        "0.001",
    )
    assert run.returncode == 1, (run.stdout + run.stderr)[-4000:]
    misses = json.loads(Path(f"{prefix}_summary.json").read_text())["misses"]
    # It failed for the P99 alone: requests were answered and none of them was an error.
    assert len(misses) == 1 and misses[0].startswith("P99 "), misses
