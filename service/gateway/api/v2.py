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
from typing import Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service import __version__
from service.gateway.api import inference, tensors
from service.gateway.api.schemas import ErrorResponse
from service.gateway.errors import InvalidInput, error_body

router = APIRouter(tags=["Open Inference Protocol (v2)"])

HEADER_LENGTH = "inference-header-content-length"
SERVER_NAME = "loraserve-gateway"
EXTENSIONS = ["binary_tensor_data", "parameters"]

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


def _runtime(request: Request) -> inference.GatewayRuntime:
    runtime: inference.GatewayRuntime = request.app.state.runtime
    return runtime


async def _model_ready(runtime: inference.GatewayRuntime, variant: str | None) -> bool:
    if runtime.draining or not runtime.started:
        return False
    batchers = [runtime.batchers[variant]] if variant is not None else list(runtime.batchers.values())
    return all(b.running for b in batchers) and await runtime.backend.ready()


def _not_ready(reason: str) -> JSONResponse:
    return JSONResponse(error_body(reason, "not_ready"), status_code=503)


def model_metadata(runtime: inference.GatewayRuntime, name: str, variant: str | None) -> dict[str, Any]:
    """The v2 model metadata of ``name`` (shared with the gRPC server).

    Args:
        runtime: The gateway runtime.
        name: The requested model name.
        variant: The variant the name fixes, None for the prefix name.

    Returns:
        name, versions, platform, inputs and outputs.
    """
    models = [runtime.models[variant]] if variant is not None else list(runtime.models.values())
    labels = models[0].labels if variant is not None else runtime.models[runtime.settings.default_variant].labels
    return {
        "name": name,
        "versions": sorted({str(m.version) for m in models}),
        "platform": tensors.PLATFORM,
        "inputs": [{"name": tensors.INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": tensors.PROBABILITIES, "datatype": "FP32", "shape": [-1, len(labels)]},
            {"name": tensors.LABELS, "datatype": "BYTES", "shape": [-1]},
        ],
    }


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
    ready, reason = await _runtime(request).readiness()
    return {"ready": True} if ready else _not_ready(reason)


@router.get("/v2", summary="v2 server metadata")
async def v2_server_metadata() -> dict[str, Any]:
    """Name, version and protocol extensions of the gateway."""
    return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}


@router.get("/v2/models/{model_name}", summary="v2 model metadata", responses=_ERRORS)
@router.get("/v2/models/{model_name}/versions/{model_version}", include_in_schema=False)
async def v2_model_metadata(request: Request, model_name: str, model_version: str = "") -> dict[str, Any]:
    """Describe a served model: the 'text' input and the 'probabilities' and 'labels' outputs."""
    runtime = _runtime(request)
    variant = inference.resolve_model(runtime, model_name, model_version)
    return model_metadata(runtime, model_name, variant)


@router.get("/v2/models/{model_name}/ready", summary="v2 model readiness", responses=_ERRORS)
@router.get("/v2/models/{model_name}/versions/{model_version}/ready", include_in_schema=False)
async def v2_model_ready(request: Request, model_name: str, model_version: str = "") -> Any:
    """Answer 200 when the model's batcher runs, Triton is ready and the gateway is not draining."""
    runtime = _runtime(request)
    variant = inference.resolve_model(runtime, model_name, model_version)
    if await _model_ready(runtime, variant):
        return {"name": model_name, "ready": True}
    return _not_ready(f"model {model_name!r} is not ready")


@router.get("/v2/models/{model_name}/config", summary="v2 model configuration (Triton's shape)", responses=_ERRORS)
@router.get("/v2/models/{model_name}/versions/{model_version}/config", include_in_schema=False)
async def v2_model_config(request: Request, model_name: str, model_version: str = "") -> dict[str, Any]:
    """A Triton-style configuration: max_batch_size is the texts one request may carry."""
    runtime = _runtime(request)
    variant = inference.resolve_model(runtime, model_name, model_version)
    meta = model_metadata(runtime, model_name, variant)
    labels = list(runtime.models[variant or runtime.settings.default_variant].labels)
    return {
        "name": model_name,
        "platform": tensors.PLATFORM,
        "max_batch_size": runtime.settings.max_client_batch_size,
        "input": [{"name": tensors.INPUT_NAME, "data_type": "TYPE_STRING", "dims": [-1]}],
        "output": [
            {
                "name": o["name"],
                "data_type": "TYPE_FP32" if o["datatype"] == "FP32" else "TYPE_STRING",
                "dims": o["shape"],
            }
            for o in meta["outputs"]
        ],
        "parameters": {"labels": {"string_value": json.dumps(labels)}},
    }


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


