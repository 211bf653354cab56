"""Rendering gateway errors over HTTP: the one JSON body, and every FastAPI exception handler, registered once.

Every error response has the body ``{"error": str, "error_type": str}``, including FastAPI's own request
validation errors and unknown routes. Unexpected exceptions become a generic 500 whose body says nothing about the
exception; the traceback goes to the log with the request id (the request-context middleware does that).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.gateway.errors import (
    GENERIC_INTERNAL_MESSAGE,
    Internal,
    InvalidInput,
    PayloadTooLarge,
    PermissionDenied,
    ServiceError,
    Unauthenticated,
    error_body,
)


def error_response(exc: ServiceError) -> JSONResponse:
    """Render a ServiceError as a JSON response with its status and headers."""
    return JSONResponse(error_body(exc.message, exc.error_type), status_code=exc.status, headers=exc.headers)


def internal_error_response() -> JSONResponse:
    """Return the generic 500 response, which deliberately carries no exception type or text."""
    return JSONResponse(error_body(GENERIC_INTERNAL_MESSAGE, Internal.error_type), status_code=500)


def format_validation_errors(errors: list[dict[str, Any]], *, limit: int = 10) -> str:
    """One line naming each invalid field (pydantic's error list), e.g. ``texts.0: String should have ...``."""
    parts = []
    for err in errors[:limit]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


_HTTP_ERROR_TYPES = {
    400: InvalidInput.error_type,
    404: "not_found",
    401: Unauthenticated.error_type,
    403: PermissionDenied.error_type,
    405: "method_not_allowed",
    413: PayloadTooLarge.error_type,
    422: InvalidInput.error_type,
}


def add_exception_handlers(app: FastAPI) -> None:
    """Register every exception handler of the gateway in one place (KServe's pattern).

    The catch-all for unexpected exceptions is not here but in the request middleware (``app.py``): Starlette
    re-raises exceptions handled by an ``Exception`` handler, and the middleware also knows the request id to log.
    """

    async def _service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return error_response(exc)

    async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message = format_validation_errors(list(exc.errors()))
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
