"""The gateway's error hierarchy: one class per outcome a client can see, and nothing else.

Every class carries its HTTP status, its stable ``error_type`` and its gRPC status name as class attributes, so the
one status table exists by construction (:data:`ERROR_TABLE` is derived from the classes). Rendering is the
transports' business: :mod:`service.gateway.api.http_errors` turns these into the one JSON body
``{"error": str, "error_type": str}``, :mod:`service.gateway.api.grpc_v2` into gRPC statuses. This module imports no
web or RPC framework, so the batching core and the backend stay free of them.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the gateway reports to clients on purpose.

    Attributes:
        status: HTTP status code of the response (also the ``code`` label of the request metrics, every protocol).
        error_type: Stable machine-readable kind, the ``error_type`` field of the body.
        grpc_code: Name of the ``grpc.StatusCode`` the v2 gRPC service answers with.
        message: Human-readable text, the ``error`` field of the body; never contains internals.
        headers: Extra response headers (e.g. Retry-After).
    """

    status: int = 500
    error_type: str = "internal"
    grpc_code: str = "INTERNAL"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})


class InvalidInput(ServiceError):
    """The request is malformed or names something that does not exist (e.g. an unknown variant)."""

    status = 422
    error_type = "invalid_input"
    grpc_code = "INVALID_ARGUMENT"


class PayloadTooLarge(ServiceError):
    """Too many texts in one request, a text too long, or a body over max_body_bytes.

    INVALID_ARGUMENT over gRPC, not RESOURCE_EXHAUSTED: the request will never fit, so clients that retry on
    RESOURCE_EXHAUSTED (the overload signal) must not retry it.
    """

    status = 413
    error_type = "payload_too_large"
    grpc_code = "INVALID_ARGUMENT"


class Overloaded(ServiceError):
    """No room for the request now; the client should retry after Retry-After seconds."""

    status = 429
    error_type = "overloaded"
    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, retry_after_seconds: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_seconds)})
        self.retry_after_seconds = retry_after_seconds


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before an answer was ready (in the queue or in the backend)."""

    status = 504
    error_type = "deadline_exceeded"
    grpc_code = "DEADLINE_EXCEEDED"


class BackendUnavailable(ServiceError):
    """Triton (or the model) is not reachable or not ready, or the gateway is draining."""

    status = 503
    error_type = "backend_unavailable"
    grpc_code = "UNAVAILABLE"


class NotReady(ServiceError):
    """A readiness probe's negative answer (``/readyz``, ``/v2/health/ready``, a model's ready endpoint)."""

    status = 503
    error_type = "not_ready"
    grpc_code = "UNAVAILABLE"


class BackendError(ServiceError):
    """Triton answered with an error other than unavailability or a timeout."""

    status = 502
    error_type = "backend_error"
    grpc_code = "INTERNAL"


class Internal(ServiceError):
    """A bug or broken invariant inside the gateway (e.g. the backend returned the wrong number of rows)."""

    status = 500
    error_type = "internal"
    grpc_code = "INTERNAL"


class ModelNotFound(ServiceError):
    """The Open Inference Protocol names a model (or version) the gateway does not serve."""

    status = 404
    error_type = "not_found"
    grpc_code = "NOT_FOUND"


class Unauthenticated(ServiceError):
    """API keys are configured and the request carries none."""

    status = 401
    error_type = "unauthenticated"
    grpc_code = "UNAUTHENTICATED"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="loraserve"'})


class PermissionDenied(ServiceError):
    """API keys are configured and the request's key is not one of them."""

    status = 403
    error_type = "forbidden"
    grpc_code = "PERMISSION_DENIED"


class ClientClosedRequest(ServiceError):
    """The client went away while waiting: recorded as 499 (nginx's convention), never seen by the client."""

    status = 499
    error_type = "client_closed_request"
    grpc_code = "CANCELLED"


#: Every documented outcome: error class -> (HTTP status, error_type, gRPC status name). Derived from the classes,
#: so it cannot drift from them; tests walk it (one HTTP and one gRPC test per row).
ERROR_TABLE: dict[type[ServiceError], tuple[int, str, str]] = {
    cls: (cls.status, cls.error_type, cls.grpc_code)
    for cls in (
        InvalidInput,
        PayloadTooLarge,
        Overloaded,
        DeadlineExceeded,
        BackendUnavailable,
        NotReady,
        BackendError,
        Internal,
        ModelNotFound,
        Unauthenticated,
        PermissionDenied,
        ClientClosedRequest,
    )
}

#: What a client sees for anything outside the hierarchy (a bug): no exception type or text leaks.
GENERIC_INTERNAL_MESSAGE = "internal server error"


def error_body(message: str, error_type: str) -> dict[str, str]:
    """Build the single error body shape ``{"error": message, "error_type": error_type}``."""
    return {"error": message, "error_type": error_type}


def public_error(exc: BaseException) -> ServiceError:
    """The error a client may see for ``exc``: itself for a gateway error, the generic Internal for anything else.

    ``Internal`` errors also lose their text, which may describe internals.
    """
    if isinstance(exc, ServiceError) and not isinstance(exc, Internal):
        return exc
    return Internal(GENERIC_INTERNAL_MESSAGE)
