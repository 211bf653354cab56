"""The gateway's exception hierarchy, its single status table, and the FastAPI handlers that render it.

Every error response has one body shape, ``{"error": str, "error_type": str}``, including FastAPI's own request
validation errors and unknown routes. Unexpected exceptions become a generic 500 whose body says nothing about the
exception; the traceback goes to the log with the request id.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("service.gateway.errors")


class ServiceError(Exception):
    """Base of every error the gateway reports to clients on purpose.

    Attributes:
        status: HTTP status code of the response.
        error_type: Stable machine-readable kind, the ``error_type`` field of the body.
        message: Human-readable text, the ``error`` field of the body; never contains internals.
        headers: Extra response headers (e.g. Retry-After).
    """

    status: int = 500
    error_type: str = "internal"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})


class InvalidInput(ServiceError):
    """The request is malformed or names something that does not exist (e.g. an unknown variant)."""

    status = 422
    error_type = "invalid_input"


class PayloadTooLarge(ServiceError):
    """Too many texts in one request, a text too long, or a body over max_body_bytes."""

    status = 413
    error_type = "payload_too_large"


class Overloaded(ServiceError):
    """The variant's queue is full; the client should retry after Retry-After seconds."""

    status = 429
    error_type = "overloaded"

    def __init__(self, message: str, *, retry_after_seconds: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_seconds)})
        self.retry_after_seconds = retry_after_seconds


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before an answer was ready (in the queue or in the backend)."""

    status = 504
    error_type = "deadline_exceeded"


class BackendUnavailable(ServiceError):
    """Triton (or the model) is not reachable or not ready, or the gateway is draining."""

    status = 503
    error_type = "backend_unavailable"


class BackendError(ServiceError):
    """Triton answered with an error other than unavailability or a timeout."""

    status = 502
    error_type = "backend_error"


class Internal(ServiceError):
    """A bug or broken invariant inside the gateway (e.g. the backend returned the wrong number of rows)."""

    status = 500
    error_type = "internal"


class ModelNotFound(ServiceError):
    """The Open Inference Protocol names a model (or version) the gateway does not serve."""

    status = 404
    error_type = "not_found"


class Unauthenticated(ServiceError):
    """API keys are configured and the request carries none."""

    status = 401
    error_type = "unauthenticated"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="loraserve"'})


class PermissionDenied(ServiceError):
    """API keys are configured and the request's key is not one of them."""

    status = 403
    error_type = "forbidden"


#: The one table of documented statuses: error class -> (status, error_type). Tests walk it.
ERROR_TABLE: dict[type[ServiceError], tuple[int, str]] = {
    cls: (cls.status, cls.error_type)
    for cls in (InvalidInput, PayloadTooLarge, Overloaded, DeadlineExceeded, BackendUnavailable, BackendError, Internal)
}

#: Errors that only some routes raise (the v2 protocol's unknown model, the optional API-key check); kept apart from
#: ERROR_TABLE, which lists what the classify path can answer.
EXTRA_ERROR_TABLE: dict[type[ServiceError], tuple[int, str]] = {
    cls: (cls.status, cls.error_type) for cls in (ModelNotFound, Unauthenticated, PermissionDenied)
}

#: The gRPC status of each gateway error (the v2 GRPCInferenceService and the docs use this one table).
#: PayloadTooLarge is INVALID_ARGUMENT, not RESOURCE_EXHAUSTED: the request will never fit, so clients that retry
#: on RESOURCE_EXHAUSTED (our overload signal) must not retry it.
GRPC_STATUS_TABLE: dict[type[ServiceError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    PayloadTooLarge: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    BackendUnavailable: grpc.StatusCode.UNAVAILABLE,
    BackendError: grpc.StatusCode.INTERNAL,
    Internal: grpc.StatusCode.INTERNAL,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}

GENERIC_INTERNAL_MESSAGE = "internal server error"


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map any exception to the gRPC status and message a client may see.

    Args:
        exc: A gateway error, or anything else (a bug).

    Returns:
        ``(code, message)``; exceptions outside the hierarchy and ``Internal`` give INTERNAL with the generic
        message, so no exception text leaks.
    """
    if isinstance(exc, ServiceError) and not isinstance(exc, Internal):
        for cls in type(exc).__mro__:
            if cls in GRPC_STATUS_TABLE:
                return GRPC_STATUS_TABLE[cls], exc.message
    return grpc.StatusCode.INTERNAL, GENERIC_INTERNAL_MESSAGE


def error_body(message: str, error_type: str) -> dict[str, str]:
    """Build the single error body shape.

    Args:
        message: Text for the ``error`` field.
        error_type: Value of the ``error_type`` field.

    Returns:
        ``{"error": message, "error_type": error_type}``.
    """
    return {"error": message, "error_type": error_type}


def error_response(exc: ServiceError) -> JSONResponse:
    """Render a ServiceError as a JSON response with its status and headers.

    Args:
        exc: The error to render.

    Returns:
        The JSON response.
    """
    return JSONResponse(error_body(exc.message, exc.error_type), status_code=exc.status, headers=exc.headers)


def internal_error_response() -> JSONResponse:
    """Return the generic 500 response, which deliberately carries no exception type or text."""
    return JSONResponse(error_body(GENERIC_INTERNAL_MESSAGE, Internal.error_type), status_code=500)


def _format_validation_errors(errors: list[dict[str, Any]]) -> str:
    parts = []
    for err in errors[:10]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


_HTTP_ERROR_TYPES = {
    400: "invalid_input",
    404: "not_found",
    401: Unauthenticated.error_type,
    403: PermissionDenied.error_type,
    405: "method_not_allowed",
    413: PayloadTooLarge.error_type,
    422: InvalidInput.error_type,
}


def add_exception_handlers(app: FastAPI) -> None:
    """Register every exception handler of the gateway in one place.

    The catch-all for unexpected exceptions is not here but in the request middleware (``app.py``): Starlette
    re-raises exceptions handled by an ``Exception`` handler, and the middleware also knows the request id to log.

    Args:
        app: The application to configure.
    """

    async def _service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return error_response(exc)

    async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message = _format_validation_errors(list(exc.errors()))
        return JSONResponse(error_body(message, InvalidInput.error_type), status_code=422)

    async def _http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400:
            # FastAPI's "error parsing the body" (invalid UTF-8, JSON nested too deep): malformed input, which the
            # gateway documents as 422 like any other malformed JSON.
            return JSONResponse(error_body("request body is not valid JSON", InvalidInput.error_type), status_code=422)
        error_type = _HTTP_ERROR_TYPES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return JSONResponse(
            error_body(message, error_type), status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
