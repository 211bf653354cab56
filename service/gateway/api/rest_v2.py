"""The Open Inference Protocol (KServe v2) over HTTP/REST, for the text classifier.

Endpoints: ``/v2/health/live``, ``/v2/health/ready``, ``/v2``, ``/v2/models/{name}[/versions/{v}]``,
``.../ready``, ``.../config`` and ``.../infer``. Inference requests are JSON, or JSON followed by binary tensor data
(Triton's binary tensor data extension, announced by the ``Inference-Header-Content-Length`` header), which is
what ``tritonclient.http`` sends by default; both land in the same batcher as ``/v1/classify``.

Errors keep the gateway's body ``{"error": str, "error_type": str}``: a superset of v2's ``{"error": str}``, so v2
clients (tritonclient raises ``InferenceServerException`` with the ``error`` text) read them unchanged. Status codes
are the gateway's (422 bad input, 404 unknown model, 429 overload, 503, 504) rather than v2's blanket 400.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.gateway.api import v2_codec as codec
from service.gateway.api.http_common import DEADLINE_HEADER, call_info, get_dataplane, wait_disconnect
from service.gateway.api.http_errors import error_response
from service.gateway.api.schemas import ErrorResponse
from service.gateway.errors import InvalidInput, NotReady

router = APIRouter(tags=["Open Inference Protocol (v2)"])

HEADER_LENGTH = "inference-header-content-length"
#: Route template -> ``operation`` label of the request metrics (every other /v2 route is "metadata").
OPERATIONS = {
    "/v2/health/live": "health",
    "/v2/health/ready": "health",
    "/v2/models/{model_name}/ready": "health",
    "/v2/models/{model_name}/versions/{model_version}/ready": "health",
    "/v2/models/{model_name}/infer": "classify",
    "/v2/models/{model_name}/versions/{model_version}/infer": "classify",
}

_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "Unknown model or version."},
    413: {"model": ErrorResponse, "description": "Too many texts, a text too long, or a body too large."},
    422: {"model": ErrorResponse, "description": "Malformed request, wrong input name/datatype/shape, bad UTF-8."},
    429: {"model": ErrorResponse, "description": "Queue full; retry after the Retry-After header (seconds)."},
    503: {"model": ErrorResponse, "description": "Triton unavailable or the gateway is draining."},
    504: {"model": ErrorResponse, "description": "The deadline passed before an answer was ready."},
}


class V2Tensor(BaseModel):
    """An input tensor of a v2 inference request."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Must be 'text'.")
    shape: list[int] = Field(description="[n] or [n, 1].", max_length=8)
    datatype: str = Field(description="Must be 'BYTES'.")
    parameters: dict[str, Any] | None = Field(None, description="'binary_data_size' with binary tensor data.")
    data: list[Any] | None = Field(None, description="The texts (strings, flat or nested by shape).")


