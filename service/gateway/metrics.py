"""Every Prometheus metric of the gateway, defined once here.

Names follow Prometheus conventions: the ``gateway_`` prefix, base units in the name (``_seconds``), counters end in
``_total``, no colons. Labels are bounded: operations, protocols, variants, model names, status codes, reasons.
Request series are labelled by what was asked (``operation``) and how (``protocol``), not by URL, so a client that
switches from v1 REST to ``tritonclient`` over gRPC stays visible to the P99 the autoscaler reads.
The metrics live on a per-application ``CollectorRegistry`` (not the process-global one), so several apps can exist
in one process (tests) and nothing is created at import time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

#: Request latency buckets (seconds): fine below 100 ms, where the SLO lives, then coarse up to a minute.
REQUEST_DURATION_BUCKETS_SECONDS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
#: Queue-wait buckets (seconds): the wait is normally a few ms (max_wait_seconds) unless the backend is saturated.
QUEUE_WAIT_BUCKETS_SECONDS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
)
#: Backend call buckets (seconds).
BACKEND_DURATION_BUCKETS_SECONDS = REQUEST_DURATION_BUCKETS_SECONDS
#: Tokenization buckets (seconds): a batch of short texts takes well under a millisecond.
TOKENIZE_DURATION_BUCKETS_SECONDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
#: Batch-size buckets: powers of two, as TEI's batch histogram.
BATCH_SIZE_BUCKETS = tuple(float(2**i) for i in range(13))
#: Padded sequence length of a batch (tokens), powers of two.
BATCH_SEQUENCE_LENGTH_BUCKETS = tuple(float(2**i) for i in range(2, 12))

#: The only values of gateway_requests_rejected_total's ``reason`` label: predicted_late = refused at admission
#: because its predicted completion misses its deadline or the SLO (429), queue_full = refused by the count bound
#: (429), deadline = expired in the queue (504), client_disconnect = cancelled by the client, shutdown = failed by a
#: drain.
REJECT_REASONS = ("predicted_late", "queue_full", "deadline", "client_disconnect", "shutdown")
#: Buckets of the largest probability difference between a primary variant and its shadow, per text.
SHADOW_DIFFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
#: ``variant`` label of request-level series for routes that serve no variant (/metrics, probes, unknown variant).
NO_VARIANT = "none"
#: The only values of the ``operation`` label: what the request asked for. The recording rules, alerts and the HPA
#: read ``operation="classify"`` (every protocol together).
OPERATIONS = ("classify", "generate", "metadata", "health", "metrics", "other")
CLASSIFY = "classify"
#: The only values of the ``protocol`` label.
PROTOCOLS = ("rest_v1", "rest_v2", "grpc")


class GatewayMetrics:
    """The gateway's metric objects, registered on one registry.

    Args:
        registry: Where to register; a fresh one per application by default.
        version: Gateway version for gateway_build_info.
        git_sha: Build commit for gateway_build_info.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, version: str, git_sha: str) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        # ``variant`` is set by the classify route once the variant is known to be served (bounded), else "none";
        # it lets P99 be computed per precision variant from the _bucket series (the autoscaler's SLO guard).
        # ``code`` is the HTTP status, or for gRPC the HTTP status of the same outcome (OK = 200, a gateway error its
        # class's status, a cancelled call 499): one vocabulary for every protocol.
        self.requests_total = Counter(
            "gateway_requests",
            "Requests answered, by operation, protocol, variant and (HTTP-equivalent) status code.",
            ["operation", "protocol", "variant", "code"],
            registry=r,
        )
        self.request_duration_seconds = Histogram(
            "gateway_request_duration_seconds",
            "Time from request arrival to response start, by operation, protocol and variant.",
            ["operation", "protocol", "variant"],
            buckets=REQUEST_DURATION_BUCKETS_SECONDS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "gateway_queue_wait_seconds",
            "Time a text waited in the variant queue before its batch was formed.",
            ["variant"],
            buckets=QUEUE_WAIT_BUCKETS_SECONDS,
            registry=r,
        )
        self.batch_size = Histogram(
            "gateway_batch_size",
            "Rows per backend call (after dropping dead entries).",
            ["variant"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_sequence_length = Histogram(
            "gateway_batch_sequence_length",
            "Padded sequence length (tokens) of each batch sent to the backend.",
            ["variant"],
            buckets=BATCH_SEQUENCE_LENGTH_BUCKETS,
            registry=r,
        )
        self.tokenize_duration_seconds = Histogram(
            "gateway_tokenize_duration_seconds",
            "Time to tokenize and pad one batch.",
            ["variant"],
            buckets=TOKENIZE_DURATION_BUCKETS_SECONDS,
            registry=r,
        )
        self.backend_request_duration_seconds = Histogram(
            "gateway_backend_request_duration_seconds",
            "Duration of one backend (Triton) call, one per batch.",
            ["model"],
            buckets=BACKEND_DURATION_BUCKETS_SECONDS,
            registry=r,
        )
        self.backend_errors_total = Counter(
            "gateway_backend_errors",
            "Failed backend calls, by model and error_type of the resulting error.",
            ["model", "status"],
            registry=r,
        )
        self.queue_depth = Gauge("gateway_queue_depth", "Texts waiting in the variant queue.", ["variant"], registry=r)
        self.inflight_batches = Gauge(
            "gateway_inflight_batches", "Batches sent to the backend and not yet answered.", ["variant"], registry=r
        )
        self.requests_rejected_total = Counter(
            "gateway_requests_rejected",
            "Texts refused or dropped before inference, by reason.",
            ["reason"],
            registry=r,
        )
        # The service-time model each batcher learns online (docs/reliability.md): a batch of r texts padded to s
        # tokens is predicted to take intercept + per_token * r * s seconds.
        self.service_time_intercept_seconds = Gauge(
            "gateway_service_time_intercept_seconds",
            "Fixed cost of one batch in the learned service-time model.",
            ["variant"],
            registry=r,
        )
        self.service_time_per_token_seconds = Gauge(
            "gateway_service_time_per_token_seconds",
            "Cost of one padded token in the learned service-time model.",
            ["variant"],
            registry=r,
        )
        self.predicted_drain_seconds = Gauge(
            "gateway_predicted_drain_seconds",
            "Predicted time to finish the variant's in-flight and queued work (updated per batch and refusal).",
            ["variant"],
            registry=r,
        )
        self.admission_budget_scale = Gauge(
            "gateway_admission_budget_scale",
            "Share of the SLO budget admission currently grants (1 = the configured fraction; lowered while admitted "
            "requests answer later than the SLO, raised back while they answer well inside it).",
            ["variant"],
            registry=r,
        )
        self.backend_retries_total = Counter(
            "gateway_backend_retries",
            "Batches retried once after waiting out a backend outage.",
            ["variant"],
            registry=r,
        )
        # Shadow agreement: a sample of the primary variant's texts also classified by the shadow variant when both
        # are idle. A falling agreement ratio is the production signal of a bad quantized model.
        self.shadow_comparisons_total = Counter(
            "gateway_shadow_comparisons",
            "Texts classified by both a primary variant and its shadow.",
            ["primary", "shadow"],
            registry=r,
        )
        self.shadow_agreements_total = Counter(
            "gateway_shadow_agreements",
            "Shadow comparisons whose most probable labels were the same.",
            ["primary", "shadow"],
            registry=r,
        )
        self.shadow_probability_difference = Histogram(
            "gateway_shadow_probability_difference",
            "Largest absolute difference between the primary's and the shadow's class probabilities, per text.",
            ["primary", "shadow"],
            buckets=SHADOW_DIFFERENCE_BUCKETS,
            registry=r,
        )
        self.build_info = Gauge(
            "gateway_build_info",
            "Always 1; the labels carry the gateway version and build commit.",
            ["version", "git_sha"],
            registry=r,
        )
        self.build_info.labels(version=version, git_sha=git_sha).set(1)
        # Resource gauges, set by service.gateway.sampler.ResourceSampler in a background thread.
        self.process_cpu_utilization_ratio = Gauge(
            "gateway_process_cpu_utilization_ratio",
            "CPU time of the gateway process per wall-clock second over the last sampling interval (1 = one core).",
            registry=r,
        )
        self.host_cpu_utilization_ratio = Gauge(
            "gateway_host_cpu_utilization_ratio",
            "Busy fraction of all CPUs the gateway's kernel reports (/proc/stat) over the last sampling interval.",
            registry=r,
        )
        # GPU gauges are registered by the first GPU sample (set_gpu), so without a GPU not even their HELP/TYPE
        # lines appear: "no GPU" must never look like "idle GPU".
        self.gpu_utilization_ratio: Gauge | None = None
        self.gpu_memory_used_bytes: Gauge | None = None
        self.gpu_memory_total_bytes: Gauge | None = None
        # process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds, ...: the standard names every
        # Prometheus user knows, read from /proc at scrape time (cheap). Absent off Linux.
        ProcessCollector(registry=r)
        # Pre-create the bounded label values so the series exist (at 0) before the first event.
        for reason in REJECT_REASONS:
            self.requests_rejected_total.labels(reason=reason)

    def init_variant(self, variant: str, model: str) -> None:
        """Create the per-variant series at zero so dashboards and the HPA see them before traffic.

        Args:
            variant: The served variant.
            model: Its Triton model name.
        """
        self.queue_depth.labels(variant=variant).set(0)
        # Without a zero sample before the first request, a variant whose first traffic falls inside one scrape
        # interval has no rate() until its second burst: P99 would read "no data" for exactly the traffic we care
        # about.
        for protocol in PROTOCOLS:
            self.request_duration_seconds.labels(operation=CLASSIFY, protocol=protocol, variant=variant)
            self.requests_total.labels(operation=CLASSIFY, protocol=protocol, variant=variant, code="200")
        self.inflight_batches.labels(variant=variant).set(0)
        self.batch_size.labels(variant=variant)
        self.queue_wait_seconds.labels(variant=variant)
        self.backend_request_duration_seconds.labels(model=model)
        self.predicted_drain_seconds.labels(variant=variant).set(0)
        self.admission_budget_scale.labels(variant=variant).set(1)
        self.backend_retries_total.labels(variant=variant)

    def init_shadow(self, primary: str, shadow: str) -> None:
        """Create the shadow-agreement series of a variant pair at zero."""
        self.shadow_comparisons_total.labels(primary=primary, shadow=shadow)
        self.shadow_agreements_total.labels(primary=primary, shadow=shadow)
        self.shadow_probability_difference.labels(primary=primary, shadow=shadow)

    def observe_request(self, operation: str, protocol: str, variant: str | None, code: int, seconds: float) -> None:
        """Count one answered request and its latency (every transport records through here).

        Args:
            operation: One of :data:`OPERATIONS`.
            protocol: One of :data:`PROTOCOLS`.
            variant: The served variant, or None when there is none (probes, metadata, an unknown variant).
            code: The HTTP status, or the HTTP-equivalent status of a gRPC outcome.
            seconds: Arrival to response start.
        """
        v = variant or NO_VARIANT
        self.requests_total.labels(operation=operation, protocol=protocol, variant=v, code=str(code)).inc()
        self.request_duration_seconds.labels(operation=operation, protocol=protocol, variant=v).observe(seconds)

    def set_cpu(self, process_ratio: float | None, host_ratio: float | None) -> None:
        """Record a CPU sample; None (no previous sample yet, or no /proc) leaves the gauge unchanged.

        Args:
            process_ratio: Gateway process CPU seconds per second.
            host_ratio: Busy fraction of all host CPUs.
        """
        if process_ratio is not None:
            self.process_cpu_utilization_ratio.set(process_ratio)
        if host_ratio is not None:
            self.host_cpu_utilization_ratio.set(host_ratio)

    def set_gpu(self, index: str, utilization_ratio: float, used_bytes: float, total_bytes: float) -> None:
        """Record one GPU's NVML sample (called only when a GPU exists, so the series are absent otherwise).

        The first call registers the GPU gauges.

        Args:
            index: NVML device index (the ``gpu`` label).
            utilization_ratio: 0..1.
            used_bytes: Memory in use.
            total_bytes: Memory size.
        """
        if (
            self.gpu_utilization_ratio is None
            or self.gpu_memory_used_bytes is None
            or self.gpu_memory_total_bytes is None
        ):
            r = self.registry
            self.gpu_utilization_ratio = Gauge(
                "gateway_gpu_utilization_ratio",
                "Fraction of the last NVML sample period in which a kernel ran on the GPU. Absent without a GPU.",
                ["gpu"],
                registry=r,
            )
            self.gpu_memory_used_bytes = Gauge(
                "gateway_gpu_memory_used_bytes",
                "GPU device memory in use (NVML). Absent without a GPU.",
                ["gpu"],
                registry=r,
            )
            self.gpu_memory_total_bytes = Gauge(
                "gateway_gpu_memory_total_bytes",
                "GPU device memory size (NVML). Absent without a GPU.",
                ["gpu"],
                registry=r,
            )
        self.gpu_utilization_ratio.labels(gpu=index).set(utilization_ratio)
        self.gpu_memory_used_bytes.labels(gpu=index).set(used_bytes)
        self.gpu_memory_total_bytes.labels(gpu=index).set(total_bytes)

    def render(self) -> tuple[bytes, str]:
        """Return the text exposition of every metric and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# -- generation (issue 17, GEN agent): the series of POST /v1/generate (service/gateway/api/generate.py) -----------
# Request counts and latency stay in gateway_requests_total / gateway_request_duration_seconds with
# operation="generate"; these add what only streaming generation has. The variant label is a served generator
# variant (bounded).

#: Time to first token (seconds): arrival to the first generated token, prefill and queueing included.
TIME_TO_FIRST_TOKEN_BUCKETS_SECONDS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    10.0,
    30.0,
)
#: Inter-token latency (seconds): one decode iteration of the running batch, as a client sees it.
INTER_TOKEN_LATENCY_BUCKETS_SECONDS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
    2.5,
)
#: Decode speed of one generation (tokens per second after its first token).
TOKENS_PER_SECOND_BUCKETS = (
    1.0,
    2.0,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    50.0,
    75.0,
    100.0,
    150.0,
    200.0,
    300.0,
    500.0,
    1000.0,
)
#: Why a sequence's KV cache was freed before the model finished it.
EVICTION_REASONS = ("client_disconnect", "deadline", "stop_string", "shutdown")


class GenerationMetrics:
    """The generation series, registered on the gateway's registry.

    Args:
        registry: The application's registry (``GatewayMetrics.registry``).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.time_to_first_token_seconds = Histogram(
            "gateway_generate_time_to_first_token_seconds",
            "Arrival of a generation request to its first generated token.",
            ["variant"],
            buckets=TIME_TO_FIRST_TOKEN_BUCKETS_SECONDS,
            registry=r,
        )
        self.inter_token_latency_seconds = Histogram(
            "gateway_generate_inter_token_latency_seconds",
            "Time between consecutive tokens of one generation.",
            ["variant"],
            buckets=INTER_TOKEN_LATENCY_BUCKETS_SECONDS,
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "gateway_generate_tokens_per_second",
            "Decode speed of each finished generation: tokens after the first per second.",
            ["variant"],
            buckets=TOKENS_PER_SECOND_BUCKETS,
            registry=r,
        )
        self.tokens_total = Counter(
            "gateway_generate_tokens",
            "Tokens processed, by kind (prompt or completion).",
            ["variant", "kind"],
            registry=r,
        )
        self.kv_cache_bytes = Gauge(
            "gateway_generate_kv_cache_bytes",
            "KV-cache bytes in use in the model, as last reported.",
            ["variant"],
            registry=r,
        )
        self.kv_cache_budget_bytes = Gauge(
            "gateway_generate_kv_cache_budget_bytes",
            "The model's KV-cache budget (max_kv_cache_bytes).",
            ["variant"],
            registry=r,
        )
        self.active_sequences = Gauge(
            "gateway_generate_active_sequences",
            "Sequences holding a KV cache in the model, as last reported.",
            ["variant"],
            registry=r,
        )
        self.evictions_total = Counter(
            "gateway_generate_kv_cache_evictions",
            "Sequences whose KV cache the gateway had freed before they finished, by reason.",
            ["variant", "reason"],
            registry=r,
        )

    def init_variant(self, variant: str, budget_bytes: int) -> None:
        """Create the variant's series at zero before traffic."""
        self.time_to_first_token_seconds.labels(variant=variant)
        self.inter_token_latency_seconds.labels(variant=variant)
        self.tokens_per_second.labels(variant=variant)
        for kind in ("prompt", "completion"):
            self.tokens_total.labels(variant=variant, kind=kind)
        self.kv_cache_bytes.labels(variant=variant).set(0)
        self.kv_cache_budget_bytes.labels(variant=variant).set(budget_bytes)
        self.active_sequences.labels(variant=variant).set(0)
        for reason in EVICTION_REASONS:
            self.evictions_total.labels(variant=variant, reason=reason)
