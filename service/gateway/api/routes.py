"""REST handlers: validate, submit to the variant's batcher, await, encode. No batching logic here."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Header, Request, Response

from service.gateway.api import inference
from service.gateway.api.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ClassResult,
    ErrorResponse,
    ModelInfo,
    ModelsResponse,
)
from service.gateway.errors import BackendUnavailable
from service.gateway.metrics import CLASSIFY_ROUTE
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


def get_runtime(request: Request) -> GatewayRuntime:
    """Return the application's runtime."""
    runtime: GatewayRuntime = request.app.state.runtime
    return runtime


@router.post(
    CLASSIFY_ROUTE,
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
    if runtime.draining:
        raise BackendUnavailable("gateway is draining; retry on another instance")
    texts = [body.text] if body.text is not None else list(body.texts or [])
    inference.check_texts(runtime, texts)
    batcher = inference.resolve_variant(runtime, body.variant)
    variant = batcher.model.variant
    request.state.variant = variant  # read by the metrics middleware: bounded, a served variant
    deadline = inference.deadline_from(
        runtime, arrived, *(None if ms is None else ms / 1000.0 for ms in (body.deadline_ms, x_deadline_ms))
    )
    done = await inference.classify(runtime, batcher, texts, deadline, inference.wait_disconnect(request.receive))
    results = done.results
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
            ModelInfo(
                variant=v,
                model=m.model_name,
                version=m.version,
                labels=list(m.labels),
                max_length=m.max_length,
                server_max_batch_size=runtime.server_max_batch_sizes.get(m.model_name),
            )
            for v, m in runtime.models.items()
        ],
    )


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of the gateway's metrics."""
    payload, content_type = get_runtime(request).metrics.render()
    return Response(payload, media_type=content_type)
