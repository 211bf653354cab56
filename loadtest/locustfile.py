"""Realistic traffic for the gateway's ``POST /v1/classify``, with response checks and pass/fail thresholds.

Traffic: a fixed TREC question corpus (``data/questions.txt``, 4 to 29 words, the data set's own length mix); most
requests carry one text, the rest a small list (2 to ``--max-list-size`` texts); ``--fp16-share`` of them ask for
the FP16 variant, the rest for INT8. Every request sends its own ``X-Request-ID`` and the response must echo it.

Outcomes, per request name (``classify <text|list> <variant>``):
    200 whose body checks out            success
    429 with Retry-After                 failure "shed: 429" under the name ``... [shed]``: load shedding is the
                                         gateway doing its job, so it is counted apart from errors
    anything else, or a wrong 200 body   failure (an error)

Thresholds (``--max-error-rate``, ``--max-p99-ms``) are checked when locust quits; a miss, or a run without a
single answered request, sets the exit code to 1, so a headless run is a pass/fail check in CI. P99 covers
every non-shed request. Also at quitting, the gateway's own histograms (``/metrics``: request duration, queue
wait, batch size) over the run are logged next to locust's percentiles; with ``--csv PREFIX`` both views, the
thresholds and the verdict go to ``PREFIX_summary.json``.

Run it from the repository root (``locust.conf`` holds the defaults)::

    .venv/bin/locust --config loadtest/locust.conf --host http://127.0.0.1:8000
    .venv/bin/locust -f loadtest/locustfile.py,loadtest/shapes.py --headless -u 32 -t 2m --shape spike

Keep locust a command-line program: importing ``locust`` after ``requests`` in one process recurses
(gevent monkey-patching), which is why nothing here imports ``requests``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from locust import FastHttpUser, between, events, task
from locust.runners import WorkerRunner
from locust.stats import StatsEntry

CORPUS = Path(__file__).resolve().parent / "data" / "questions.txt"
SHED_SUFFIX = " [shed]"
SHED_FAILURE = "shed: 429"
VARIANTS = ("int8", "fp16")

log = logging.getLogger("loadtest")


def load_questions(path: Path) -> list[str]:
    """Questions of a corpus file: one per line; blank lines and ``#`` comments skipped.

    Args:
        path: The corpus file.

    Returns:
        The questions in file order.

    Raises:
        ValueError: The file holds no question.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    questions = [q.strip() for q in lines if q.strip() and not q.lstrip().startswith("#")]
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    # Each option can also be set in locust.conf (without the dashes) or through its environment variable.
    parser.add_argument(
        "--max-error-rate",
        type=float,
        default=0.01,
        env_var="LOCUST_MAX_ERROR_RATE",
        help="fail the run above this share of non-shed failures among all requests",
    )
    parser.add_argument(
        "--max-p99-ms",
        type=float,
        default=1000.0,
        env_var="LOCUST_MAX_P99_MS",
        help="fail the run when the P99 of non-shed requests is above this (milliseconds)",
    )
    parser.add_argument(
        "--fp16-share",
        type=float,
        default=0.25,
        env_var="LOCUST_FP16_SHARE",
        help="share of requests that ask for the fp16 variant (the rest: int8)",
    )
    parser.add_argument(
        "--list-share",
        type=float,
        default=0.3,
        env_var="LOCUST_LIST_SHARE",
        help="share of requests that send a list of texts instead of one text",
    )
    parser.add_argument(
        "--max-list-size",
        type=int,
        default=8,
        env_var="LOCUST_MAX_LIST_SIZE",
        help="largest list of texts in one request (at most the gateway's max_client_batch_size)",
    )
    parser.add_argument("--corpus", default=str(CORPUS), env_var="LOCUST_CORPUS", help="question file, one per line")
    parser.add_argument(
        "--api-key",
        default="",
        env_var="LOCUST_API_KEY",
        is_secret=True,
        help="sent as 'Authorization: Bearer' when the gateway has GATEWAY_API_KEYS",
    )
    parser.add_argument(
        "--shape",
        default="steady",
        choices=["ramp", "steady", "spike", "burst"],
        env_var="LOCUST_SHAPE",
        help="stages of loadtest/shapes.py (only when that file is loaded with -f)",
    )


