"""REST handlers: validate, submit to the variant's batcher, await, encode. No batching logic here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import APIRouter, Header, Request, Response

from service.gateway.api.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ClassResult,
    ErrorResponse,
    ModelInfo,
    ModelsResponse,
)
from service.gateway.batching.batcher import TextResult
from service.gateway.errors import (
    BackendUnavailable,
    DeadlineExceeded,
    InvalidInput,
    PayloadTooLarge,
    ServiceError,
)
from service.gateway.runtime import GatewayRuntime

router = APIRouter()

DEADLINE_HEADER = "x-deadline-ms"

_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorResponse, "description": "Too many texts, a text too long, or a body too large."},
    422: {"model": ErrorResponse, "description": "Invalid input, including an unknown variant."},
    429: {"model": ErrorResponse, "description": "Queue full; retry after the Retry-After header (seconds)."},
    500: {"model": ErrorResponse, "description": "Internal error (no details are returned)."},
    502: {"model": ErrorResponse, "description": "Triton failed the request."},
    503: {"model": ErrorResponse, "description": "Triton or the model unavailable, or the gateway is draining."},
    504: {"model": ErrorResponse, "description": "The deadline passed before an answer was ready."},
}


class ClientClosedRequest(ServiceError):
    """The client disconnected while waiting; recorded as 499 (nginx's convention) and never seen by the client."""

    status = 499
    error_type = "client_closed_request"


def get_runtime(request: Request) -> GatewayRuntime:
    """Return the application's runtime."""
    runtime: GatewayRuntime = request.app.state.runtime
    return runtime


async def _wait_disconnect(receive: Callable[[], Awaitable[MutableMapping[str, Any]]]) -> None:
    # The body is already read, so the next ASGI message is http.disconnect: it arrives when the client goes away
    # (or when the response is complete, by which time this task has been cancelled). No polling.
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return


async def _await_results(
    futures: list[asyncio.Future[TextResult]], deadline: float, request: Request
) -> list[TextResult]:
    gathered = asyncio.gather(*futures)
    disconnect = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait(
            {gathered, disconnect}, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
        )
        if gathered in done:
            return gathered.result()
        if disconnect in done:
            raise ClientClosedRequest("client disconnected")
        raise DeadlineExceeded("deadline passed before the answer was ready")
    finally:
        disconnect.cancel()
        if not gathered.done():
            # Cancelling the futures tells the batcher to drop still-queued texts (counted by reason).
            gathered.cancel()


@router.post(
    "/v1/classify",
    response_model=ClassifyResponse,
    responses=_ERRORS,
    summary="Classify one or several texts",
    description="Response headers: x-request-id (echoed or generated), and x-queue-time, x-inference-time, "
    "x-total-time in integer milliseconds.",
)
async def classify(
    body: ClassifyRequest,
    request: Request,
    response: Response,
    x_deadline_ms: int | None = Header(
        None, alias=DEADLINE_HEADER, ge=1, le=3_600_000, description="Client deadline in milliseconds."
    ),
) -> ClassifyResponse:
    """Classify texts with the requested precision variant.

    Args:
        body: The request.
        request: The raw request (for disconnect detection).
        response: Where the timing headers go.
        x_deadline_ms: Optional deadline header.

    Returns:
        One result per text, in order.
    """
    arrived = time.monotonic()
    runtime = get_runtime(request)
    settings = runtime.settings
    if runtime.draining:
        raise BackendUnavailable("gateway is draining; retry on another instance")
    texts = [body.text] if body.text is not None else list(body.texts or [])
    if len(texts) > settings.max_client_batch_size:
        raise PayloadTooLarge(f"{len(texts)} texts in one request; the limit is {settings.max_client_batch_size}")
    for i, t in enumerate(texts):
        if len(t) > settings.max_text_chars:
            raise PayloadTooLarge(f"text {i} has {len(t)} characters; the limit is {settings.max_text_chars}")
    variant = body.variant or settings.default_variant
    batcher = runtime.batchers.get(variant)
    if batcher is None:
        raise InvalidInput(f"unknown variant {variant!r}; served variants: {', '.join(runtime.batchers)}")
    request.state.variant = variant  # read by the metrics middleware: bounded, a served variant
    budget = settings.request_timeout_seconds
    for client_ms in (body.deadline_ms, x_deadline_ms):
        if client_ms is not None:
            budget = min(budget, client_ms / 1000.0)
    deadline = arrived + budget
    futures = batcher.submit(texts, deadline)
    results = await _await_results(futures, deadline, request)
    response.headers["x-queue-time"] = str(round(max(r.queue_seconds for r in results) * 1000))
    response.headers["x-inference-time"] = str(round(max(r.inference_seconds for r in results) * 1000))
    return ClassifyResponse(
        variant=variant,
        model=batcher.model.model_name,
        model_version=results[0].model_version,
        results=[ClassResult(label=r.label, score=r.score, probabilities=r.probabilities) for r in results],
    )


@router.get("/v1/models", response_model=ModelsResponse, summary="Served variants, labels, versions, limits")
async def list_models(request: Request) -> ModelsResponse:
    """Describe the served variants.

    Args:
        request: The request.

    Returns:
        Variants, their Triton model, version, labels and the batch limits.
    """
    runtime = get_runtime(request)
    s = runtime.settings
    return ModelsResponse(
        default_variant=s.default_variant,
        max_batch_size=s.batch.max_batch_size,
        max_client_batch_size=s.max_client_batch_size,
        models=[
            ModelInfo(variant=v, model=m.model_name, version=m.version, labels=list(m.labels),
                      max_length=m.max_length, server_max_batch_size=runtime.server_max_batch_sizes.get(m.model_name))
            for v, m in runtime.models.items()
        ],
    )  # fmt: skip


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of the gateway's metrics."""
    payload, content_type = get_runtime(request).metrics.render()
    return Response(payload, media_type=content_type)
