"""Optional API-key authentication for REST and gRPC (off unless ``GATEWAY_API_KEYS`` is set).

A key travels as ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` (gRPC: the same metadata keys). No key
gives 401 / UNAUTHENTICATED, a wrong key 403 / PERMISSION_DENIED. Probes and scraping stay open, because the kubelet
and Prometheus carry no key and reveal nothing: ``/healthz``, ``/readyz``, ``/health/*``, ``/v2/health/*``,
``/metrics`` and the gRPC health service. Keys are compared with :func:`hmac.compare_digest` against every
configured key (no early exit), so the time taken says nothing about how much of a key matched.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from service.gateway.api.http_errors import error_response
from service.gateway.errors import PermissionDenied, ServiceError, Unauthenticated

#: Paths that never need a key (exact paths, or prefixes ending in '/').
EXEMPT_PATHS = ("/healthz", "/readyz", "/metrics", "/health/", "/v2/health/")


class KeyChecker:
    """Checks presented keys against the configured ones in constant time.

    Args:
        keys: The accepted keys.
    """

    def __init__(self, keys: Sequence[SecretStr]) -> None:
        self._keys = [k.get_secret_value().encode() for k in keys]

    def check(self, presented: str | None) -> None:
        """Accept or refuse one presented key.

        Args:
            presented: The key from the request, None when absent.

        Raises:
            Unauthenticated: No key was presented.
            PermissionDenied: The key matches none of the configured keys.
        """
        if not presented:
            raise Unauthenticated("an API key is required (Authorization: Bearer <key> or x-api-key)")
        candidate = presented.encode()
        matched = False
        for key in self._keys:  # every key is compared, whatever matched before
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise PermissionDenied("the API key is not valid")


def presented_key(headers: Sequence[tuple[str, str]]) -> str | None:
    """Extract the key from ``authorization: Bearer`` or ``x-api-key`` (lower-case names).

    Args:
        headers: (name, value) pairs with lower-case names.

    Returns:
        The key, or None.
    """
    for name, value in headers:
        if name == "x-api-key":
            return value.strip()
        if name == "authorization":
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def is_exempt(path: str) -> bool:
    """Whether ``path`` is served without a key (probes and metrics)."""
    return any(path == p or (p.endswith("/") and path.startswith(p)) for p in EXEMPT_PATHS)


class ApiKeyMiddleware:
    """Pure ASGI middleware refusing HTTP requests without a valid key (only installed when keys are set).

    Args:
        app: The wrapped application.
        keys: The accepted keys.
    """

    def __init__(self, app: ASGIApp, *, keys: Sequence[SecretStr]) -> None:
        self.app = app
        self.checker = KeyChecker(keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_exempt(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope.get("headers", [])]
        try:
            self.checker.check(presented_key(headers))
        except ServiceError as exc:
            await error_response(exc)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class GrpcApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """gRPC server interceptor with the same rules; the named services (health) stay open.

    Args:
        keys: The accepted keys.
        exempt_services: Fully qualified service names served without a key.
    """

    def __init__(self, keys: Sequence[SecretStr], *, exempt_services: Sequence[str] = ()) -> None:
        self.checker = KeyChecker(keys)
        self.exempt = tuple(f"/{s}/" for s in exempt_services)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Pass the call on, or replace its handler by one that aborts with the auth status."""
        method = handler_call_details.method or ""
        if method.startswith(self.exempt):
            return await continuation(handler_call_details)
        metadata = [
            (k.lower(), v if isinstance(v, str) else v.decode("latin-1"))
            for k, v in (handler_call_details.invocation_metadata or ())
        ]
        handler = await continuation(handler_call_details)
        try:
            self.checker.check(presented_key(metadata))
        except ServiceError as exc:
            return _refusal(exc, handler)
        return handler


def _refusal(exc: ServiceError, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    code = grpc.StatusCode[exc.grpc_code]

    async def abort(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, exc.message)

    # The refusal has the same streaming kind as the real method (else the call would fail as a protocol error);
    # no deserializer, so the refused request's bytes are never parsed.
    request_streaming = bool(handler and handler.request_streaming)
    response_streaming = bool(handler and handler.response_streaming)
    if request_streaming and response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)