class GatewayUser(FastHttpUser):
    """One client of the gateway: think, send one classify request, check the answer, repeat."""

    # Real callers pause between requests; closed-loop saturation is the benchmark's job (bench/compare.py).
    wait_time = between(0.05, 0.5)
    # Bounded by the gateway's own deadline (30 s by default) plus slack; no request hangs a run.
    network_timeout = 40.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        """Read the corpus and the traffic mix once per user."""
        options = self.environment.parsed_options
        self.questions = load_questions(Path(options.corpus))
        self.fp16_share = options.fp16_share
        self.list_share = options.list_share
        self.max_list_size = max(2, options.max_list_size)
        self.auth = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
        self.rng = random.Random()

    @task
    def classify(self) -> None:
        """Send one text or a small list to one variant and check the response."""
        variant = "fp16" if self.rng.random() < self.fp16_share else "int8"
        if self.rng.random() < self.list_share:
            texts = self.rng.sample(self.questions, self.rng.randint(2, self.max_list_size))
            body: dict = {"texts": texts, "variant": variant}
            name = f"classify list {variant}"
        else:
            texts = [self.rng.choice(self.questions)]
            body = {"text": texts[0], "variant": variant}
            name = f"classify text {variant}"
        request_id = uuid.uuid4().hex
        headers = {"X-Request-ID": request_id, **self.auth}
        with self.client.post("/v1/classify", json=body, headers=headers, name=name, catch_response=True) as resp:
            problem = check_response(resp.status_code, resp.headers, resp.text, request_id, variant, len(texts))
            if resp.status_code == 429 and problem is None:
                # Its own name keeps shedding out of the latency and error figures of served requests.
                resp.request_meta["name"] = name + SHED_SUFFIX
                resp.failure(SHED_FAILURE)
            elif problem:
                resp.failure(problem)
            else:
                resp.success()


def check_response(status: int, headers, text: str | None, request_id: str, variant: str, n_texts: int) -> str | None:
    """What is wrong with a classify response, if anything (429 with Retry-After counts as right).

    Args:
        status: HTTP status (0 when the connection failed).
        headers: Response headers (case-insensitive mapping).
        text: Response body.
        request_id: The X-Request-ID that was sent.
        variant: The variant that was asked for.
        n_texts: How many texts were sent.

    Returns:
        ``None`` when the response is right, else a short description for the failure table.
    """
    if status == 429:
        return None if headers.get("retry-after") else "429 without Retry-After"
    if status != 200:
        error_type = "no body"
        try:
            error_type = json.loads(text or "")["error_type"]
        except (ValueError, KeyError, TypeError):
            pass
        return f"HTTP {status}: {error_type}"
    if headers.get("x-request-id") != request_id:
        return "x-request-id not echoed"
    try:
        body = json.loads(text or "")
        results = body["results"]
        if body["variant"] != variant:
            return f"asked for {variant}, answered by {body['variant']}"
        if len(results) != n_texts:
            return f"{len(results)} results for {n_texts} texts"
        for r in results:
            probs = r["probabilities"]
            if r["label"] not in probs or not 0.0 <= r["score"] <= 1.0 or abs(sum(probs.values()) - 1.0) > 1e-3:
                return "inconsistent result"
    except (ValueError, KeyError, TypeError):
        return "malformed 200 body"
    return None


# ------------------------------------------------------------------------------------------------ thresholds


def served_stats(environment) -> StatsEntry:
    """All requests except the shed ones, merged into one entry (for the P99 and the error rate)."""
    merged = StatsEntry(environment.stats, "served", "")
    for entry in environment.stats.entries.values():
        if not entry.name.endswith(SHED_SUFFIX):
            merged.extend(entry)
    return merged


def threshold_misses(environment) -> list[str]:
    """The pass/fail verdict of a run.

    Args:
        environment: The locust environment after the run.

    Returns:
        One line per missed threshold; empty when the run passed.
    """
    options = environment.parsed_options
    total = environment.stats.total.num_requests
    served = served_stats(environment)
    if total == 0 or served.num_requests - served.num_failures == 0:
        return ["no request was answered"]
    misses = []
    error_rate = served.num_failures / total
    if error_rate > options.max_error_rate:
        misses.append(f"error rate {error_rate:.4f} > {options.max_error_rate}")
    p99 = served.get_response_time_percentile(0.99)
    if p99 > options.max_p99_ms:
        misses.append(f"P99 {p99} ms > {options.max_p99_ms} ms")
    return misses


# ------------------------------------------------------------------------------------------------ server side

_SAMPLE = re.compile(r"^(gateway_\w+?)_(bucket|sum|count)\{(.*)\}\s+(\S+)$")
_LE = re.compile(r'le="([^"]+)"')
_OPERATION = re.compile(r'operation="([^"]+)"')
SERVER_HISTOGRAMS = ("gateway_request_duration_seconds", "gateway_queue_wait_seconds", "gateway_batch_size")


