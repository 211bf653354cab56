"""Probes: liveness says the process answers, readiness says it should receive traffic.

``/healthz`` and ``/readyz`` are the primary paths; ``/health/live`` and ``/health/ready`` are aliases with the same
behaviour (the style guide's names), so either can back a Kubernetes probe.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.gateway.api.http_common import get_dataplane
from service.gateway.api.http_errors import error_response
from service.gateway.api.schemas import ErrorResponse, HealthResponse
from service.gateway.errors import NotReady

router = APIRouter()
#: Route template -> ``operation`` label of the request metrics.
OPERATIONS = {"/healthz": "health", "/health/live": "health", "/readyz": "health", "/health/ready": "health"}


@router.get("/healthz", response_model=HealthResponse, summary="Liveness: the process is up")
@router.get("/health/live", response_model=HealthResponse, include_in_schema=False)
async def healthz() -> HealthResponse:
    """Answer 200 while the process runs; never touches Triton (a slow Triton must not get the pod killed)."""
    return HealthResponse(status="alive")


@router.get(
    "/readyz",
    response_model=HealthResponse,
    responses={503: {"model": ErrorResponse, "description": "Not ready (error_type 'not_ready')."}},
    summary="Readiness: Triton and every served variant ready, batchers running, not draining",
)
@router.get("/health/ready", response_model=HealthResponse, include_in_schema=False)
async def readyz(request: Request) -> HealthResponse | JSONResponse:
    """Answer 200 when the gateway can serve every variant, else 503 with the reason.

    Args:
        request: The request.

    Returns:
        ``{"status": "ready"}`` or a 503 error body.
    """
    ready, reason = await get_dataplane(request).readiness()
    if ready:
        return HealthResponse(status="ready")
    return error_response(NotReady(reason))
