"""The classification path shared by every front end: v1 REST, v2 REST and v2 gRPC.

Each transport decodes its own request, then calls :func:`check_texts`, :func:`resolve_variant`,
:func:`deadline_from` and :func:`classify`, so the limits, the variant rules, the deadline rules and the waiting
(including what happens when the caller goes away) are the same whichever protocol a client speaks, and every
request lands in the same per-variant batcher.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.gateway.batching.batcher import DynamicBatcher, TextResult
from service.gateway.errors import (
    BackendUnavailable,
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    PayloadTooLarge,
    ServiceError,
)
from service.gateway.runtime import GatewayRuntime


class ClientClosedRequest(ServiceError):
    """The client disconnected while waiting; recorded as 499 (nginx's convention) and never seen by the client."""

    status = 499
    error_type = "client_closed_request"


@dataclass(frozen=True)
class Classified:
    """The answer to one classification call.

    Attributes:
        variant: The variant that answered.
        model: Its Triton model name.
        model_version: The version Triton reported.
        labels: The label of each probability column, in order.
        results: One result per text, in input order.
    """

    variant: str
    model: str
    model_version: str
    labels: tuple[str, ...]
    results: list[TextResult]


def check_texts(runtime: GatewayRuntime, texts: Sequence[str]) -> None:
    """Apply the per-request limits every protocol shares.

    Args:
        runtime: The gateway runtime (for the settings).
        texts: The decoded texts.

    Raises:
        InvalidInput: No texts, or a text that is empty or only whitespace (nothing to classify).
        PayloadTooLarge: More texts than ``max_client_batch_size`` or a text over ``max_text_chars``.
    """
    settings = runtime.settings
    if not texts:
        raise InvalidInput("no texts to classify")
    if len(texts) > settings.max_client_batch_size:
        raise_too_many(len(texts), settings.max_client_batch_size)
    for i, t in enumerate(texts):
        if len(t) > settings.max_text_chars:
            raise PayloadTooLarge(f"text {i} has {len(t)} characters; the limit is {settings.max_text_chars}")
        if not t.strip():
            raise InvalidInput(f"text {i} is empty or only whitespace")


def raise_too_many(count: int, limit: int) -> None:
    """Raise the 413 for a request of ``count`` texts over ``limit`` (the message check_texts also gives).

    Raises:
        PayloadTooLarge: Always.
    """
    raise PayloadTooLarge(f"{count} texts in one request; the limit is {limit}")


async def wait_disconnect(receive: Callable[[], Awaitable[MutableMapping[str, Any]]]) -> None:
    """Return when the HTTP client goes away.

    The body is already read, so the next ASGI message is ``http.disconnect``: it arrives when the client leaves
    (or when the response is complete, by which time the waiting task has been cancelled). No polling.

    Args:
        receive: The request's ASGI receive callable.
    """
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return


def resolve_variant(runtime: GatewayRuntime, variant: str | None) -> DynamicBatcher:
    """Return the batcher of ``variant`` (the default variant when None).

    Args:
        runtime: The gateway runtime.
        variant: The requested variant.

    Returns:
        The variant's batcher.

    Raises:
        InvalidInput: The variant is not served.
    """
    name = variant or runtime.settings.default_variant
    batcher = runtime.batchers.get(name)
    if batcher is None:
        raise InvalidInput(f"unknown variant {name!r}; served variants: {', '.join(runtime.batchers)}")
    return batcher


def resolve_model(runtime: GatewayRuntime, model_name: str, version: str = "") -> str | None:
    """Map an Open Inference Protocol model name to the variant it fixes.

    The gateway exposes ``<prefix>`` (the variant comes from the ``variant`` parameter, else the default) and
    ``<prefix>_<variant>`` for each served variant (the Triton model names, so a client can point at the gateway
    instead of Triton without renaming anything).

    Args:
        runtime: The gateway runtime.
        model_name: The requested model.
        version: The requested version; "" means any. Only the served version exists.

    Returns:
        The variant the name fixes, or None for the prefix name.

    Raises:
        ModelNotFound: Unknown name or version.
    """
    prefix = runtime.settings.triton.model_name_prefix
    if model_name == prefix:
        variant = None
        versions = {str(m.version) for m in runtime.models.values()}
    else:
        variant = next((v for v, m in runtime.models.items() if m.model_name == model_name), None)
        if variant is None:
            raise ModelNotFound(f"unknown model {model_name!r}; served models: {', '.join(served_models(runtime))}")
        versions = {str(runtime.models[variant].version)}
    if version and version not in versions:
        raise ModelNotFound(f"model {model_name!r} has no version {version!r}; served: {', '.join(sorted(versions))}")
    return variant


def served_models(runtime: GatewayRuntime) -> list[str]:
    """The model names the v2 protocols accept: the prefix, then one per variant."""
    return [runtime.settings.triton.model_name_prefix, *(m.model_name for m in runtime.models.values())]


def pick_variant(runtime: GatewayRuntime, fixed: str | None, requested: str | None) -> str | None:
    """Combine the variant a model name fixes with a ``variant`` request parameter.

    Raises:
        InvalidInput: Both are given and differ.
    """
    if fixed is not None and requested is not None and requested != fixed:
        raise InvalidInput(f"model fixes variant {fixed!r} but the request asks for {requested!r}")
    return fixed or requested


def deadline_from(runtime: GatewayRuntime, arrived: float, *client_budgets_seconds: float | None) -> float:
    """The request's monotonic deadline: the server timeout, shortened (never extended) by client budgets.

    Args:
        runtime: The gateway runtime.
        arrived: Monotonic arrival time.
        *client_budgets_seconds: Budgets the client gave (None for absent), e.g. a body field, a header, a gRPC
            deadline.

    Returns:
        The deadline.
    """
    budget = runtime.settings.request_timeout_seconds
    for b in client_budgets_seconds:
        if b is not None:
            budget = min(budget, max(0.0, b))
    return arrived + budget


async def classify(
    runtime: GatewayRuntime,
    batcher: DynamicBatcher,
    texts: Sequence[str],
    deadline: float,
    disconnected: Awaitable[None] | None = None,
) -> Classified:
    """Submit the texts to the batcher and wait for every answer, the deadline, or the client leaving.

    If this coroutine is cancelled (a gRPC client cancelled or its deadline fired), or the client disconnects, or
    the deadline passes, the texts' futures are cancelled, so texts still queued are dropped before they reach
    Triton and counted as ``client_disconnect``.

    Args:
        runtime: The gateway runtime.
        batcher: The variant's batcher (from :func:`resolve_variant`).
        texts: Checked texts (:func:`check_texts`).
        deadline: Monotonic deadline (:func:`deadline_from`).
        disconnected: Completes when the client goes away (HTTP); None when cancellation signals it (gRPC).

    Returns:
        The results.

    Raises:
        BackendUnavailable: The gateway is draining or the backend failed so.
        Overloaded: The queue has no room (429 / RESOURCE_EXHAUSTED).
        DeadlineExceeded: The deadline passed first.
        ClientClosedRequest: ``disconnected`` completed first.
        ServiceError: Whatever the batch failed with.
    """
    try:
        if runtime.draining:
            raise BackendUnavailable("gateway is draining; retry on another instance")
        if deadline <= time.monotonic():
            raise DeadlineExceeded("deadline passed before the request was queued")
        futures = batcher.submit(list(texts), deadline)
    except BaseException:
        if asyncio.iscoroutine(disconnected):
            disconnected.close()  # never started: close it so Python does not warn about an unawaited coroutine
        raise
    gathered = asyncio.gather(*futures)
    # Whatever ends the wait, the outcome is consumed, so asyncio never logs "exception was never retrieved".
    gathered.add_done_callback(lambda f: f.cancelled() or f.exception())
    watcher = asyncio.ensure_future(disconnected) if disconnected is not None else None
    try:
        waiting: set[asyncio.Future[object]] = {gathered}
        if watcher is not None:
            waiting.add(watcher)
        done, _ = await asyncio.wait(
            waiting, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
        )
        if gathered in done:
            results: list[TextResult] = gathered.result()
        elif watcher is not None and watcher in done:
            raise ClientClosedRequest("client disconnected")
        else:
            raise DeadlineExceeded("deadline passed before the answer was ready")
    finally:
        if watcher is not None:
            watcher.cancel()
        # Cancelling the unanswered futures tells the batcher to drop texts still queued (counted by reason); this
        # also covers a request split over two batches when the first one failed.
        if not gathered.done():
            gathered.cancel()
        for f in futures:
            if not f.done():
                f.cancel()
    return Classified(
        variant=batcher.model.variant,
        model=batcher.model.model_name,
        model_version=results[0].model_version,
        labels=tuple(batcher.model.labels),
        results=results,
    )