def scrape_histograms(host: str) -> dict[str, dict[float | str, float]] | None:
    """Cumulative buckets, sum and count of the gateway histograms we report, summed over variants.

    Only classify requests count where the histogram has an ``operation`` label (so the scrapes of /metrics
    themselves and probes are left out).

    Args:
        host: Base URL of the gateway.

    Returns:
        ``{metric: {upper bound: cumulative count, "sum": ..., "count": ...}}``, or ``None`` when /metrics cannot
        be read.
    """
    try:
        with urllib.request.urlopen(f"{host.rstrip('/')}/metrics", timeout=10) as r:
            text = r.read().decode()
    except (OSError, urllib.error.URLError):
        return None
    out: dict[str, dict[float | str, float]] = {m: {} for m in SERVER_HISTOGRAMS}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) not in out:
            continue
        operation = _OPERATION.search(m.group(3))
        if operation and operation.group(1) != "classify":
            continue
        key: float | str = float(_LE.search(m.group(3)).group(1)) if m.group(2) == "bucket" else m.group(2)  # type: ignore[union-attr]
        out[m.group(1)][key] = out[m.group(1)].get(key, 0.0) + float(m.group(4))
    return out


def bucket_quantile(q: float, before: dict, after: dict) -> float | None:
    """``histogram_quantile`` over the increase of cumulative buckets between two scrapes.

    Args:
        q: The quantile (0..1).
        before: Buckets at the start of the run.
        after: Buckets at the end.

    Returns:
        The interpolated quantile, or ``None`` without observations.
    """
    bounds = sorted(b for b in after if not isinstance(b, str))
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, cum in zip(bounds, counts, strict=False):
        if cum >= rank:
            if math.isinf(bound):
                return lower  # Prometheus answers the highest finite bound in this case, too
            return lower + (bound - lower) * ((rank - below) / (cum - below) if cum > below else 1.0)
        lower, below = bound, cum
    return lower


_first_scrape: dict[str, dict] | None = None


@events.test_start.add_listener
def _scrape_at_start(environment, **_kw) -> None:
    global _first_scrape  # one run per process: locust fires test_start once per run
    if not isinstance(environment.runner, WorkerRunner) and environment.host:
        _first_scrape = scrape_histograms(environment.host)


def server_summary(environment) -> dict | None:
    """The gateway's own view of the run, from the increase of its histograms since test start."""
    if _first_scrape is None or not environment.host:
        return None
    last = scrape_histograms(environment.host)
    if last is None:
        return None
    first = _first_scrape

    def grew(metric: str, key: str) -> float:
        return last[metric].get(key, 0.0) - first[metric].get(key, 0.0)

    summary: dict[str, float | None] = {"requests": grew("gateway_request_duration_seconds", "count")}
    for metric in ("gateway_request_duration_seconds", "gateway_queue_wait_seconds"):
        short = metric.removeprefix("gateway_").removesuffix("_seconds")
        for q in (0.5, 0.99):
            v = bucket_quantile(q, first[metric], last[metric])
            summary[f"{short}_p{round(q * 100)}_ms"] = None if v is None else round(v * 1000.0, 1)
    batches = grew("gateway_batch_size", "count")
    summary["batches"] = batches
    summary["mean_batch_size"] = round(grew("gateway_batch_size", "sum") / batches, 2) if batches else None
    return summary


@events.quitting.add_listener
def _verdict(environment, **_kw) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return  # the master holds the aggregated stats and decides
    options = environment.parsed_options
    served = served_stats(environment)
    client = {
        "requests": environment.stats.total.num_requests,
        "shed": environment.stats.total.num_requests - served.num_requests,
        "errors": served.num_failures,
        "p50_ms": served.get_response_time_percentile(0.5) if served.num_requests else None,
        "p99_ms": served.get_response_time_percentile(0.99) if served.num_requests else None,
    }
    log.info("client view (locust): %s", client)
    server = server_summary(environment)
    if server is not None:
        log.info("server view (gateway /metrics over the run): %s", server)
    misses = threshold_misses(environment)
    for miss in misses:
        log.error("threshold missed: %s", miss)
    prefix = getattr(options, "csv_prefix", None)
    if prefix:
        # Written after the last request, unlike locust's CSV files, which are refreshed on a timer.
        summary = {
            "client": client,
            "server": server,
            "misses": misses,
            "thresholds": {"max_error_rate": options.max_error_rate, "max_p99_ms": options.max_p99_ms},
        }
        Path(f"{prefix}_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    environment.process_exit_code = 1 if misses else 0