class V2RequestedOutput(BaseModel):
    """An output the client wants back."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="'probabilities' or 'labels'.")
    parameters: dict[str, Any] | None = Field(None, description="'binary_data': true for binary tensor data.")


class V2InferRequest(BaseModel):
    """A v2 inference request: one BYTES input named 'text' holding the texts."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "inputs": [
                        {
                            "name": "text",
                            "shape": [2],
                            "datatype": "BYTES",
                            "data": ["Who wrote Hamlet?", "How far is the moon?"],
                        }
                    ],
                    "parameters": {"variant": "int8"},
                }
            ]
        },
    )

    id: str | None = Field(None, max_length=256, description="Echoed in the response.")
    parameters: dict[str, Any] | None = Field(
        None, description="'variant' (for the model 'classifier'), 'timeout' (microseconds), 'binary_data_output'."
    )
    inputs: list[V2Tensor] = Field(min_length=1, max_length=8)
    outputs: list[V2RequestedOutput] | None = Field(None, max_length=8)


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """Inline pydantic's ``$defs`` (these models are not recursive) so the schema stands alone in the OpenAPI."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(dict(defs[ref.split("/")[-1]]))
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


_INFER_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _inline_refs(V2InferRequest.model_json_schema())},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "JSON header of Inference-Header-Content-Length bytes, then binary tensor data.",
            },
        },
    }
}


def _not_ready(reason: str) -> JSONResponse:
    return error_response(NotReady(reason))


@router.get("/v2/health/live", summary="v2 liveness (as /healthz)")
async def v2_live() -> dict[str, bool]:
    """Answer 200 while the process runs."""
    return {"live": True}


@router.get(
    "/v2/health/ready",
    summary="v2 readiness (as /readyz)",
    responses={503: {"model": ErrorResponse, "description": "Not ready."}},
)
async def v2_ready(request: Request) -> Any:
    """Answer 200 when /readyz would, else 503 with the reason (v2 only asks for a non-200)."""
    ready, reason = await get_dataplane(request).readiness()
    return {"ready": True} if ready else _not_ready(reason)


@router.get("/v2", summary="v2 server metadata")
async def v2_server_metadata(request: Request) -> dict[str, Any]:
    """Name, version and protocol extensions of the gateway."""
    name, version = get_dataplane(request).server_metadata()
    return {"name": name, "version": version, "extensions": codec.EXTENSIONS}


@router.get("/v2/models/{model_name}", summary="v2 model metadata", responses=_ERRORS)
@router.get("/v2/models/{model_name}/versions/{model_version}", include_in_schema=False)
async def v2_model_metadata(request: Request, model_name: str, model_version: str = "") -> dict[str, Any]:
    """Describe a served model: the 'text' input and the 'probabilities' and 'labels' outputs."""
    return codec.model_metadata(get_dataplane(request).describe(model_name, model_version))


@router.get("/v2/models/{model_name}/ready", summary="v2 model readiness", responses=_ERRORS)
@router.get("/v2/models/{model_name}/versions/{model_version}/ready", include_in_schema=False)
async def v2_model_ready(request: Request, model_name: str, model_version: str = "") -> Any:
    """Answer 200 when the model's batcher runs, Triton is ready and the gateway is not draining."""
    dataplane = get_dataplane(request)
    if await dataplane.model_ready(dataplane.resolve_model(model_name, model_version)):
        return {"name": model_name, "ready": True}
    return _not_ready(f"model {model_name!r} is not ready")


@router.get("/v2/models/{model_name}/config", summary="v2 model configuration (Triton's shape)", responses=_ERRORS)
@router.get("/v2/models/{model_name}/versions/{model_version}/config", include_in_schema=False)
async def v2_model_config(request: Request, model_name: str, model_version: str = "") -> dict[str, Any]:
    """A Triton-style configuration: max_batch_size is the texts one request may carry."""
    return codec.model_config(get_dataplane(request).describe(model_name, model_version))


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise InvalidInput("Inference-Header-Content-Length must be an integer") from None
    if not 0 < n <= len(body):
        raise InvalidInput(f"Inference-Header-Content-Length ({n}) does not fit the {len(body)}-byte body")
    return body[:n], body[n:]


def _parse_request(
    body: bytes, header_length: str | None, max_items: int, check_count: Callable[[int], None]
) -> tuple[V2InferRequest, list[str]]:
    head, binary = _split_body(body, header_length)
    try:
        req = V2InferRequest.model_validate_json(head)
    except ValidationError as exc:
        parts = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
        raise InvalidInput("; ".join(parts) or "invalid request") from None
    if len(req.inputs) != 1:
        raise InvalidInput(f"the model takes exactly one input ({codec.INPUT_NAME!r}), got {len(req.inputs)}")
    (tensor,) = req.inputs
    count = codec.check_input_header(tensor.name, tensor.datatype, tensor.shape)
    # Checked before decoding so thousands of texts cost nothing; the data plane gives the same 413 later.
    check_count(count)
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or size != len(binary):
            raise InvalidInput(f"binary_data_size ({size!r}) does not match the {len(binary)} bytes of binary data")
        if tensor.data is not None:
            raise InvalidInput("input has both binary data and 'data'")
        return req, codec.decode_texts(count, raw=binary, items=None, max_items=max_items)
    if binary:
        raise InvalidInput("binary data follows the JSON header but no input declares binary_data_size")
    if tensor.data is None:
        raise InvalidInput(f"input {codec.INPUT_NAME!r} has no data")
    texts = _flatten_strings(tensor.data, max_items, check_count)
    if len(texts) != count:
        raise InvalidInput(f"input {codec.INPUT_NAME!r} has {len(texts)} elements but its shape says {count}")
    return req, texts