def _parse_request(body: bytes, header_length: str | None, max_items: int) -> tuple[V2InferRequest, list[str]]:
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
        raise InvalidInput(f"the model takes exactly one input ({tensors.INPUT_NAME!r}), got {len(req.inputs)}")
    (tensor,) = req.inputs
    count = tensors.check_input_header(tensor.name, tensor.datatype, tensor.shape)
    if count > max_items:
        # Checked before decoding so thousands of texts cost nothing; check_texts gives the same 413 later.
        inference.raise_too_many(count, max_items)
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or size != len(binary):
            raise InvalidInput(f"binary_data_size ({size!r}) does not match the {len(binary)} bytes of binary data")
        if tensor.data is not None:
            raise InvalidInput("input has both binary data and 'data'")
        texts = tensors.texts_from_bytes(tensors.decode_bytes_tensor(binary, max_items=max_items))
    else:
        if binary:
            raise InvalidInput("binary data follows the JSON header but no input declares binary_data_size")
        if tensor.data is None:
            raise InvalidInput(f"input {tensors.INPUT_NAME!r} has no data")
        texts = _flatten_strings(tensor.data, max_items)
    if len(texts) != count:
        raise InvalidInput(f"input {tensors.INPUT_NAME!r} has {len(texts)} elements but its shape says {count}")
    return req, texts


def _flatten_strings(data: list[Any], max_items: int) -> list[str]:
    out: list[str] = []
    stack: list[Any] = [iter(data)]
    depth_limit = 3  # shape [n] or [n, 1]: at most one level of nesting plus the outer list
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            if len(stack) >= depth_limit:
                raise InvalidInput(f"input {tensors.INPUT_NAME!r} data is nested too deeply")
            stack.append(iter(item))
        elif isinstance(item, str):
            out.append(item)
            if len(out) > max_items:
                inference.raise_too_many(len(out), max_items)
        else:
            raise InvalidInput(f"input {tensors.INPUT_NAME!r} data must be strings, got {type(item).__name__}")
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
    x_deadline_ms: int | None = Header(None, alias="x-deadline-ms", ge=1, le=3_600_000),
) -> Response:
    """Classify the texts of the 'text' input with the variant the model name or the 'variant' parameter picks."""
    arrived = time.monotonic()
    runtime = _runtime(request)
    fixed = inference.resolve_model(runtime, model_name, model_version)
    if request.headers.get("content-encoding", "identity") != "identity":
        raise InvalidInput("compressed request bodies are not supported")
    req, texts = _parse_request(
        await request.body(), request.headers.get(HEADER_LENGTH), runtime.settings.max_client_batch_size
    )
    params = req.parameters or {}
    variant = inference.pick_variant(runtime, fixed, _variant_param(params))
    binary_default = _bool_param(params, "binary_data_output")
    wanted = tensors.check_outputs([o.name for o in req.outputs] if req.outputs else None)
    binary = {o.name: _bool_param(o.parameters or {}, "binary_data") for o in req.outputs or []}
    inference.check_texts(runtime, texts)
    batcher = inference.resolve_variant(runtime, variant)
    request.state.variant = batcher.model.variant  # read by the metrics middleware: bounded, a served variant
    deadline = inference.deadline_from(
        runtime,
        arrived,
        tensors.timeout_seconds(params.get("timeout")),
        None if x_deadline_ms is None else x_deadline_ms / 1000.0,
    )
    done = await inference.classify(runtime, batcher, texts, deadline, inference.wait_disconnect(request.receive))

    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name in wanted:
        if name == tensors.PROBABILITIES:
            matrix = tensors.probabilities_matrix(done.labels, [r.probabilities for r in done.results])
            out: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(matrix.shape)}
            raw, as_list = matrix.astype("<f4").tobytes(), matrix.reshape(-1).tolist()
        else:
            labels = [r.label for r in done.results]
            out = {"name": name, "datatype": "BYTES", "shape": [len(labels)]}
            raw, as_list = tensors.encode_bytes_tensor([lbl.encode() for lbl in labels]), labels
        if binary.get(name, binary_default):
            out["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            out["data"] = as_list
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
        "x-queue-time": str(round(max(r.queue_seconds for r in done.results) * 1000)),
        "x-inference-time": str(round(max(r.inference_seconds for r in done.results) * 1000)),
    }
    if blobs:
        headers["Inference-Header-Content-Length"] = str(len(head))
        return Response(head + b"".join(blobs), media_type="application/octet-stream", headers=headers)
    return Response(head, media_type="application/json", headers=headers)
