"""Gateway settings: one pydantic-settings object, built once at start-up and passed down explicitly.

Every field is read from an environment variable with the prefix ``GATEWAY_``; nested groups use ``__``
(``GATEWAY_BATCH__MAX_BATCH_SIZE=32``, ``GATEWAY_TRITON__GRPC_URL=127.0.0.1:8001``). Durations are in seconds and
sizes in bytes or counts, and the unit is part of every name. Validation happens here, at start-up, so a bad value
stops the process with a message that names the setting and the value instead of failing a request later.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.triton import repository

_VARIANT_RE = re.compile(r"^[a-z0-9][a-z0-9_]{0,31}$")


class BatchSettings(BaseModel):
    """Dynamic batching limits, applied per served variant (each variant has its own queue and batcher)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    max_batch_size: int = Field(32, ge=1, le=4096)
    """Most rows (texts) in one backend call. Must not exceed the Triton model's own max_batch_size."""

    max_wait_seconds: float = Field(0.005, ge=0.0, le=10.0)
    """How long the oldest queued text may wait for companions before a partial batch is sent (only while another
    batch of the variant is in flight, unless ``flush_when_idle`` is off)."""

    flush_when_idle: bool = True
    """Send at once, without waiting ``max_wait_seconds``, when no batch of the variant is in flight: an idle
    backend gains nothing from the wait, so a lone request pays no batching delay; under load batches are in
    flight and the wait gathers companions as usual."""

    max_queue_size: int = Field(4096, ge=1, le=1_000_000)
    """Most texts waiting per variant: a memory guard only (admission is by predicted completion, see
    ``slo_p99_seconds``); beyond it requests are refused with 429 and Retry-After."""

    max_inflight_batches: int = Field(2, ge=1, le=64)
    """Most batches of one variant sent to the backend and not yet answered (the next one forms meanwhile)."""

    max_batch_tokens: int = Field(8192, ge=1, le=10_000_000)
    """Padded-token budget of one batch (rows x longest sequence); caps padding work as TEI's max_batch_tokens."""

    length_bucket_edges: Annotated[tuple[int, ...], NoDecode] = (16, 32, 64, 128, 256)
    """Upper edges (in estimated tokens) of the length buckets; a batch only holds texts of one bucket, so short
    texts are never padded to long ones. Comma-separated in the environment, e.g. ``16,32,64``."""

    tokenize_in_thread: bool = True
    """Tokenize each batch in a worker thread (the tokenizers library releases the GIL) to keep the event loop
    free for accepting requests while a batch is encoded."""

    @field_validator("length_bucket_edges", mode="before")
    @classmethod
    def _split_edges(cls, value: object) -> object:
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip()]
            try:
                return tuple(int(p) for p in parts)
            except ValueError:
                raise ValueError(f"length_bucket_edges must be comma-separated integers, got {value!r}") from None
        return value

    @field_validator("length_bucket_edges")
    @classmethod
    def _check_edges(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(e < 1 for e in value) or list(value) != sorted(set(value)):
            raise ValueError(f"length_bucket_edges must be strictly increasing positive integers, got {value!r}")
        return value


class ShadowSettings(BaseModel):
    """Shadow agreement: a sample of the primary variant's texts is also classified by the shadow variant, only when
    both are idle, and the agreement is exported (gateway_shadow_*); the way to catch a bad quantized model in
    production."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    fraction: float = Field(0.01, ge=0.0, le=1.0)
    """Share of the primary variant's requests also sent to the shadow (0 turns it off). A sampled request is
    only shadowed when neither variant has work queued or in flight, so real requests are never delayed."""

    primary: str = "int8"
    """The variant whose answers are checked (usually the quantized one)."""

    shadow: str = "fp16"
    """The reference variant it is compared with."""


class TritonSettings(BaseModel):
    """Where Triton is and how the gateway talks to it."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    grpc_url: str = "127.0.0.1:8001"
    """Triton's gRPC endpoint, host:port (no scheme). Replaced by the embedded server's URL with --embedded-triton."""

    model_repository: Path = Path("model_repository")
    """The model repository the gateway reads tokenizer.json and labels.json from (the one Triton serves)."""

    model_name_prefix: str = Field("classifier", pattern=r"^[A-Za-z0-9_\-]+$")
    """Triton model name of a variant is ``<prefix>_<variant>`` (the model repository contract)."""

    model_version: int | None = Field(None, ge=1)
    """Pin one model version for every variant; unset means the highest version directory in the repository.
    The gateway asks Triton for exactly that version, so tokenizer and weights always match."""

    client_timeout_seconds: float = Field(10.0, gt=0.0, le=600.0)
    """gRPC client timeout of one inference call (one batch)."""

    health_timeout_seconds: float = Field(2.0, gt=0.0, le=60.0)
    """gRPC client timeout of the readiness checks behind /readyz."""

    startup_timeout_seconds: float = Field(120.0, gt=0.0, le=3600.0)
    """How long start-up waits for Triton and its models to become ready (embedded or external)."""

    reconnect_backoff_max_seconds: float = Field(1.0, gt=0.0, le=120.0)
    """Longest gRPC reconnect backoff towards Triton. gRPC's default grows to 120 s, which would keep the gateway
    failing for minutes after a restarted Triton is back; 1 s bounds the recovery delay."""

    restart_embedded: bool = True
    """With --embedded-triton: restart tritonserver (same ports) when it exits unexpectedly. In Kubernetes the
    kubelet restarts the Triton container instead."""

    restart_backoff_max_seconds: float = Field(10.0, gt=0.0, le=600.0)
    """With --embedded-triton: the longest pause between restart attempts (it doubles from 0.5 s per failure)."""

    @field_validator("grpc_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if "://" in value or not re.match(r"^[^:/\s]+:\d{1,5}$", value):
            raise ValueError(f"grpc_url must be host:port without a scheme, got {value!r}")
        return value


class GenerationSettings(BaseModel):
    """Text generation (``POST /v1/generate`` and gRPC ``ModelStreamInfer``; issue 17): ``GATEWAY_GENERATE__*``."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    enabled: bool = False
    """Serve ``POST /v1/generate``; the generator models must then be in the model repository and in Triton."""

    variants: Annotated[tuple[str, ...], NoDecode] = ("fp32",)
    """Generator variants served (comma-separated); each is the Triton model ``<model_name_prefix>_<variant>``."""

    default_variant: str = "fp32"
    """Variant used when a request names none."""

    model_name_prefix: str = Field("generator", pattern=r"^[A-Za-z0-9_\-]+$")
    """Triton model name prefix of the generator models."""

    max_new_tokens: int = Field(512, ge=1, le=32_768)
    """Largest ``max_new_tokens`` a request may ask for (the model's own limit applies too)."""

    default_max_new_tokens: int = Field(64, ge=1, le=32_768)
    """``max_new_tokens`` of a request that gives none."""

    max_prompt_chars: int = Field(20_000, ge=1, le=10_000_000)
    """Longest prompt (or sum of chat message contents) in characters; longer gives 413."""

    max_messages: int = Field(64, ge=1, le=10_000)
    """Most chat messages in one request."""

    max_stop_strings: int = Field(4, ge=0, le=64)
    """Most stop strings in one request."""

    max_stop_chars: int = Field(64, ge=1, le=4096)
    """Longest stop string in characters."""

    max_streams: int = Field(64, ge=1, le=100_000)
    """Most generations in flight in this gateway (over all variants); beyond it requests get 429 at once."""

    request_timeout_seconds: float = Field(120.0, gt=0.0, le=3600.0)
    """Server-side deadline of a whole generation; a client deadline (body or header) can only shorten it."""

    @field_validator("variants", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(p.strip() for p in value.split(",") if p.strip())
        return value

    @model_validator(mode="after")
    def _check(self) -> GenerationSettings:
        if not self.variants:
            raise ValueError("generate variants must name at least one variant")
        if self.default_variant not in self.variants:
            raise ValueError(f"generate default_variant ({self.default_variant!r}) is not in {list(self.variants)}")
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"generate default_max_new_tokens ({self.default_max_new_tokens}) > max_new_tokens "
                f"({self.max_new_tokens})"
            )
        return self


class Settings(BaseSettings):
    """All gateway settings (env prefix ``GATEWAY_``, nested delimiter ``__``)."""

    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_",
        env_nested_delimiter="__",
        extra="forbid",
        use_attribute_docstrings=True,
        # Errors must not echo inputs: GATEWAY_API_KEYS is one of them. Our validators name the offending values
        # themselves where that is safe.
        hide_input_in_errors=True,
    )

    host: str = "127.0.0.1"
    """Address uvicorn binds. Loopback by default; set 0.0.0.0 only inside a container."""

    port: int = Field(8000, ge=0, le=65535)
    """HTTP port (0 picks a free one)."""

    grpc_port: int = Field(9001, ge=-1, le=65535)
    """Port of the Open Inference Protocol (v2) gRPC server, bound on ``host``; 0 picks a free one, -1 turns gRPC
    off. Not Triton's 8001: the gateway and Triton share a pod."""

    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    """API keys (comma-separated, each at least 16 characters). Empty (the default) turns authentication off.
    When set, every route except health, readiness and /metrics needs ``Authorization: Bearer <key>`` or
    ``x-api-key: <key>`` (gRPC: the same metadata); a missing key gives 401, a wrong one 403."""

    variants: Annotated[tuple[str, ...], NoDecode] = ("int8", "fp16")
    """Precision variants served (comma-separated in the environment). Each is the Triton model
    ``<model_name_prefix>_<variant>``."""

    default_variant: str = "int8"
    """Variant used when a request names none. INT8 is the fast one on CPU; FP16 is the GPU choice."""

    max_client_batch_size: int = Field(64, ge=1, le=10_000)
    """Most texts in one request; more gives 413."""

    max_body_bytes: int = Field(1_048_576, ge=256, le=1 << 30)
    """Largest accepted request body; larger gives 413."""

    max_text_chars: int = Field(20_000, ge=1, le=10_000_000)
    """Longest accepted text in characters (texts are truncated to the model's max_length tokens anyway; this only
    bounds the work spent tokenizing); longer gives 413."""

    request_timeout_seconds: float = Field(30.0, gt=0.0, le=3600.0)
    """Server-side deadline of a request when the client sends none; a client deadline can only shorten it."""

    retry_after_seconds: int = Field(1, ge=0, le=3600)
    """Smallest Retry-After of a 429; the value sent is the predicted drain time, clamped to 1-10 s."""

    slo_p99_seconds: float = Field(0.2, ge=0.0, le=600.0)
    """Latency target of admitted requests (the reference text's rule: P99 <= 200 ms). A request is admitted only
    if its predicted completion fits both its deadline and ``slo_admission_fraction`` of this target; otherwise 429
    at once. 0 admits by deadline only."""

    slo_p99_seconds_by_variant: dict[str, float] = Field(default_factory=dict)
    """Per-variant overrides of ``slo_p99_seconds`` as JSON, e.g. ``{"fp16": 0.5}``."""

    slo_admission_fraction: float = Field(0.8, gt=0.0, le=1.0)
    """Share of the SLO the predicted queue-plus-batch time may use; the rest covers HTTP, tokenization and
    prediction error."""

    retry_on_unavailable: bool = True
    """When a batch fails because Triton is unavailable (restarting), wait for it (bounded by the batch's
    deadlines) and retry the batch once; 503 only when the deadline does not allow waiting."""

    drain_grace_seconds: float = Field(1.0, ge=0.0, le=600.0)
    """After SIGTERM, how long /readyz reports not ready (and new requests get 503) before the listener closes,
    so a load balancer stops routing here first."""

    drain_timeout_seconds: float = Field(30.0, gt=0.0, le=3600.0)
    """After the listener closes, the longest wait for accepted requests and queued batches to finish."""

    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    """Log level of the gateway and uvicorn."""

    access_log: bool = False
    """Log one line per HTTP request (uvicorn's access log). Off by default: at hundreds of requests per second the
    formatting and writing costs a measurable share of the event loop's CPU, and the metrics already count every
    request by route and status code."""

    fast_classify: bool = True
    """Serve well-formed ``POST /v1/classify`` requests on a lean ASGI path (orjson, no per-request pydantic
    models); anything it is not certain is valid goes to the FastAPI route, so answers and errors are the same.
    Off: every request takes the FastAPI route (for comparison; docs/benchmarks.md)."""

    resource_sample_interval_seconds: float = Field(5.0, gt=0.0, le=3600.0)
    """How often a background thread samples CPU utilization and, when NVML sees a GPU, GPU utilization and
    memory into the gateway_*_cpu_* and gateway_gpu_* gauges (never on the request path)."""

    build_git_sha: str = Field("unknown", max_length=64)
    """Git commit of this build, exported in gateway_build_info (set by the image build)."""

    batch: BatchSettings = Field(default_factory=BatchSettings)
    """Dynamic batching (GATEWAY_BATCH__*)."""

    triton: TritonSettings = Field(default_factory=TritonSettings)
    """Triton connection and model repository (GATEWAY_TRITON__*)."""

    shadow: ShadowSettings = Field(default_factory=ShadowSettings)
    """Shadow agreement between two variants (GATEWAY_SHADOW__*)."""

    generate: GenerationSettings = Field(default_factory=GenerationSettings)
    """Text generation with the generator models, off by default (GATEWAY_GENERATE__*)."""

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(p.strip() for p in value.split(",") if p.strip())
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for i, key in enumerate(value):
            text = key.get_secret_value()
            # Never echo a key in the message, only its position.
            if len(text) < 16 or not text.isprintable() or any(c.isspace() or c == "," for c in text):
                raise ValueError(f"api key #{i + 1} must be at least 16 printable characters without spaces or commas")
        return value

    @field_validator("variants", mode="before")
    @classmethod
    def _split_variants(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(p.strip() for p in value.split(",") if p.strip())
        return value

    @field_validator("variants")
    @classmethod
    def _check_variants(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("variants must name at least one variant, got an empty list")
        for v in value:
            if not _VARIANT_RE.match(v):
                raise ValueError(f"variant names are lower-case letters, digits and '_', got {v!r}")
        if len(set(value)) != len(value):
            raise ValueError(f"variants must not repeat, got {value!r}")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        if self.default_variant not in self.variants:
            raise ValueError(
                f"default_variant ({self.default_variant!r}) is not one of the served variants {list(self.variants)}"
            )
        if self.max_client_batch_size > self.batch.max_queue_size:
            raise ValueError(
                f"max_client_batch_size ({self.max_client_batch_size}) > batch.max_queue_size "
                f"({self.batch.max_queue_size}): such a request could never be admitted"
            )
        unknown = sorted(set(self.slo_p99_seconds_by_variant) - set(self.variants))
        if unknown:
            raise ValueError(f"slo_p99_seconds_by_variant names variants that are not served: {unknown}")
        if any(not 0 < v <= 600 for v in self.slo_p99_seconds_by_variant.values()):
            raise ValueError(
                f"slo_p99_seconds_by_variant values must be in (0, 600], got {self.slo_p99_seconds_by_variant}"
            )
        if self.grpc_port > 0 and self.grpc_port == self.port:
            raise ValueError(f"grpc_port ({self.grpc_port}) equals port ({self.port}); they need different ports")
        return self

    def slo_seconds(self, variant: str) -> float | None:
        """The latency target of ``variant`` (its override, else ``slo_p99_seconds``)."""
        value = self.slo_p99_seconds_by_variant.get(variant, self.slo_p99_seconds)
        return value or None

    def shadow_pair(self) -> tuple[str, str] | None:
        """``(primary, shadow)`` when shadow agreement is on and both variants are served, else None."""
        sh = self.shadow
        if sh.fraction <= 0 or sh.primary == sh.shadow:
            return None
        if sh.primary not in self.variants or sh.shadow not in self.variants:
            return None
        return sh.primary, sh.shadow

    def model_name(self, variant: str) -> str:
        """Return the Triton model name serving ``variant``.

        Args:
            variant: A served variant such as ``"int8"``.

        Returns:
            ``<model_name_prefix>_<variant>``.
        """
        return repository.model_name(variant, self.triton.model_name_prefix)