def _flatten_strings(data: list[Any], max_items: int, check_count: Callable[[int], None]) -> list[str]:
    out: list[str] = []
    stack: list[Any] = [iter(data)]
    depth_limit = 3  # shape [n] or [n, 1]: at most one level of nesting plus the outer list
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            if len(stack) >= depth_limit:
                raise InvalidInput(f"input {codec.INPUT_NAME!r} data is nested too deeply")
            stack.append(iter(item))
        elif isinstance(item, str):
            out.append(item)
            if len(out) > max_items:
                check_count(len(out))
        else:
            raise InvalidInput(f"input {codec.INPUT_NAME!r} data must be strings, got {type(item).__name__}")
    return out


_END = object()


def _bool_param(params: dict[str, Any], key: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"parameter {key!r} must be a boolean, got {value!r}")
    return value


def _variant_param(params: dict[str, Any]) -> str | None:
    value = params.get("variant")
    if value is not None and not isinstance(value, str):
        raise InvalidInput(f"parameter 'variant' must be a string, got {value!r}")
    return value


@router.post(
    "/v2/models/{model_name}/infer",
    summary="v2 inference: BYTES input 'text' -> 'probabilities' (FP32 [n, labels]) and 'labels' (BYTES [n])",
    responses=_ERRORS,
    openapi_extra=_INFER_OPENAPI,
)
@router.post("/v2/models/{model_name}/versions/{model_version}/infer", include_in_schema=False)
async def v2_infer(
    request: Request,
    model_name: str,
    model_version: str = "",
    x_deadline_ms: int | None = Header(None, alias=DEADLINE_HEADER, ge=1, le=3_600_000),
) -> Response:
    """Classify the texts of the 'text' input with the variant the model name or the 'variant' parameter picks."""
    arrived = time.monotonic()
    dataplane = get_dataplane(request)
    info = call_info(request)
    fixed = dataplane.resolve_model(model_name, model_version)
    if request.headers.get("content-encoding", "identity") != "identity":
        raise InvalidInput("compressed request bodies are not supported")
    limit = dataplane.settings.max_client_batch_size
    req, texts = _parse_request(await request.body(), request.headers.get(HEADER_LENGTH), limit, dataplane.check_count)
    params = req.parameters or {}
    variant = dataplane.pick_variant(fixed, _variant_param(params))
    binary_default = _bool_param(params, "binary_data_output")
    wanted = codec.check_outputs([o.name for o in req.outputs] if req.outputs else None)
    binary = {o.name: _bool_param(o.parameters or {}, "binary_data") for o in req.outputs or []}
    deadline = dataplane.deadline(
        arrived, codec.timeout_seconds(params.get("timeout")), None if x_deadline_ms is None else x_deadline_ms / 1000.0
    )
    done = await dataplane.classify(
        texts, variant=variant, deadline=deadline, disconnected=wait_disconnect(request), info=info
    )

    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for tensor in codec.encode_outputs(done, wanted):
        out: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if binary.get(tensor.name, binary_default):
            out["parameters"] = {"binary_data_size": len(tensor.raw)}
            blobs.append(tensor.raw)
        else:
            out["data"] = tensor.values
        outputs.append(out)
    payload: dict[str, Any] = {
        "model_name": model_name,
        "model_version": done.model_version,
        "parameters": {"variant": done.variant, "model": done.model},
        "outputs": outputs,
    }
    if req.id is not None:
        payload["id"] = req.id
    head = json.dumps(payload, separators=(",", ":")).encode()
    headers = {
        "x-queue-time": str(round(done.queue_seconds * 1000)),
        "x-inference-time": str(round(done.inference_seconds * 1000)),
    }
    if blobs:
        headers["Inference-Header-Content-Length"] = str(len(head))
        return Response(head + b"".join(blobs), media_type="application/octet-stream", headers=headers)
    return Response(head, media_type="application/json", headers=headers)
