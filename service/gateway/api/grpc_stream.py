"""Text generation over the v2 gRPC protocol's bidirectional stream (``ModelStreamInfer``, decoupled responses).

``tritonclient.grpc.InferenceServerClient.start_stream(callback)`` + ``async_stream_infer("generator_fp32", inputs)``
against the gateway's gRPC port streams tokens exactly as ``POST /v1/generate`` does: the same validation, limits,
tokenizer, deadlines, API keys (the gRPC interceptor) and metrics, through the same
:meth:`GenerationService.run <service.gateway.api.generate.GenerationService.run>`. ``grpc_v2.py`` only forwards the
RPC here.

One stream may carry many requests (tritonclient sends every ``async_stream_infer`` on the client's one stream);
each runs as its own generation and its responses carry its request ``id``, so they may interleave.

Request (the model name is ``<prefix>_<variant>``, e.g. ``generator_fp32``, or the bare prefix for the default
variant). Input tensors, named as the REST body's fields (``text_input`` is accepted for ``prompt``, the name
Triton's TensorRT-LLM and vLLM backends use):

============================  =========================  ====================================================
input                         datatype, shape            meaning
============================  =========================  ====================================================
``prompt`` / ``text_input``   BYTES [1]                  raw text to continue
``messages``                  BYTES [1]                  chat turns as JSON ``[{"role", "content"}, ...]``
``max_new_tokens``            INT32/INT64 [1]            most tokens to generate
``temperature``, ``top_p``    FP32/FP64 [1]              sampling (temperature 0 = greedy)
``seed``                      INT64 [1]                  sampler seed
``stop``                      BYTES [n]                  stop strings
``ignore_eos``, ``stream``    BOOL [1]                   ``stream`` false: one response with the whole text
============================  =========================  ====================================================

Exactly one of prompt/text_input/messages. The request parameter ``timeout`` (microseconds, as Triton's) and the
stream's gRPC deadline can only shorten ``GATEWAY_GENERATE__REQUEST_TIMEOUT_SECONDS``.

Responses mirror Triton's decoupled streams: every response has the parameter ``triton_final_response`` (false,
then true on the last one of the request), and outputs ``text_output`` (BYTES [1], the new text), ``token_ids``
(INT64 [k], its tokens) and ``finish_reason`` (BYTES [1]; "" until the last response, then ``eos``, ``stop`` or
``length``). The last response carries no new text when streaming (with ``stream`` false it is the only one, with
the whole text and every token) and has the parameters ``prompt_tokens``, ``completion_tokens`` and
``time_to_first_token_seconds``. ``enable_empty_final_response`` adds nothing: the last response is flagged final.
Text is held back exactly as in the SSE stream (incomplete UTF-8, a possible stop string), so one response may
carry several tokens.

Errors: a request that fails gets one response with ``error_message`` set (and no further responses); the other
requests on the stream go on. Errors inside a stream have no status code of their own in the protocol, so the
message starts with the gRPC status tritonclient would print for a failed unary call, then the gateway's
``error_type``: ``[StatusCode.INVALID_ARGUMENT] invalid_input: prompt is empty or only whitespace``. The response
also carries ``infer_response`` with the request id and the parameters ``grpc_status``, ``error_type``,
``http_status`` (and ``retry_after_seconds`` for RESOURCE_EXHAUSTED) for clients that read the raw messages.
API keys are checked for the whole stream by the interceptor (UNAUTHENTICATED / PERMISSION_DENIED end the RPC).

Cancellation: when the client cancels the stream (``stop_stream(cancel_requests=True)``, closing the client, its
deadline), every generation on it is cancelled; the backend stream to Triton is cancelled and the model frees the
KV caches at its next iteration (counted as ``client_disconnect`` evictions).
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from pydantic import ValidationError
from tritonclient.grpc import service_pb2

from service.gateway.api.generate import Delta, Finished, GenerateRequest, GenerationService, GeneratorModel
from service.gateway.errors import (
    BackendUnavailable,
    ClientClosedRequest,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    ServiceError,
    public_error,
)

logger = logging.getLogger("service.gateway.grpc.generate")

OPERATION = "generate"
PROTOCOL = "grpc"
FINAL_PARAMETER = "triton_final_response"
TEXT_OUTPUT = "text_output"
TOKEN_IDS_OUTPUT = "token_ids"
FINISH_REASON_OUTPUT = "finish_reason"
#: Responses buffered per stream before the generations wait for the client to read (back-pressure).
_MAX_BUFFERED_RESPONSES = 256
#: Most elements of the ``stop`` input (the settings' max_stop_strings decides the real limit).
_MAX_TENSOR_ITEMS = 1024
_LENGTH = struct.Struct("<I")

_NUMERIC = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "FP32": np.float32,
    "FP64": np.float64,
}
_CONTENTS = {  # InferTensorContents field of each datatype (the non-binary form)
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
#: Input name -> (GenerateRequest field, kind).
_INPUTS: dict[str, tuple[str, str]] = {
    "prompt": ("prompt", "text"),
    "text_input": ("prompt", "text"),
    "messages": ("messages", "json"),
    "max_new_tokens": ("max_new_tokens", "int"),
    "temperature": ("temperature", "float"),
    "top_p": ("top_p", "float"),
    "seed": ("seed", "int"),
    "stop": ("stop", "texts"),
    "ignore_eos": ("ignore_eos", "bool"),
    "stream": ("stream", "bool"),
}
_KIND_TYPES = {
    "text": ("BYTES",),
    "json": ("BYTES",),
    "texts": ("BYTES",),
    "int": ("INT32", "INT64", "UINT32", "UINT64", "INT16", "INT8", "UINT16", "UINT8"),
    "float": ("FP32", "FP64"),
    "bool": ("BOOL",),
}


def _split_bytes(name: str, raw: bytes) -> list[bytes]:
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if len(items) >= _MAX_TENSOR_ITEMS:
            raise InvalidInput(f"input {name!r} holds more than {_MAX_TENSOR_ITEMS} elements")
        if offset + 4 > len(raw):
            raise InvalidInput(f"input {name!r}: truncated BYTES element length at byte {offset}")
        (size,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidInput(f"input {name!r}: BYTES element of {size} bytes runs past the end of the data")
        items.append(raw[offset : offset + size])
        offset += size
    return items


def _tensor_values(tensor: Any, raw: bytes | None) -> list[Any]:
    """The elements of one input tensor (raw binary or typed contents), flattened, checked against its shape."""
    name, datatype = tensor.name, tensor.datatype
    shape = list(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input {name!r} has a negative dimension in its shape {shape}")
    count = int(np.prod(shape)) if shape else 1
    if datatype == "BYTES":
        if raw is not None:
            items: list[Any] = _split_bytes(name, raw)
        else:
            items = list(tensor.contents.bytes_contents)
    elif datatype in _NUMERIC:
        if raw is not None:
            dtype = np.dtype(_NUMERIC[datatype]).newbyteorder("<")
            if len(raw) != count * dtype.itemsize:
                raise InvalidInput(f"input {name!r}: {len(raw)} bytes do not hold {count} {datatype} values")
            items = np.frombuffer(raw, dtype=dtype).tolist()
        else:
            items = list(getattr(tensor.contents, _CONTENTS[datatype]))
    else:
        raise InvalidInput(f"input {name!r} has an unsupported datatype {datatype!r}")
    if len(items) != count:
        raise InvalidInput(f"input {name!r} has {len(items)} elements but its shape {shape} says {count}")
    return items


def _text(name: str, value: Any) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"input {name!r} is not valid UTF-8") from None


def request_body(request: Any) -> GenerateRequest:
    """The :class:`GenerateRequest` a ``ModelInferRequest`` stands for (the REST body's validation applies).

    Raises:
        InvalidInput: Unknown, repeated or malformed inputs, or values the REST body would refuse.
    """
    raws = list(request.raw_input_contents)
    if raws and len(raws) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raws)} entries for {len(request.inputs)} inputs; give all or none"
        )
    fields: dict[str, Any] = {"stream": True}
    seen: set[str] = set()
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if name not in _INPUTS:
            raise InvalidInput(f"unknown input {name!r}; the generator takes {', '.join(sorted(_INPUTS))}")
        field, kind = _INPUTS[name]
        if field in seen:
            raise InvalidInput(f"input {name!r} repeats a value already given ({field})")
        seen.add(field)
        if tensor.datatype not in _KIND_TYPES[kind]:
            raise InvalidInput(f"input {name!r} must be {' or '.join(_KIND_TYPES[kind])}, got {tensor.datatype!r}")
        values = _tensor_values(tensor, raws[i] if raws else None)
        if kind == "texts":
            fields[field] = [_text(name, v) for v in values]
            continue
        if len(values) != 1:
            raise InvalidInput(f"input {name!r} must hold exactly one element, got {len(values)}")
        value = values[0]
        if kind == "text":
            fields[field] = _text(name, value)
        elif kind == "json":
            try:
                fields[field] = json.loads(_text(name, value))
            except json.JSONDecodeError:
                raise InvalidInput(f"input {name!r} is not valid JSON") from None
        elif kind == "int":
            fields[field] = int(value)
        elif kind == "float":
            if not np.isfinite(value):
                raise InvalidInput(f"input {name!r} must be a finite number")
            fields[field] = float(value)
        else:
            fields[field] = bool(value)
    try:
        return GenerateRequest(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        raise InvalidInput(f"{where}: {first.get('msg', 'invalid value')}") from None


def _timeout_seconds(request: Any) -> float | None:
    if "timeout" not in request.parameters:
        return None
    param = request.parameters["timeout"]
    choice = param.WhichOneof("parameter_choice")
    if choice not in ("int64_param", "uint64_param") or getattr(param, choice) <= 0:
        raise InvalidInput("parameter 'timeout' must be a positive integer (microseconds)")
    return getattr(param, choice) / 1e6


def _add_output(response: Any, name: str, datatype: str, shape: list[int], raw: bytes) -> None:
    out = response.outputs.add(name=name, datatype=datatype)
    out.shape.extend(shape)
    response.raw_output_contents.append(raw)


def _bytes_raw(text: str) -> bytes:
    data = text.encode("utf-8")
    return _LENGTH.pack(len(data)) + data


def token_response(
    request: Any, model: GeneratorModel, text: str, token_ids: list[int], finish_reason: str, final: bool
) -> Any:
    """One streamed response of a request (see the module docstring for its outputs and parameters)."""
    infer = service_pb2.ModelInferResponse(
        model_name=model.model_name, model_version=model.version_dir.name, id=request.id
    )
    infer.parameters[FINAL_PARAMETER].bool_param = final
    _add_output(infer, TEXT_OUTPUT, "BYTES", [1], _bytes_raw(text))
    _add_output(infer, TOKEN_IDS_OUTPUT, "INT64", [len(token_ids)], np.asarray(token_ids, dtype="<i8").tobytes())
    _add_output(infer, FINISH_REASON_OUTPUT, "BYTES", [1], _bytes_raw(finish_reason))
    return service_pb2.ModelStreamInferResponse(infer_response=infer)


def error_response(request: Any, exc: BaseException) -> tuple[Any, int]:
    """The error response of a failed request and the HTTP-equivalent status for the metrics."""
    public = public_error(exc)
    infer = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
    infer.parameters[FINAL_PARAMETER].bool_param = True
    infer.parameters["grpc_status"].string_param = public.grpc_code
    infer.parameters["error_type"].string_param = public.error_type
    infer.parameters["http_status"].int64_param = public.status
    if isinstance(public, Overloaded):
        infer.parameters["retry_after_seconds"].int64_param = public.retry_after_seconds
    message = f"[StatusCode.{public.grpc_code}] {public.error_type}: {public.message}"
    return service_pb2.ModelStreamInferResponse(error_message=message, infer_response=infer), public.status


def resolve_model(service: GenerationService, name: str, version: str) -> GeneratorModel:
    """The served generator behind a v2 model name (``<prefix>_<variant>`` or the bare prefix) and version.

    Raises:
        ModelNotFound: Generation is off, or no generator of that name/version is served.
    """
    prefix = service.config.model_name_prefix
    variant: str | None
    if name == prefix:
        variant = None
    elif name.startswith(prefix + "_"):
        variant = name[len(prefix) + 1 :]
    else:
        variant = ""
    if not service.config.enabled:
        raise ModelNotFound("text generation is not enabled on this gateway (GATEWAY_GENERATE__ENABLED)")
    model = service.models.get(variant or service.config.default_variant) if variant != "" else None
    if model is None:
        served = ", ".join(m.model_name for m in service.models.values())
        raise ModelNotFound(
            f"model {name!r} is not a generator served here (ModelStreamInfer serves: {served}; classify with "
            "ModelInfer)"
        )
    if version and version != model.version_dir.name:
        raise ModelNotFound(f"model {name!r} has no served version {version!r} (serving {model.version_dir.name})")
    return model


class _Stream:
    """The generations of one ``ModelStreamInfer`` call and the queue their responses leave through."""

    def __init__(self, service: GenerationService, runtime: Any, context: Any) -> None:
        self.service = service
        self.runtime = runtime
        self.context = context
        self.out: asyncio.Queue[Any] = asyncio.Queue(maxsize=_MAX_BUFFERED_RESPONSES)
        self.tasks: set[asyncio.Task[None]] = set()
        self.open = 1  # the request reader, plus one per running generation
        self.end = object()
        self._closer: asyncio.Future[None] | None = None

    def _done(self, task: asyncio.Task[None] | None = None) -> None:
        if task is not None:
            self.tasks.discard(task)
        self.open -= 1
        if self.open == 0:  # every producer finished: the end marker goes last
            if self.out.full():
                self._closer = asyncio.ensure_future(self.out.put(self.end))
            else:
                self.out.put_nowait(self.end)

    async def read(self, requests: AsyncIterator[Any]) -> None:
        try:
            async for request in requests:
                task = asyncio.ensure_future(self.generate(request))
                self.open += 1
                self.tasks.add(task)
                task.add_done_callback(self._done)
        finally:
            self._done()

    async def generate(self, request: Any) -> None:
        """Run one request of the stream to its end, putting its responses on the queue."""
        arrived = time.monotonic()
        started = time.perf_counter()
        service = self.service
        variant: str | None = None
        code = 200
        answered = False
        try:
            model = resolve_model(service, request.model_name, request.model_version)
            variant = model.variant
            if self.runtime.draining:
                raise BackendUnavailable("gateway is draining; retry on another instance")
            body = request_body(request)
            prompt_ids, params = service.prepare(body, model)
            budget = service.config.request_timeout_seconds
            for client_budget in (_timeout_seconds(request), self.context.time_remaining()):
                if client_budget is not None:
                    budget = min(budget, client_budget)
            events = service.run(
                model,
                prompt_ids,
                params,
                body.stop,
                arrived=arrived,
                deadline=arrived + budget,
                request_id=request.id,
            )
            collected: list[int] = []
            try:
                async for item in events:
                    if not answered:
                        answered = True
                        self.runtime.metrics.observe_request(
                            OPERATION, PROTOCOL, variant, 200, time.perf_counter() - started
                        )
                    if isinstance(item, Delta):
                        if body.stream:
                            await self.out.put(token_response(request, model, item.text, item.token_ids, "", False))
                        else:
                            collected.extend(item.token_ids)
                        continue
                    assert isinstance(item, Finished)
                    final = token_response(
                        request,
                        model,
                        "" if body.stream else item.text,
                        [] if body.stream else collected,
                        item.finish_reason,
                        True,
                    )
                    p = final.infer_response.parameters
                    p["prompt_tokens"].int64_param = item.prompt_tokens
                    p["completion_tokens"].int64_param = item.completion_tokens
                    p["time_to_first_token_seconds"].double_param = round(item.time_to_first_token_seconds, 6)
                    await self.out.put(final)
                    return
            finally:
                await events.aclose()  # cancelled or failed: cancels the backend stream, frees the cache
        except asyncio.CancelledError:
            code = ClientClosedRequest.status
            raise
        except Exception as exc:
            if not isinstance(exc, ServiceError):
                logger.exception("unhandled error in a generation stream (request id %r)", request.id)
            response, code = error_response(request, exc)
            await self.out.put(response)
        finally:
            if not answered:
                self.runtime.metrics.observe_request(OPERATION, PROTOCOL, variant, code, time.perf_counter() - started)

    async def aclose(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


async def model_stream_infer(runtime: Any, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
    """Serve one ``ModelStreamInfer`` call: yields ``ModelStreamInferResponse`` messages until every request on the
    stream is answered and the client has half-closed its side.

    Args:
        runtime: The gateway runtime; its ``generation`` attribute is the :class:`GenerationService`.
        requests: The client's ``ModelInferRequest`` messages.
        context: The gRPC servicer context.
    """
    service: GenerationService | None = getattr(runtime, "generation", None)
    if service is None:  # pragma: no cover - create_app always attaches one
        raise RuntimeError("the gateway runtime has no generation service")
    stream = _Stream(service, runtime, context)
    reader = asyncio.ensure_future(stream.read(requests))
    try:
        while True:
            item = await stream.out.get()
            if item is stream.end:
                break
            yield item
        await reader  # surfaces a failed request iterator
    finally:
        # The client cancelled (or the server stops): end every generation of the stream, which frees their caches.
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await stream.aclose()
