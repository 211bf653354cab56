"""v1 REST: ``POST /v1/classify``, ``GET /v1/models``, ``GET /metrics``. Decode, call the data plane, encode."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Header, Request, Response

from service.gateway.api.http_common import DEADLINE_HEADER, call_info, get_dataplane, wait_disconnect
from service.gateway.api.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ClassResult,
    ErrorResponse,
    ModelInfo,
    ModelsResponse,
    ServiceTimeInfo,
)

router = APIRouter()

CLASSIFY_PATH = "/v1/classify"
#: Route template -> ``operation`` label of the request metrics.
OPERATIONS = {CLASSIFY_PATH: "classify", "/v1/models": "metadata", "/metrics": "metrics"}

_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorResponse, "description": "Too many texts, a text too long, or a body too large."},
    422: {"model": ErrorResponse, "description": "Invalid input, including an unknown variant."},
    429: {"model": ErrorResponse, "description": "Queue full; retry after the Retry-After header (seconds)."},
    500: {"model": ErrorResponse, "description": "Internal error (no details are returned)."},
    502: {"model": ErrorResponse, "description": "Triton failed the request."},
    503: {"model": ErrorResponse, "description": "Triton or the model unavailable, or the gateway is draining."},
    504: {"model": ErrorResponse, "description": "The deadline passed before an answer was ready."},
}


@router.post(
    CLASSIFY_PATH,
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
    dataplane = get_dataplane(request)
    texts = [body.text] if body.text is not None else list(body.texts or [])
    budgets = (None if ms is None else ms / 1000.0 for ms in (body.deadline_ms, x_deadline_ms))
    done = await dataplane.classify(
        texts,
        variant=body.variant,
        deadline=dataplane.deadline(arrived, *budgets),
        disconnected=wait_disconnect(request),
        info=call_info(request),
    )
    response.headers["x-queue-time"] = str(round(done.queue_seconds * 1000))
    response.headers["x-inference-time"] = str(round(done.inference_seconds * 1000))
    labels = done.labels
    return ClassifyResponse(
        variant=done.variant,
        model=done.model,
        model_version=done.model_version,
        results=[
            ClassResult(label=label, score=score, probabilities=dict(zip(labels, row.tolist(), strict=True)))
            for (label, score), row in zip(done.best(), done.probabilities, strict=True)
        ],
    )


@router.get("/v1/models", response_model=ModelsResponse, summary="Served variants, labels, versions, limits")
async def list_models(request: Request) -> ModelsResponse:
    """Describe the served variants.

    Args:
        request: The request.

    Returns:
        Variants, their Triton model, version, labels and the batch limits.
    """
    dataplane = get_dataplane(request)
    s = dataplane.settings
    return ModelsResponse(
        default_variant=s.default_variant,
        max_batch_size=s.batch.max_batch_size,
        max_client_batch_size=s.max_client_batch_size,
        models=[
            ModelInfo(
                variant=v.variant,
                model=v.model,
                version=v.version,
                labels=list(v.labels),
                max_length=v.max_length,
                server_max_batch_size=v.server_max_batch_size,
                service_time=ServiceTimeInfo(**v.service_time),
            )
            for v in dataplane.variants()
        ],
    )


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of the gateway's metrics."""
    payload, content_type = get_dataplane(request).runtime.metrics.render()
    return Response(payload, media_type=content_type)
