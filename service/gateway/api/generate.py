"""``POST /v1/generate``: text generation with the generator models, streamed as server-sent events or whole.

Where a generation goes::

    validated   this module     (prompt or chat messages, limits, sampling values, stop strings, deadline)
    tokenized   this module     (the tokenizer.json published beside the model; ChatML for chat messages)
    admitted    the gateway's stream limit here (429), then the model's KV-cache budget (429)
    generated   service/generator/triton_model.py inside Triton (continuous batching, one response per token)
    streamed    backend/generator.py (one gRPC stream per generation) -> detokenized, stop strings -> SSE / JSON

Errors before the first token get the gateway's usual status and body (``{"error", "error_type"}``): the route
waits for the first token before it answers, so a full KV cache is a real 429 and a bad request a real 422 even
when streaming. An error after the first token (the deadline, a backend failure) ends an SSE stream with an
``event: error`` whose data has the same two fields.

Cancellation: when the client disconnects, the deadline passes or a stop string matches, the gRPC stream to
Triton is cancelled, and the model frees the sequence's KV cache at its next iteration.

Settings are the gateway Settings' nested ``generate`` group (``GATEWAY_GENERATE__*`` environment variables,
:class:`service.gateway.settings.GenerationSettings`); generation is off unless ``GATEWAY_GENERATE__ENABLED=1``. The route is always in the OpenAPI document; while off it answers 404.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.gateway.api.http_common import DEADLINE_HEADER, wait_disconnect
from service.gateway.api.schemas import ErrorResponse
from service.gateway.backend.generator import GenerateParams, GeneratorClient, GeneratorStream, TokenEvent
from service.gateway.errors import (
    BackendUnavailable,
    ClientClosedRequest,
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
)
from service.gateway.metrics import GenerationMetrics
from service.gateway.settings import GenerationSettings

logger = logging.getLogger("service.gateway.generate")

GENERATE_PATH = "/v1/generate"
#: Route template -> ``operation`` label of the request metrics (merged into app.ROUTE_OPERATIONS).
OPERATIONS = {GENERATE_PATH: "generate"}
SSE_MEDIA_TYPE = "text/event-stream"
#: After a generation ended early (cancelled), how long the KV-cache gauges keep being re-read from the model.
_REFRESH_AFTER_CANCEL_SECONDS = 2.0


# -- request and response schemas -----------------------------------------------------------------------------


class ChatMessage(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(BaseModel):
    """A generation request: exactly one of ``prompt`` (raw text to continue) or ``messages`` (chat)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, description="Raw text to continue (no chat template).")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, description="Chat turns; rendered with the model's chat format (ChatML for SmolLM2)."
    )
    max_new_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (default: the server's).")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (with temperature > 0).")
    seed: int | None = Field(None, ge=0, le=2**62, description="Seed of the sampler: same seed, same tokens.")
    stop: list[str] = Field(default_factory=list, description="Generation ends before the first of these strings.")
    stream: bool = Field(False, description="Stream server-sent events (text/event-stream) instead of one JSON.")
    variant: str | None = Field(None, description="Generator variant (default: the server's).")
    timeout_seconds: float | None = Field(None, gt=0.0, le=3600.0, description="Client deadline of the generation.")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token (benchmarks).")

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class GenerateUsage(BaseModel):
    """Token counts of one generation."""

    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    """The whole generation (non-streaming form; the last SSE event carries the same fields)."""

    text: str
    finish_reason: Literal["eos", "stop", "length"]
    model: str
    variant: str
    usage: GenerateUsage
    time_to_first_token_seconds: float


# -- the service ----------------------------------------------------------------------------------------------


@dataclass
class GeneratorModel:
    """One served generator variant.

    Attributes:
        variant: The variant name.
        model_name: Triton model name.
        version_dir: Its version directory (tokenizer and generation.json).
        tokenizer: A ``tokenizers.Tokenizer``.
        meta: ``generation.json``.
        max_context_tokens: Prompt + new tokens limit (the model config's, else generation.json's).
        max_new_tokens: The model config's ``max_new_tokens_limit``.
        kv_budget_bytes: The model config's ``max_kv_cache_bytes``.
    """

    variant: str
    model_name: str
    version_dir: Path
    tokenizer: Any
    meta: dict[str, Any]
    max_context_tokens: int
    max_new_tokens: int
    kv_budget_bytes: int
    special_ids: frozenset[int] = field(default_factory=frozenset)


def _version_dir(model_dir: Path, pinned: int | None) -> Path:
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise RuntimeError(f"{model_dir} has no version directory")
    version = pinned if pinned is not None else versions[-1]
    if version not in versions:
        raise RuntimeError(f"{model_dir} has no version {version} (has {versions})")
    return model_dir / str(version)


def load_generator_model(repository: Path, prefix: str, variant: str, pinned: int | None) -> GeneratorModel:
    """Read a generator's tokenizer, ``generation.json`` and config limits from the model repository.

    Raises:
        RuntimeError: Missing files.
    """
    from tokenizers import Tokenizer

    from service.triton.model_config import load_model_config

    name = f"{prefix}_{variant}"
    model_dir = Path(repository) / name
    if not (model_dir / "config.pbtxt").is_file():
        raise RuntimeError(f"{model_dir}/config.pbtxt is missing; run python -m service.modelprep build-generator")
    version_dir = _version_dir(model_dir, pinned)
    meta = json.loads((version_dir / "generation.json").read_text())
    tokenizer = Tokenizer.from_file(str(version_dir / "tokenizer.json"))
    params = load_model_config(model_dir).parameters

    def param(key: str, default: int) -> int:
        return int(params[key].string_value) if key in params else default

    special = {int(t) for t in meta.get("eos_token_ids", [])}
    special.update(
        tokenizer.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>") if tokenizer.token_to_id(t) is not None
    )
    return GeneratorModel(
        variant=variant,
        model_name=name,
        version_dir=version_dir,
        tokenizer=tokenizer,
        meta=meta,
        max_context_tokens=min(param("max_context_tokens", meta["max_context_tokens"]), meta["max_context_tokens"]),
        max_new_tokens=param("max_new_tokens_limit", 512),
        kv_budget_bytes=param("max_kv_cache_bytes", 0),
        special_ids=frozenset(special),
    )


def render_chatml(messages: Sequence[ChatMessage], default_system_prompt: str) -> str:
    """ChatML as SmolLM2's chat template writes it: a default system turn first, the assistant turn left open."""
    parts = []
    if not messages or messages[0].role != "system":
        parts.append(f"<|im_start|>system\n{default_system_prompt}<|im_end|>\n")
    parts.extend(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
    parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could still become a stop string (not streamed yet)."""
    keep = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                keep = max(keep, n)
                break
    return keep


@dataclass
class Delta:
    """New text of a running generation."""

    text: str
    token_ids: list[int]
    """The tokens since the previous delta (text can be held back for a few tokens)."""


@dataclass
class Finished:
    """The end of a generation."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_seconds: float


class GenerationService:
    """Serves ``/v1/generate``: owns the generator models, the gRPC client and the stream limit.

    Args:
        settings: The gateway settings (Triton URL, repository, Retry-After, health timeout).
        generation: Generation settings (``settings.generate``).
        metrics: The application's metrics (its registry gets the generation series).
        runtime: The gateway runtime; the service attaches itself as ``runtime.generation``, which is how the gRPC
            ``ModelStreamInfer`` handler (:mod:`service.gateway.api.grpc_stream`) finds it.
    """

    def __init__(self, settings: Any, generation: GenerationSettings, metrics: Any, runtime: Any = None) -> None:
        self.settings = settings
        self.config = generation
        self.runtime = runtime
        if runtime is not None:
            runtime.generation = self
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        self._refresh_until: dict[str, float] = {}
        # Registered only when generation is on: a classify-only gateway exports exactly the classify set.
        self.metrics: GenerationMetrics | None = GenerationMetrics(metrics.registry) if generation.enabled else None
        self.models: dict[str, GeneratorModel] = {}
        self.client: GeneratorClient | None = None
        self.in_flight = 0
        self.started = False

    async def start(self) -> None:
        """Load the models' files and wait (bounded) for Triton to serve them; nothing when disabled.

        Raises:
            RuntimeError: Missing files or models not ready in time.
        """
        if not self.config.enabled:
            return
        from service.gateway.backend.triton import channel_args

        s = self.settings
        for variant in self.config.variants:
            model = load_generator_model(s.triton.model_repository, self.config.model_name_prefix, variant, None)
            self.models[variant] = model
            assert self.metrics is not None
            self.metrics.init_variant(variant, model.kv_budget_bytes)
        self.client = GeneratorClient(
            s.triton.grpc_url,
            channel_options=channel_args(s.triton),
            retry_after_seconds=s.retry_after_seconds,
            health_timeout_seconds=s.triton.health_timeout_seconds,
        )
        await self.client.start(
            [m.model_name for m in self.models.values()], timeout_seconds=s.triton.startup_timeout_seconds
        )
        for model in self.models.values():
            # The engine's own budget: a deployment may override the config's (LORASERVE_GENERATOR_* in Triton).
            stats = await self.client.stats(model.model_name)
            model.kv_budget_bytes = int(stats.get("max_kv_cache_bytes", model.kv_budget_bytes))
            self.metrics.kv_cache_budget_bytes.labels(variant=model.variant).set(model.kv_budget_bytes)
        self.started = True
        logger.info("generation ready: %s", [m.model_name for m in self.models.values()])

    async def stop(self) -> None:
        """Close the client (running streams end; the model frees their caches)."""
        self.started = False
        for task in self._refreshing.values():
            task.cancel()
        if self.client is not None:
            await self.client.aclose()

    # -- request checks --------------------------------------------------------------------------------------

    def resolve(self, variant: str | None) -> GeneratorModel:
        """The served model of ``variant``.

        Raises:
            ModelNotFound: Generation is off.
            InvalidInput: Unknown variant.
        """
        if not self.config.enabled:
            raise ModelNotFound("text generation is not enabled on this gateway (GATEWAY_GENERATE__ENABLED)")
        name = variant or self.config.default_variant
        model = self.models.get(name)
        if model is None:
            raise InvalidInput(f"unknown generator variant {name!r}; served variants: {', '.join(self.models)}")
        return model

    def prepare(self, body: GenerateRequest, model: GeneratorModel) -> tuple[list[int], GenerateParams]:
        """Validate the request against the limits and tokenize its prompt.

        Raises:
            InvalidInput: Empty prompt, bad stop strings, max_new_tokens over the limit, too many messages.
            PayloadTooLarge: A prompt over max_prompt_chars or over the model's context.
        """
        c = self.config
        if body.messages is not None:
            if len(body.messages) > c.max_messages:
                raise InvalidInput(f"{len(body.messages)} messages; the limit is {c.max_messages}")
            chars = sum(len(m.content) for m in body.messages)
            if not any(m.content.strip() for m in body.messages if m.role == "user"):
                raise InvalidInput("messages need at least one non-empty user message")
            text = render_chatml(body.messages, model.meta.get("default_system_prompt", ""))
        else:
            chars = len(body.prompt or "")
            if not (body.prompt or "").strip():
                raise InvalidInput("prompt is empty or only whitespace")
            text = body.prompt or ""
        if chars > c.max_prompt_chars:
            raise PayloadTooLarge(f"prompt has {chars} characters; the limit is {c.max_prompt_chars}")
        if len(body.stop) > c.max_stop_strings:
            raise InvalidInput(f"{len(body.stop)} stop strings; the limit is {c.max_stop_strings}")
        for i, stop in enumerate(body.stop):
            if not stop or len(stop) > c.max_stop_chars:
                raise InvalidInput(f"stop string {i} must have 1 to {c.max_stop_chars} characters")
        limit = min(c.max_new_tokens, model.max_new_tokens)
        max_new = body.max_new_tokens if body.max_new_tokens is not None else min(c.default_max_new_tokens, limit)
        if max_new > limit:
            raise InvalidInput(f"max_new_tokens ({max_new}) is over the limit of {limit}")
        ids = model.tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) + max_new > model.max_context_tokens:
            raise PayloadTooLarge(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new}) exceeds the context of "
                f"{model.max_context_tokens} tokens"
            )
        params = GenerateParams(
            max_new_tokens=max_new,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            ignore_eos=body.ignore_eos,
        )
        return ids, params

    # -- the generation --------------------------------------------------------------------------------------

    async def run(
        self,
        model: GeneratorModel,
        prompt_ids: list[int],
        params: GenerateParams,
        stops: Sequence[str],
        *,
        arrived: float,
        deadline: float,
        request_id: str,
    ) -> AsyncIterator[Delta | Finished]:
        """Generate, yielding text deltas and one final :class:`Finished` (an async generator).

        The first item is only yielded once the first token exists, so admission errors raise before anything
        was sent. Closing the generator early (client gone) cancels the backend stream.

        Raises:
            ServiceError: Admission, deadline or backend errors.
        """
        if self.client is None or not self.started:
            raise BackendUnavailable("text generation is starting or stopping; retry")
        if self.in_flight >= self.config.max_streams:
            raise Overloaded(
                f"{self.in_flight} generations in flight (limit {self.config.max_streams}); retry later",
                retry_after_seconds=self.settings.retry_after_seconds,
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("deadline passed before the generation started")
        m = self.metrics
        assert m is not None  # enabled: resolve() let the request through
        v = model.variant
        self.in_flight += 1
        stream: GeneratorStream = self.client.stream(
            model.model_name, prompt_ids, params, timeout_seconds=remaining, request_id=request_id
        )
        tokens: list[int] = []
        unsent: list[int] = []  # tokens whose text was held back (not yielded yet)
        sent = 0  # characters of the visible text already yielded
        first_at = last_at = 0.0
        reason = "length"
        ended_early: str | None = "client_disconnect"
        model_done = False
        text = ""
        try:
            event: TokenEvent
            async for event in stream:
                now = time.monotonic()
                if not tokens:
                    first_at = now
                    m.time_to_first_token_seconds.labels(variant=v).observe(now - arrived)
                    m.tokens_total.labels(variant=v, kind="prompt").inc(len(prompt_ids))
                else:
                    m.inter_token_latency_seconds.labels(variant=v).observe(now - last_at)
                last_at = now
                m.kv_cache_bytes.labels(variant=v).set(event.kv_cache_bytes)
                m.active_sequences.labels(variant=v).set(event.active_sequences)
                m.tokens_total.labels(variant=v, kind="completion").inc()
                tokens.append(event.token_id)
                visible = [t for t in tokens if t not in model.special_ids]
                text = model.tokenizer.decode(visible, skip_special_tokens=True)
                hit = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                if hit >= 0:
                    text = text[:hit]
                    reason = "stop"
                elif event.finish_reason:
                    reason = "eos" if event.finish_reason == "eos" else "length"
                model_done = bool(event.finish_reason)  # the model ended the sequence and freed its cache
                done = hit >= 0 or model_done
                # Hold back an incomplete UTF-8 sequence and anything that may still turn into a stop string.
                upto = len(text) if done else len(text) - held_back(text, stops)
                if not done and text.endswith("\ufffd"):
                    upto = min(upto, len(text) - 1)
                unsent.append(event.token_id)
                if upto > sent or (not tokens[:-1] and not done):
                    yield Delta(text[sent:upto], unsent)
                    sent = max(sent, upto)
                    unsent = []
                if done:
                    ended_early = "stop_string" if hit >= 0 and not event.finish_reason else None
                    break
            if not tokens:
                raise BackendUnavailable(f"model {model.model_name} ended the stream without a token")
            if len(tokens) > 1 and last_at > first_at:
                m.tokens_per_second.labels(variant=v).observe((len(tokens) - 1) / (last_at - first_at))
            yield Finished(text, reason, len(prompt_ids), len(tokens), first_at - arrived)
        except DeadlineExceeded:
            # Triton cancels the request when the gRPC deadline passes; the cache is freed before the end.
            ended_early = None
            m.evictions_total.labels(variant=v, reason="deadline").inc()
            raise
        except ServiceError:
            ended_early = None  # the model ended the sequence itself
            model_done = True
            raise
        finally:
            self.in_flight -= 1
            if not stream.finished:
                stream.cancel()
                if ended_early:
                    m.evictions_total.labels(variant=v, reason=ended_early).inc()
            if tokens:
                self._schedule_refresh(model, early=not model_done)

    def _schedule_refresh(self, model: GeneratorModel, *, early: bool) -> None:
        """Refresh the gauges from the model's totals now; after a cancellation, re-sample for a short while.

        A cancelled sequence's cache is freed at the engine's next iteration, which a read right after the cancel
        can precede; re-reading for :data:`_REFRESH_AFTER_CANCEL_SECONDS` (doubling pauses, one task per variant)
        lets the gauge return to the true value without waiting for the next generation.
        """
        v = model.variant
        running = v in self._refreshing and not self._refreshing[v].done()
        # A loop already running may be in its last read, begun before this generation ended: one more read then.
        extra = _REFRESH_AFTER_CANCEL_SECONDS if early else (0.05 if running else 0.0)
        self._refresh_until[v] = max(self._refresh_until.get(v, 0.0), time.monotonic() + extra)
        if not running:
            self._refreshing[v] = asyncio.ensure_future(self._refresh_loop(model))

    async def _refresh_loop(self, model: GeneratorModel) -> None:
        pause = 0.05
        await self._refresh(model)
        while time.monotonic() < self._refresh_until.get(model.variant, 0.0):
            await asyncio.sleep(pause)
            pause = min(2 * pause, 0.5)
            await self._refresh(model)

    async def _refresh(self, model: GeneratorModel) -> None:
        """Read the model's totals once a generation ended, so the gauges fall back when nothing runs."""
        if self.client is None or self.metrics is None:
            return
        try:
            stats = await self.client.stats(model.model_name)
        except (ServiceError, asyncio.CancelledError):
            return
        except Exception:
            logger.debug("generator stats refresh failed", exc_info=True)
            return
        self.metrics.kv_cache_bytes.labels(variant=model.variant).set(stats["kv_cache_bytes"])
        if "max_kv_cache_bytes" in stats:
            self.metrics.kv_cache_budget_bytes.labels(variant=model.variant).set(stats["max_kv_cache_bytes"])
        self.metrics.active_sequences.labels(variant=model.variant).set(stats["active_sequences"])


# -- the route ------------------------------------------------------------------------------------------------

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "Text generation is not enabled on this gateway."},
    413: {"model": ErrorResponse, "description": "Prompt over the character limit or the model's context."},
    422: {"model": ErrorResponse, "description": "Invalid input: empty prompt, sampling values, limits, variant."},
    429: {"model": ErrorResponse, "description": "Stream limit or KV-cache budget full; retry after Retry-After."},
    500: {"model": ErrorResponse, "description": "Internal error (no details are returned)."},
    502: {"model": ErrorResponse, "description": "Triton failed the request."},
    503: {"model": ErrorResponse, "description": "Triton or the model unavailable, or the gateway is draining."},
    504: {"model": ErrorResponse, "description": "The deadline passed before the first token."},
}
_OK = {
    "description": 'The generation (JSON), or with stream=true server-sent events: `data: {"text", '
    '"token_ids"}` per piece of text, then `data: {GenerateResponse fields}`, then `data: [DONE]`; an error after '
    'the first token is `event: error` with `data: {"error", "error_type"}`.',
    "content": {SSE_MEDIA_TYPE: {"schema": {"type": "string"}}},
}


