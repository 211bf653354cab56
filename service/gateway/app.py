"""The application factory: wires settings, backend, batchers, routes, error handlers and metrics.

Nothing is created at import time; ``create_app`` builds everything and the lifespan starts and stops it.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__
from service.gateway.api import generate as generate_api  # issue 17: POST /v1/generate
from service.gateway.api import health, rest_v1, rest_v2
from service.gateway.api.auth import ApiKeyMiddleware
from service.gateway.api.fast_classify import FastClassify
from service.gateway.api.http_errors import add_exception_handlers, error_response, internal_error_response
from service.gateway.backend.base import InferenceBackend
from service.gateway.dataplane import DataPlane
from service.gateway.errors import PayloadTooLarge
from service.gateway.metrics import GatewayMetrics
from service.gateway.runtime import GatewayRuntime
from service.gateway.settings import Settings

logger = logging.getLogger("service.gateway")

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_BODY_METHODS = {"POST", "PUT", "PATCH"}
#: Route template -> ``operation`` label, from every HTTP transport's table.
ROUTE_OPERATIONS: dict[str, str] = {
    **rest_v1.OPERATIONS,
    **health.OPERATIONS,
    **rest_v2.OPERATIONS,
    **generate_api.OPERATIONS,
}


def route_labels(template: str | None) -> tuple[str, str]:
    """``(operation, protocol)`` of an HTTP route template (None: no route matched)."""
    if template is None:
        return "other", "rest_v1"
    protocol = "rest_v2" if template == "/v2" or template.startswith("/v2/") else "rest_v1"
    default = "metadata" if protocol == "rest_v2" else "other"
    return ROUTE_OPERATIONS.get(template, default), protocol


class RequestContextMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware, which would break disconnect detection).

    Per HTTP request it: assigns the request id (echoes a sane ``x-request-id`` or generates one); enforces
    ``max_body_bytes`` (413) by reading the body up front, which is bounded by that limit; adds ``x-request-id`` and
    ``x-total-time`` (integer milliseconds) to the response; counts the request in the metrics by operation,
    protocol, variant and status; and turns any unhandled exception into the generic 500, logging the traceback with the request id.

    Args:
        app: The wrapped application.
        max_body_bytes: Largest accepted body.
        metrics: Where requests are counted.
    """

    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, metrics: GatewayMetrics, dataplane: DataPlane | None = None
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.dataplane = dataplane

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        status_holder: dict[str, Any] = {"status": 500, "started": False}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                total_ms = round((time.perf_counter() - started) * 1000)
                headers.append((b"x-total-time", str(total_ms).encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            if scope.get("method") in _BODY_METHODS:
                body_or_none = await _read_body(scope, receive, self.max_body_bytes)
                if body_or_none is None:
                    resp = error_response(PayloadTooLarge(f"request body larger than {self.max_body_bytes} bytes"))
                    await resp(scope, receive, send_wrapper)
                    return
                if self.dataplane is not None and _is_inference(scope.get("path", "")):
                    shed = self.dataplane.shed_before_parsing()
                    if shed is not None:
                        scope["state"]["shed"] = True
                        await error_response(shed)(scope, receive, send_wrapper)
                        return
                receive = _replay(body_or_none, receive)
            await self.app(scope, receive, send_wrapper)
        except Exception:
            logger.exception("unhandled error (request id %s)", request_id)
            if not status_holder["started"]:
                await internal_error_response()(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            operation, protocol = route_labels(getattr(route, "path", None))
            if scope["state"].get("shed"):  # refused before routing: the path says what it was
                operation, protocol = "classify", "rest_v2" if scope.get("path", "").startswith("/v2/") else "rest_v1"
            # The data plane records the variant in the call info only once it is a served one, so the label stays
            # bounded; every other request is "none".
            call = scope.get("state", {}).get("call")
            variant = getattr(call, "variant", None)
            self.metrics.observe_request(
                operation, protocol, variant, status_holder["status"], time.perf_counter() - started
            )


def _is_inference(path: str) -> bool:
    return path == rest_v1.CLASSIFY_PATH or (path.startswith("/v2/models/") and path.endswith("/infer"))


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == REQUEST_ID_HEADER.encode():
            text = value.decode("latin-1")
            if _REQUEST_ID_OK.match(text):
                return text
            break
    return os.urandom(16).hex()  # as random as uuid4().hex, without building a UUID object per request


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """Read the whole body, or return None as soon as it exceeds ``limit`` bytes."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                if int(value) > limit:
                    return None
            except ValueError:
                pass
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        # After the body, delegate: the server's next message is http.disconnect (used to detect gone clients).
        return await receive()

    return replay


def create_app(settings: Settings, backend: InferenceBackend | None = None, *, serve_grpc: bool = False) -> FastAPI:
    """Build the gateway application.

    Args:
        settings: Validated settings.
        backend: The inference backend; a :class:`TritonBackend` on ``settings.triton`` when None.
        serve_grpc: Also run the v2 gRPC server (on ``settings.grpc_port``, unless it is -1) inside the lifespan,
            on the same event loop and batchers. The process entry point turns it on; in-process tests opt in, so
            that apps built by tests do not bind the default gRPC port.

    Returns:
        The FastAPI application; its lifespan loads the models, connects the backend, starts the batchers (and the
        gRPC server), and on shutdown drains them in that order reversed.
    """
    if backend is None:
        from service.gateway.backend.triton import TritonBackend

        backend = TritonBackend(settings.triton)
    metrics = GatewayMetrics(version=__version__, git_sha=settings.build_git_sha)
    runtime = GatewayRuntime(settings, backend, metrics)
    dataplane = DataPlane(runtime)
    # -- generation (issue 17): off unless GATEWAY_GENERATE__ENABLED=1 --
    generation = generate_api.GenerationService(settings, settings.generate, metrics, runtime)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            await generation.start()  # issue 17
        except BaseException:
            await runtime.stop()
            raise
        grpc_server = None
        if serve_grpc and settings.grpc_port >= 0:
            from service.gateway.api.grpc_v2 import GrpcServer

            grpc_server = GrpcServer(dataplane, settings.host, settings.grpc_port)
            try:
                app.state.grpc_port = await grpc_server.start()
            except BaseException:
                await runtime.stop()
                raise
        # Everything built so far (modules, tokenizers, clients) lives as long as the process: moved out of the
        # collector's view, the full collections that run under load scan only request-time objects (shorter pauses).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            # New RPCs are refused at once; RPCs already waiting get their answers from the still-running
            # batchers (bounded by the drain timeout); then the batchers drain.
            runtime.draining = True
            if grpc_server is not None:
                await grpc_server.stop(settings.drain_timeout_seconds)
            await generation.stop()  # issue 17
            await dataplane.aclose()
            await runtime.stop()

    app = FastAPI(
        title="loraserve gateway",
        version=__version__,
        description="Text classification with dynamic batching in front of NVIDIA Triton. Errors always have the "
        'body {"error": str, "error_type": str}. Timing headers x-queue-time, x-inference-time and x-total-time '
        "are integer milliseconds.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.dataplane = dataplane
    app.state.settings = settings
    app.state.grpc_port = None
    app.state.generation = generation  # issue 17
    add_exception_handlers(app)
    app.include_router(rest_v1.router)
    app.include_router(health.router)
    app.include_router(rest_v2.router)
    app.include_router(generate_api.router)  # issue 17
    if settings.fast_classify:
        # Innermost of the middlewares: auth, the body limit, request ids and metrics apply to it unchanged.
        classify_route = next(r for r in rest_v1.router.routes if getattr(r, "path", None) == rest_v1.CLASSIFY_PATH)
        app.add_middleware(FastClassify, dataplane=dataplane, route=classify_route)
    if settings.api_keys:
        # Inside the request-context middleware, so refusals still get a request id and are counted.
        app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys)
    app.add_middleware(
        RequestContextMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics, dataplane=dataplane
    )
    return app
