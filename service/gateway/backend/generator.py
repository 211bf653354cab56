"""The generator backend: one Triton gRPC bidirectional stream (``ModelStreamInfer``) per generation request.

Why the raw gRPC stub and not ``tritonclient.grpc.aio``'s ``stream_infer``: a generation must be cancellable at
once (the client went away, a stop string matched, the deadline passed), and cancelling the gRPC call is what
makes Triton cancel the request, which frees the sequence's KV cache in the model. The stub's call object has
``cancel()``; the request side of the stream stays open until the last response so Triton never sees a
half-closed stream while tokens are still coming.

Errors: transport failures map by gRPC status code (UNAVAILABLE -> 503, DEADLINE_EXCEEDED -> 504, else 502).
Errors *inside* the stream carry only a message, so the model prefixes every message with a code
(``service/generator/triton_model.py``): ``invalid_input`` -> 422, ``overloaded`` -> 429 (KV cache or sequence
budget full), ``unavailable`` -> 503, anything else -> 502. Model text never reaches the client beyond the
``invalid_input`` explanation, which describes the client's own request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from service.gateway.errors import (
    BackendError,
    BackendUnavailable,
    DeadlineExceeded,
    InvalidInput,
    Overloaded,
    ServiceError,
)

logger = logging.getLogger("service.gateway.backend.generator")

_STARTUP_RETRY_SECONDS = 0.25


@dataclass(frozen=True)
class GenerateParams:
    """Sampling and length parameters of one generation.

    Attributes:
        max_new_tokens: Most tokens to generate.
        temperature: 0 = greedy.
        top_p: Nucleus mass.
        seed: RNG seed of the sequence (None: random).
        ignore_eos: Keep going past the end-of-sequence token.
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class TokenEvent:
    """One streamed token and the engine state the model reported with it.

    Attributes:
        token_id: The generated token.
        step: Engine iteration that produced it.
        batch_size: Sequences in that iteration's batch.
        kv_cache_bytes: KV-cache bytes in use in the model.
        active_sequences: Sequences holding a cache in the model.
        finish_reason: "" while running, "length" or "eos" on the last token.
    """

    token_id: int
    step: int
    batch_size: int
    kv_cache_bytes: int
    active_sequences: int
    finish_reason: str


def map_stream_error(message: str, model: str, retry_after_seconds: int) -> ServiceError:
    """Translate a model's in-stream error message (``<code>: <text>``) into the gateway's error."""
    code, _, text = message.partition(":")
    code = code.strip()
    if code == "invalid_input":
        return InvalidInput(text.strip() or "invalid generation request")
    if code == "overloaded":
        return Overloaded(f"model {model} has no KV-cache room; retry later", retry_after_seconds=retry_after_seconds)
    if code == "unavailable":
        return BackendUnavailable(f"model {model} is unavailable")
    logger.warning("generator %s failed: %s", model, message)
    return BackendError(f"model {model} failed")


