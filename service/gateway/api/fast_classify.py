"""The hot route: well-formed ``POST /v1/classify`` requests served as plain ASGI, without FastAPI's per-request work.

FastAPI's route for ``/v1/classify`` (``rest_v1.classify``) stays the contract: it is in the OpenAPI document and it
answers every request this module does not take. This module takes a request only when it is certainly valid under
that route's pydantic model (``ClassifyRequest``) and header rules; then it decodes the body with orjson, calls the
same data plane, and encodes the same response body with orjson. Anything it is unsure of (an unexpected field or
type, a blank-looking text, a numeric string, another content type, malformed JSON) is replayed, untouched, to
FastAPI, which answers it exactly as before. So both paths answer the same, and the errors of bad input keep their
one source: pydantic's messages. Errors of valid requests (429, 503, 504, ...) are rendered from the same
``ServiceError`` with the same body and headers.

What it saves per request, measured in docs/benchmarks.md: dependency resolution, pydantic validation of the
request and of the response model, ``jsonable_encoder``, and Starlette's request/response objects.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.gateway.api.http_common import DEADLINE_HEADER
from service.gateway.api.rest_v1 import CLASSIFY_PATH
from service.gateway.dataplane import CallInfo, Classified, DataPlane
from service.gateway.errors import ServiceError, error_body

_FIELDS = frozenset(("text", "texts", "variant", "deadline_ms"))
_DEADLINE_MS_MAX = 3_600_000
_DEADLINE_HEADER_BYTES = DEADLINE_HEADER.encode()
_JSON_TYPE = b"application/json"

#: The decoded request: texts, variant, body deadline (ms), header deadline (ms).
FastRequest = tuple[list[str], str | None, int | None, int | None]


def _non_blank(value: Any) -> bool:
    # Python's whitespace is a superset of the \s of pydantic's (Rust) regex: a text that is not all Python
    # whitespace certainly matches the model's pattern r"\S". The rest goes to pydantic.
    return type(value) is str and bool(value) and not value.isspace()


def _int_in_range(value: Any) -> bool:
    return type(value) is int and 1 <= value <= _DEADLINE_MS_MAX


def parse(body: bytes, headers: list[tuple[bytes, bytes]]) -> FastRequest | None:
    """Decode a ``/v1/classify`` request if it is certainly valid; None sends it to FastAPI.

    Args:
        body: The whole request body.
        headers: The raw ASGI headers.

    Returns:
        ``(texts, variant, deadline_ms, header_deadline_ms)``, or None when the request is not certainly valid.
    """
    content_type: bytes | None = None
    header_deadline: int | None = None
    for name, value in headers:
        if name == b"content-type":
            content_type = value
        elif name == _DEADLINE_HEADER_BYTES:
            if not value.isdigit() or len(value) > 8:
                return None
            header_deadline = int(value)
            if not 1 <= header_deadline <= _DEADLINE_MS_MAX:
                return None
    # FastAPI reads a body as JSON without a content type or with application/json (parameters allowed).
    if content_type is not None and content_type.split(b";", 1)[0].strip().lower() != _JSON_TYPE:
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(data) is not dict or not _FIELDS.issuperset(data):
        return None
    text, texts = data.get("text"), data.get("texts")
    if text is not None:
        if texts is not None or not _non_blank(text):
            return None
        out = [text]
    else:
        if type(texts) is not list or not texts or not all(_non_blank(t) for t in texts):
            return None
        out = texts
    variant = data.get("variant")
    if variant is not None and type(variant) is not str:
        return None
    deadline_ms = data.get("deadline_ms")
    if deadline_ms is not None and not _int_in_range(deadline_ms):
        return None
    return out, variant, deadline_ms, header_deadline


def encode(done: Classified) -> bytes:
    """The ``ClassifyResponse`` body of an answer (same fields and order as the pydantic model)."""
    labels = done.labels
    results = [
        {"label": label, "score": score, "probabilities": dict(zip(labels, row, strict=True))}
        for (label, score), row in zip(done.best(), done.probabilities.tolist(), strict=True)
    ]
    return orjson.dumps(
        {"variant": done.variant, "model": done.model, "model_version": done.model_version, "results": results}
    )


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", _JSON_TYPE),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def error_payload(exc: ServiceError) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Body and headers of a gateway error (the same as ``http_errors.error_response``)."""
    body = orjson.dumps(error_body(exc.message, exc.error_type))
    return body, [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items()]


class FastClassify:
    """ASGI middleware serving certainly-valid ``POST /v1/classify`` requests directly; all else passes through.

    It sits inside the request-context middleware (request id, body limit, metrics, catch-all 500) and the API-key
    check, so those apply unchanged; the request-context middleware has already read the body, so the first
    ``receive`` returns all of it.

    Args:
        app: The FastAPI application (everything else, and the fallback).
        dataplane: The gateway's data plane.
        route: FastAPI's ``/v1/classify`` route, set in the scope so the request metrics label this path as
            FastAPI's would.
    """

    def __init__(self, app: ASGIApp, *, dataplane: DataPlane, route: Any) -> None:
        self.app = app
        self.dataplane = dataplane
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != CLASSIFY_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        arrived = time.monotonic()
        first = await receive()
        body = first.get("body", b"")
        if first.get("more_body", False):  # not replayed whole (never the case behind the request middleware)
            await self.app(scope, _prepend(first, receive), send)
            return
        request = parse(body, scope["headers"])
        if request is None:
            await self.app(scope, _prepend(first, receive), send)
            return
        texts, variant, deadline_ms, header_ms = request
        scope["route"] = self.route
        info = CallInfo()
        scope.setdefault("state", {})["call"] = info
        dataplane = self.dataplane
        budgets = (None if ms is None else ms / 1000.0 for ms in (deadline_ms, header_ms))
        try:
            done = await dataplane.classify(
                texts,
                variant=variant,
                deadline=dataplane.deadline(arrived, *budgets),
                disconnected=_disconnected(receive),
                info=info,
            )
        except ServiceError as exc:
            payload, headers = error_payload(exc)
            await _respond(send, exc.status, payload, headers)
            return
        await _respond(
            send,
            200,
            encode(done),
            [
                (b"x-queue-time", str(round(done.queue_seconds * 1000)).encode()),
                (b"x-inference-time", str(round(done.inference_seconds * 1000)).encode()),
            ],
        )


def _prepend(first: Message, receive: Receive) -> Callable[[], Awaitable[Message]]:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return first
        return await receive()

    return replay


async def _disconnected(receive: Receive) -> None:
    """Return when the client goes away (the body is read, so the next message is ``http.disconnect``)."""
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return
