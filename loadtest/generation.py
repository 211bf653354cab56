"""Streaming generation traffic for the gateway's ``POST /v1/generate`` (SSE), with a time-to-first-token threshold.

Each user asks a chat question from the TREC corpus (``data/questions.txt``) with ``stream: true``, reads the
server-sent events as they come, and records two entries:

    SSE  ``time to first token``   request sent -> first ``data:`` event (the number users feel)
    POST ``generate stream``       the whole stream, checked: events parse, the last one has a finish_reason,
                                   then ``[DONE]``; 429 (KV cache or stream limit full) is "shed: 429" under
                                   ``generate stream [shed]``, apart from errors

Thresholds, checked when locust quits (a miss sets exit code 1): ``--max-ttft-p99-ms`` on the P99 of time to first
token and ``--max-generate-error-rate`` on non-shed failures.

Run it on its own (it is a separate locustfile so classify runs are unchanged)::

    .venv/bin/locust -f loadtest/generation.py --headless -u 8 -r 8 -t 1m --host http://127.0.0.1:8000 \
        --max-ttft-p99-ms 2000 --max-new-tokens 64

The gateway needs ``GATEWAY_GENERATE__ENABLED=1`` and a published generator (docs/generation.md).
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from pathlib import Path

from locust import HttpUser, between, events, task
from locust.runners import WorkerRunner

CORPUS = Path(__file__).resolve().parent / "data" / "questions.txt"
TTFT_NAME = "time to first token"
STREAM_NAME = "generate stream"
SHED_SUFFIX = " [shed]"
SHED_FAILURE = "shed: 429"

log = logging.getLogger("loadtest.generation")


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    parser.add_argument(
        "--max-ttft-p99-ms",
        type=float,
        default=2000.0,
        env_var="LOCUST_MAX_TTFT_P99_MS",
        help="fail the run when the P99 time to first token is above this (milliseconds)",
    )
    parser.add_argument(
        "--max-generate-error-rate",
        type=float,
        default=0.01,
        env_var="LOCUST_MAX_GENERATE_ERROR_RATE",
        help="fail the run above this share of non-shed failed streams",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, env_var="LOCUST_MAX_NEW_TOKENS", help="max_new_tokens per request"
    )
    parser.add_argument("--corpus", default=str(CORPUS), env_var="LOCUST_CORPUS", help="question file, one per line")
    parser.add_argument(
        "--api-key",
        default="",
        env_var="LOCUST_API_KEY",
        is_secret=True,
        help="sent as 'Authorization: Bearer' when the gateway has GATEWAY_API_KEYS",
    )


def parse_stream(lines) -> tuple[float | None, dict | None, str | None]:
    """Read SSE lines: (seconds to the first data event, the final event's data, a problem or None)."""
    started = time.perf_counter()
    first: float | None = None
    final: dict | None = None
    event = "message"
    done = False
    for raw in lines:
        line = raw.decode() if isinstance(raw, bytes) else raw
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            if first is None:
                first = time.perf_counter() - started
            data = line[len("data: ") :]
            if data == "[DONE]":
                done = True
                break
            payload = json.loads(data)
            if event == "error":
                return first, None, f"stream error: {payload.get('error_type')}"
            if "finish_reason" in payload:
                final = payload
        elif not line:
            event = "message"
    if final is None or not done:
        return first, final, "stream ended without a final event and [DONE]"
    return first, final, None


class GenerationUser(HttpUser):
    """One chat client: think, stream one answer, check it, repeat."""

    wait_time = between(0.1, 1.0)

    def on_start(self) -> None:
        """Read the corpus and options once per user."""
        options = self.environment.parsed_options
        lines = Path(options.corpus).read_text(encoding="utf-8").splitlines()
        self.questions = [q.strip() for q in lines if q.strip() and not q.lstrip().startswith("#")]
        self.max_new_tokens = options.max_new_tokens
        self.auth = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
        self.rng = random.Random()

    @task
    def generate(self) -> None:
        """Stream one answer; record the time to its first token and the whole stream."""
        body = {
            "messages": [{"role": "user", "content": self.rng.choice(self.questions)}],
            "max_new_tokens": self.max_new_tokens,
            "stream": True,
        }
        headers = {"X-Request-ID": uuid.uuid4().hex, "Accept": "text/event-stream", **self.auth}
        sent = time.perf_counter()
        with self.client.post(
            "/v1/generate", json=body, headers=headers, name=STREAM_NAME, stream=True, catch_response=True, timeout=120
        ) as resp:
            if resp.status_code == 429 and resp.headers.get("Retry-After"):
                resp.request_meta["name"] = STREAM_NAME + SHED_SUFFIX
                resp.failure(SHED_FAILURE)
                return
            if resp.status_code != 200 or not resp.headers.get("content-type", "").startswith("text/event-stream"):
                resp.failure(f"status {resp.status_code}")
                return
            header_at = time.perf_counter() - sent
            first, _final, problem = parse_stream(resp.iter_lines())
            if first is not None:
                events.request.fire(
                    request_type="SSE",
                    name=TTFT_NAME,
                    response_time=(header_at + first) * 1000.0,
                    response_length=0,
                    exception=None,
                    context={},
                )
            if problem:
                resp.failure(problem)
            else:
                resp.success()


def threshold_misses(environment) -> list[str]:
    """One line per missed threshold (empty: the run passed)."""
    options = environment.parsed_options
    stats = environment.stats
    stream = stats.get(STREAM_NAME, "POST")
    ttft = stats.get(TTFT_NAME, "SSE")
    misses = []
    if not stream.num_requests:
        misses.append("no generation was answered")
        return misses
    error_rate = stream.num_failures / stream.num_requests
    if error_rate > options.max_generate_error_rate:
        misses.append(f"error rate {error_rate:.3f} > {options.max_generate_error_rate}")
    if ttft.num_requests:
        p99 = ttft.get_response_time_percentile(0.99)
        if p99 > options.max_ttft_p99_ms:
            misses.append(f"P99 time to first token {p99:.0f} ms > {options.max_ttft_p99_ms:.0f} ms")
    else:
        misses.append("no first token was received")
    return misses


@events.quitting.add_listener
def _verdict(environment, **_kw) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    ttft = environment.stats.get(TTFT_NAME, "SSE")
    if ttft.num_requests:
        log.info(
            "time to first token: n=%d p50=%.0f ms p99=%.0f ms",
            ttft.num_requests,
            ttft.get_response_time_percentile(0.5),
            ttft.get_response_time_percentile(0.99),
        )
    misses = threshold_misses(environment)
    for miss in misses:
        log.error("threshold missed: %s", miss)
    environment.process_exit_code = 1 if misses else 0