def map_rpc_error(error: grpc.aio.AioRpcError, model: str) -> ServiceError:
    """Translate a transport-level gRPC failure (by status code, never message text)."""
    code = error.code()
    logger.warning("generator stream to %s failed: %s %s", model, code, error.details())
    if code == grpc.StatusCode.UNAVAILABLE:
        return BackendUnavailable(f"inference server unavailable for model {model}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"model {model} did not finish before the deadline")
    return BackendError(f"inference server failed for model {model} ({code.name})")


def _tensor(request: Any, name: str, datatype: str, array: np.ndarray) -> None:
    tensor = request.inputs.add()
    tensor.name = name
    tensor.datatype = datatype
    tensor.shape.extend(array.shape)
    request.raw_input_contents.append(array.tobytes())


def build_request(model: str, input_ids: Sequence[int], params: GenerateParams, request_id: str = "") -> Any:
    """The ``ModelInferRequest`` of one generation (the generator's inputs, raw little-endian contents)."""
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    _tensor(request, "input_ids", "INT64", np.asarray(list(input_ids), dtype=np.int64))
    _tensor(request, "max_new_tokens", "INT32", np.asarray([params.max_new_tokens], dtype=np.int32))
    _tensor(request, "temperature", "FP32", np.asarray([params.temperature], dtype=np.float32))
    _tensor(request, "top_p", "FP32", np.asarray([params.top_p], dtype=np.float32))
    _tensor(request, "seed", "INT64", np.asarray([-1 if params.seed is None else params.seed], dtype=np.int64))
    _tensor(request, "ignore_eos", "BOOL", np.asarray([params.ignore_eos], dtype=np.bool_))
    return request


def _outputs(response: Any) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if tensor.datatype == "BYTES":
            (length,) = struct.unpack_from("<I", raw, 0)
            values[tensor.name] = raw[4 : 4 + length].decode("utf-8", errors="replace")
        else:
            dtype = {"INT64": np.int64, "INT32": np.int32}[tensor.datatype]
            values[tensor.name] = int(np.frombuffer(raw, dtype=dtype)[0])
    return values


def parse_event(response: Any) -> TokenEvent:
    """A ``TokenEvent`` from one ``ModelInferResponse`` of the generator."""
    v = _outputs(response)
    return TokenEvent(
        token_id=v["token_id"],
        step=v["step"],
        batch_size=v["batch_size"],
        kv_cache_bytes=v["kv_cache_bytes"],
        active_sequences=v["active_sequences"],
        finish_reason=v.get("finish_reason", ""),
    )


class GeneratorStream:
    """One running generation: iterate for :class:`TokenEvent`; ``cancel()`` ends it (and frees its cache).

    Raises (while iterating):
        ServiceError: The mapped error of the stream or the transport.
    """

    def __init__(self, stub: Any, request: Any, model: str, *, timeout_seconds: float | None, retry_after: int) -> None:
        self._model = model
        self._retry_after = retry_after
        self._done = asyncio.Event()
        self._call = stub.ModelStreamInfer(self._requests(request), timeout=timeout_seconds)
        self.finished = False

    async def _requests(self, request: Any) -> AsyncIterator[Any]:
        yield request
        await self._done.wait()  # keep our side open until the last token arrived

    def cancel(self) -> None:
        """Cancel the RPC now (Triton cancels the request; the model frees the cache at its next iteration)."""
        self._done.set()
        if not self.finished:
            self._call.cancel()

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[TokenEvent]:
        try:
            async for message in self._call:
                if message.error_message:
                    self.finished = True
                    raise map_stream_error(message.error_message, self._model, self._retry_after)
                event = parse_event(message.infer_response)
                if event.finish_reason:
                    self.finished = True
                yield event
                if self.finished:
                    return
            self.finished = True
            raise BackendError(f"model {self._model} closed the stream before the last token")
        except grpc.aio.AioRpcError as error:
            self.finished = True
            if error.code() == grpc.StatusCode.CANCELLED:
                raise asyncio.CancelledError() from None
            raise map_rpc_error(error, self._model) from None
        finally:
            self._done.set()


class GeneratorClient:
    """gRPC connection to Triton for the generator models.

    Args:
        grpc_url: ``host:port`` of Triton.
        channel_options: gRPC channel arguments (the classify backend's ``channel_args``).
        retry_after_seconds: Retry-After of the 429 on a full KV cache.
        health_timeout_seconds: Timeout of readiness RPCs.
    """

    def __init__(
        self,
        grpc_url: str,
        *,
        channel_options: Sequence[tuple[str, Any]] = (),
        retry_after_seconds: int = 1,
        health_timeout_seconds: float = 2.0,
    ) -> None:
        self._url = grpc_url
        self._options = list(channel_options)
        self._retry_after = retry_after_seconds
        self._health_timeout = health_timeout_seconds
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None

    def _ensure(self) -> Any:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self._url, options=self._options)
            self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    async def start(self, models: Sequence[str], *, timeout_seconds: float) -> None:
        """Open the channel and wait (bounded) until every model is ready.

        Raises:
            RuntimeError: If a model is not ready in time.
        """
        self._ensure()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_seconds
        while True:
            if await self.ready(models):
                return
            if loop.time() >= deadline:
                raise RuntimeError(
                    f"generator models {list(models)} not ready on {self._url} after {timeout_seconds} s"
                )
            await asyncio.sleep(_STARTUP_RETRY_SECONDS)

    async def ready(self, models: Sequence[str]) -> bool:
        """Whether Triton answers and every model is ready."""
        stub = self._ensure()
        try:
            for model in models:
                reply = await stub.ModelReady(service_pb2.ModelReadyRequest(name=model), timeout=self._health_timeout)
                if not reply.ready:
                    return False
            return True
        except grpc.aio.AioRpcError:
            return False

    def stream(
        self,
        model: str,
        input_ids: Sequence[int],
        params: GenerateParams,
        *,
        timeout_seconds: float | None = None,
        request_id: str = "",
    ) -> GeneratorStream:
        """Start one generation (the RPC starts at once; iterate the result for tokens)."""
        request = build_request(model, input_ids, params, request_id)
        return GeneratorStream(
            self._ensure(), request, model, timeout_seconds=timeout_seconds, retry_after=self._retry_after
        )

    async def stats(self, model: str) -> dict[str, int]:
        """The model's engine totals (KV-cache bytes in use, active sequences, evictions, steps)."""
        request = service_pb2.ModelInferRequest(model_name=model)
        _tensor(request, "stats_only", "BOOL", np.asarray([True], dtype=np.bool_))
        stream = GeneratorStream(
            self._ensure(), request, model, timeout_seconds=self._health_timeout, retry_after=self._retry_after
        )
        async for message in stream._call:
            if message.error_message:
                stream.cancel()
                raise map_stream_error(message.error_message, model, self._retry_after)
            values = _outputs(message.infer_response)
            stream.finished = True
            stream.cancel()
            return json.loads(values["finish_reason"])
        raise BackendError(f"model {model} sent no statistics")

    async def aclose(self) -> None:
        """Close the channel (running streams end with CANCELLED)."""
        if self._channel is not None:
            await self._channel.close()
        self._channel = None
        self._stub = None
