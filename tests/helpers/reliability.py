"""Figures of the reliability scenarios: where the tests record them, and the renderer of docs/reliability.md.

Each reliability test calls :func:`record` with what it measured (requests sent, answers by status code, lost,
recovery time, ...). The figures are merged into one JSON file, ``artifacts/reliability.json`` by default
(``LORASERVE_RELIABILITY_JSON`` overrides it; the committed snapshot is ``bench/results/reliability.json``), together with the machine they ran on. Render the document with::

    .venv/bin/python -m tests.helpers.reliability [--json PATH] [--out docs/reliability.md]

tests/integration/test_reliability_report.py checks that rendering works on a small sample; it never touches the
real files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV_JSON = "LORASERVE_RELIABILITY_JSON"
# Test runs write here (ignored by git) so that running the suite never dirties the tree; the committed snapshot
# bench/results/reliability.json is refreshed on purpose with LORASERVE_RELIABILITY_JSON=bench/results/reliability.json.
DEFAULT_JSON = REPO_ROOT / "artifacts" / "reliability.json"
DEFAULT_DOC = REPO_ROOT / "docs" / "reliability.md"

#: Scenario key -> (title, what the test does and asserts). The order is the document's.
SCENARIOS: dict[str, tuple[str, str]] = {
    "triton_killed": (
        "1. Triton killed at half load",
        (
            "`python -m service.gateway --embedded-triton` under an open-loop load of half the measured capacity; "
            "tritonserver gets SIGKILL and the supervisor restarts it. With 30 s deadlines, batches that fail as "
            "unavailable wait (bounded by their deadlines) for the restarted server and are retried once; asserted: "
            "every request is answered 200. With 150 ms deadlines, asserted: only 200/503/504, none hung, none "
            "answered more than 50 ms after its deadline (gateway clock, x-total-time). Recovery = SIGKILL to the "
            "first 200 of a request sent afterwards."
        ),
    ),
    "triton_stalled": (
        "2. Triton stalled (SIGSTOP)",
        (
            "The gateway process in front of a SIGSTOPped tritonserver (SIGCONT in a finalizer). Concurrent requests "
            "with a 1 s deadline. Asserted: each ends with 504 at its deadline (+1.5 s margin), the queue depth never "
            "exceeds max_queue_size and is back to 0 afterwards, and after SIGCONT requests succeed again."
        ),
    ),
    "overload": (
        "3. Overload at 3x capacity, admission by predicted completion",
        (
            "One full batch alone and the closed-loop capacity are measured first; the SLO target is 200 ms, or 4x "
            "the full-batch time where that exceeds 50 ms. An open-loop generator (tests/helpers/open_loop.py: raw "
            "keep-alive HTTP/1.1 with request bytes built before the clock starts, so that it takes little of the "
            "2 shared cores; the capacity is measured with its closed-loop twin; requests of 8 texts) then offers "
            "3x the capacity for 30 s. Asserted: only 200 and 429, every 429 with a Retry-After of "
            "1-10 s, RSS growth under 50 MiB, goodput at least 0.3x capacity and the admitted P99 (gateway clock) "
            "within 10x the target. The issue's goals (P99 <= 1.2x target, goodput >= 0.8x) are the figures "
            "`admitted_p99_over_slo` and `goodput_share_of_capacity` below."
        ),
    ),
    "shadow_agreement": (
        "8. Shadow agreement catches a bad INT8 model",
        (
            "Two gateways with their own tritonserver, one on the real build, one with its INT8 classifier's "
            "weight scales distorted; both shadow INT8 traffic with FP16 on idle capacity. A real Prometheus with "
            "the deploy/ rules (windows shortened for the test) scrapes both. Asserted: "
            "LoraserveShadowAgreementLow fires for the corrupted build only; the real build's agreement is recorded."
        ),
    ),
    "client_disconnect": (
        "4. Clients disconnecting while queued",
        (
            "Requests wait in the queue (max_wait 2 s) and their clients give up after 0.3 s. Asserted: all are "
            'counted in `gateway_requests_rejected_total{reason="client_disconnect"}`, no batch is sent and Triton\'s '
            "inference count does not move."
        ),
    ),
    "hostile_input": (
        "5. Hostile input",
        (
            "Empty, whitespace-only, megabyte and over-long texts, thousands of texts, wrong JSON types, invalid UTF-8, "
            "unknown fields and variants, absurd deadlines, over v1 and v2 against real Triton; plus schemathesis "
            "fuzzing of the OpenAPI spec against the app (fake backend). Asserted: each case gets its documented "
            "4xx, never a 5xx, and the gateway still answers 200 afterwards."
        ),
    ),
    "graceful_shutdown": (
        "6. Graceful shutdown (SIGTERM)",
        (
            "Requests queued in the gateway process (max_wait 0.5 s), then SIGTERM, then more requests. Asserted: "
            "every request accepted before SIGTERM is answered 200, later ones get 503 (or a refused connection once "
            "the listener closed), and the process exits 0."
        ),
    ),
}


def figures_path() -> Path:
    """Where the figures JSON lives (``LORASERVE_RELIABILITY_JSON`` or artifacts/reliability.json)."""
    return Path(os.environ.get(ENV_JSON) or DEFAULT_JSON)


def machine() -> str:
    """A one-line description of this machine."""
    from service.machine import machine_line

    return machine_line()


def record(scenario: str, figures: dict[str, Any], path: Path | None = None) -> None:
    """Merge one scenario's figures into the JSON file (and print them, so they show in the test log).

    Args:
        scenario: A key of :data:`SCENARIOS`.
        figures: What was measured.
        path: Override of :func:`figures_path`.
    """
    if scenario not in SCENARIOS:
        raise KeyError(f"unknown scenario {scenario!r}")
    target = path or figures_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}
    if target.is_file():
        try:
            data = json.loads(target.read_text())
        except json.JSONDecodeError:
            data = {}
    # Merged, not replaced: two tests may contribute to one scenario (hostile input: real Triton and fuzzing).
    entry = data.setdefault("scenarios", {}).setdefault(scenario, {})
    entry.update(figures)
    entry["recorded_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    data["machine"] = machine()
    target.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    print(f"reliability figures [{scenario}]: {json.dumps(figures, sort_keys=True)}")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in sorted(value.items())) or "-"
    return str(value)


def render(data: dict[str, Any]) -> str:
    """The Markdown of docs/reliability.md from the figures.

    Args:
        data: The JSON content (``machine`` and ``scenarios``).

    Returns:
        The document.
    """
    lines = [
        "# Reliability: faults, overload and hostile input",
        "",
        (
            "Each scenario is an automated test against the real gateway and the real tritonserver, in the default "
            "test command (`tests/integration/test_reliability_*.py`, `tests/unit/test_gateway_fuzz.py`, "
            "`tests/unit/test_gateway_auth.py`). Loops are bounded in count and time and bind 127.0.0.1 only. The "
            "figures below are from the latest run, rendered by "
            "`LORASERVE_RELIABILITY_JSON=bench/results/reliability.json .venv/bin/python -m tests.helpers.reliability` from `bench/results/reliability.json`."
        ),
        "",
        (
            f"Machine: {data.get('machine', 'unknown')}. The model is the tests' tiny build (MiniLM, INT8), and the "
            "load generator runs on the same cores as the gateway and Triton, so throughput figures describe this "
            "setup, not a capacity claim."
        ),
        "",
        '"lost" counts requests that got no HTTP answer at all (client-side error or timeout); it must be 0.',
        "",
        "## How the gateway decides (admission, batching, restarts, shadow agreement)",
        "",
        (
            "- **Service-time model.** Each variant's batcher fits `seconds = intercept + per_token x rows x padded "
            "length` online (recursive least squares, forgetting factor 0.98) to the time the backend spent on each "
            "of its batches (counted from when a batch was sent or when a backend instance last became free, "
            "whichever is later: Triton runs one batch per model instance at a time; the instance count is read from "
            "Triton's model config at start). The queue's text tokens are scaled by the padding ratio of recent "
            "batches (padded tokens per text token) before they are priced, and the drain time of the work ahead "
            "is divided by the instance count (`backend_parallelism`), never below the request's own batch alone. "
            "Exported as `gateway_service_time_intercept_seconds`, `gateway_service_time_per_token_seconds` and "
            "`gateway_predicted_drain_seconds`, and shown per variant in `GET /v1/models` (`service_time`)."
        ),
        (
            "- **Admission by predicted completion.** A request is admitted only if the work in flight, the queue "
            "ahead of it and its own batch are predicted to finish within its deadline and within "
            "`GATEWAY_SLO_ADMISSION_FRACTION` (0.8) of `GATEWAY_SLO_P99_SECONDS` (0.2 s; per variant with "
            "`GATEWAY_SLO_P99_SECONDS_BY_VARIANT`). Otherwise 429 at once, `Retry-After` = the predicted drain time "
            "clamped to 1-10 s. When every served variant is saturated, inference requests are refused before their "
            "body is decoded (the cheapest refusal). `GATEWAY_BATCH__MAX_QUEUE_SIZE` (4096 texts) stays as a memory "
            "guard. Until a variant has seen 8 batches, only the count bound applies."
        ),
        (
            "- **Feedback from the outcome.** The service-time model sees only the batch; on a busy machine an "
            "admitted request also waits for the event loop and the CPU. So the budget corrects itself from the "
            "latency of answered requests (Clipper's AIMD, applied to the admission budget): every 100 answers, if "
            "more than 1% of them missed the SLO the budget shrinks by x0.8, or by SLO/P99 of the window when that "
            "is smaller (at most halved per window; floor 0.25 of the configured one); if even the slowest used less "
            "than 90% of the SLO it grows back by 0.05. A request that finds nothing in flight or queued is admitted "
            "if its own deadline allows, even when it alone exceeds the SLO. Outages and the recovery grace period "
            "do not count. Exported as `gateway_admission_budget_scale`, shown in `GET /v1/models`."
        ),
        (
            "- **Batches that meet deadlines.** A batch is the largest arrival-order prefix of its length bucket whose "
            "predicted finish meets the earliest deadline in it; no wait when the backend is idle; length buckets "
            "keep short texts from being padded to long ones."
        ),
        (
            "- **Across a backend restart.** A batch whose call fails as unavailable waits for the backend to be "
            "ready (bounded by its deadlines less its predicted time) and is retried once (`gateway_backend_retries"
            "_total`); a second failure is final, and no result is ever set twice. Meanwhile, and until the backlog "
            "fits the SLO again, admission checks deadlines only: a client whose deadline allows waiting is served "
            "late rather than refused. 503 only when the deadline does not allow waiting."
        ),
        (
            "- **Shadow agreement.** `GATEWAY_SHADOW__FRACTION` (0.01) of the primary variant's requests "
            "(`GATEWAY_SHADOW__PRIMARY`, int8) are also classified by the shadow (`GATEWAY_SHADOW__SHADOW`, fp16), "
            "only when neither has work queued or in flight, one comparison at a time. `gateway_shadow_comparisons"
            "_total`, `gateway_shadow_agreements_total` and `gateway_shadow_probability_difference` feed the recording "
            "rule `namespace_primary_shadow:gateway_shadow_agreements:ratio_rate10m` and the alert "
            "`LoraserveShadowAgreementLow` (agreement < 97% for 5 min with at least 0.1 comparisons/s): the way to "
            "catch a bad quantized model in production."
        ),
        "",
    ]
    scenarios = data.get("scenarios", {})
    for key, (title, how) in SCENARIOS.items():
        lines += [f"## {title}", "", how, ""]
        figures = scenarios.get(key)
        if not figures:
            lines += ["_No figures recorded yet._", ""]
            continue
        lines += ["| figure | value |", "|---|---|"]
        for name, value in sorted(figures.items()):
            lines.append(f"| {name} | {_fmt(value)} |")
        lines.append("")
    lines += [
        "## 7. Authentication and limits",
        "",
        (
            "Optional API keys (`GATEWAY_API_KEYS`, off by default): 401 without a key, 403 with a wrong one "
            "(gRPC UNAUTHENTICATED / PERMISSION_DENIED), constant-time comparison, health/readiness/metrics exempt; "
            'see docs/gateway.md "Authentication". Limits: body `GATEWAY_MAX_BODY_BYTES` (413; gRPC message limit), '
            "texts per call `GATEWAY_MAX_CLIENT_BATCH_SIZE` (413 / INVALID_ARGUMENT), characters per text "
            "`GATEWAY_MAX_TEXT_CHARS` (413). Tested in `tests/unit/test_gateway_auth.py` and by scenario 5."
        ),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Render docs/reliability.md from the figures JSON."""
    parser = argparse.ArgumentParser(description="Render docs/reliability.md from the reliability figures.")
    parser.add_argument("--json", type=Path, default=None, help=f"figures (default {DEFAULT_JSON})")
    parser.add_argument("--out", type=Path, default=DEFAULT_DOC)
    args = parser.parse_args(argv)
    source = args.json or figures_path()
    if not source.is_file():
        print(f"{source} not found: run the reliability tests first", file=sys.stderr)
        return 1
    args.out.write_text(render(json.loads(source.read_text())))
    print(f"wrote {args.out} from {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