def get_generation(request: Request) -> GenerationService:
    """The application's generation service."""
    service: GenerationService = request.app.state.generation
    return service


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"{head}data: {payload}\n\n".encode()


@router.post(
    GENERATE_PATH,
    response_model=GenerateResponse,
    responses={200: _OK, **_ERRORS},
    summary="Generate text (streamed as server-sent events, or whole)",
    description="Response headers: x-request-id, x-time-to-first-token and x-total-time (integer milliseconds).",
)
async def generate(
    body: GenerateRequest,
    request: Request,
    response: Response,
    x_deadline_ms: int | None = Header(
        None, alias=DEADLINE_HEADER, ge=1, le=3_600_000, description="Client deadline in milliseconds."
    ),
) -> Any:
    """Generate text with a generator variant.

    Raises:
        ServiceError: Rendered with the gateway's error shape and status.
    """
    arrived = time.monotonic()
    service = get_generation(request)
    runtime = request.app.state.runtime
    model = service.resolve(body.variant)
    request.state.call = _GenerateCall(model.variant)
    if runtime.draining:
        raise BackendUnavailable("gateway is draining; retry on another instance")
    prompt_ids, params = service.prepare(body, model)
    budget = service.config.request_timeout_seconds
    for client_budget in (body.timeout_seconds, None if x_deadline_ms is None else x_deadline_ms / 1000):
        if client_budget is not None:
            budget = min(budget, client_budget)
    request_id = getattr(request.state, "request_id", "")
    events = service.run(
        model, prompt_ids, params, body.stop, arrived=arrived, deadline=arrived + budget, request_id=request_id
    )

    def final_body(done: Finished) -> dict[str, Any]:
        return GenerateResponse(
            text=done.text,
            finish_reason=done.finish_reason,  # type: ignore[arg-type]
            model=model.model_name,
            variant=model.variant,
            usage=GenerateUsage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens),
            time_to_first_token_seconds=round(done.time_to_first_token_seconds, 6),
        ).model_dump()

    # The first item exists only once the first token does: admission errors surface here as HTTP statuses.
    first = await _first_or_disconnect(events, request)
    ttft_ms = str(round((time.monotonic() - arrived) * 1000))
    if not body.stream:
        done = first if isinstance(first, Finished) else await _rest_or_disconnect(events, request)
        response.headers["x-time-to-first-token"] = ttft_ms
        return final_body(done)

    async def sse() -> AsyncIterator[bytes]:
        try:
            item: Delta | Finished = first
            while True:
                if isinstance(item, Finished):
                    yield _sse(final_body(item))
                    yield _sse("[DONE]")
                    return
                yield _sse({"text": item.text, "token_ids": item.token_ids})
                item = await events.__anext__()
        except ServiceError as error:
            yield _sse({"error": error.message, "error_type": error.error_type}, event="error")
        finally:
            await events.aclose()  # client gone or error: cancels the backend stream, frees the cache

    return StreamingResponse(
        sse(),
        media_type=SSE_MEDIA_TYPE,
        headers={"x-time-to-first-token": ttft_ms, "cache-control": "no-cache", "x-accel-buffering": "no"},
    )


@dataclass
class _GenerateCall:
    """What the request-context middleware reads for the ``variant`` label (a served generator variant)."""

    variant: str | None = None


async def _first_or_disconnect(events: AsyncIterator[Delta | Finished], request: Request) -> Delta | Finished:
    try:
        return await _race(events.__anext__(), request)
    except BaseException:
        await events.aclose()  # type: ignore[attr-defined]
        raise


async def _rest_or_disconnect(events: AsyncIterator[Delta | Finished], request: Request) -> Finished:
    async def drain() -> Finished:
        async for item in events:
            if isinstance(item, Finished):
                return item
        raise BackendUnavailable("the generation ended without a result")

    try:
        return await _race(drain(), request)
    finally:
        await events.aclose()  # type: ignore[attr-defined]


async def _race(work: Any, request: Request) -> Any:
    """Await ``work`` unless the client disconnects first (then 499, never seen by the client)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientClosedRequest("client disconnected")
    except StopAsyncIteration:
        raise BackendUnavailable("the generation ended without a result") from None
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
