"""The Open Inference Protocol (v2) over gRPC: ``inference.GRPCInferenceService`` in the gateway process.

Messages and the service stub come from the definitions tritonclient ships (``tritonclient.grpc.service_pb2``,
``service_pb2_grpc``, ``model_config_pb2``), so any v2 gRPC client (tritonclient, KServe's) works unchanged.
``ModelInfer`` feeds the same per-variant batcher as the REST routes; the gRPC deadline of the call, Triton's
``timeout`` parameter (microseconds) and ``GATEWAY_REQUEST_TIMEOUT_SECONDS`` bound the wait, the shortest wins.

Also served: the standard ``grpc.health.v1.Health`` service (Kubernetes gRPC probes; SERVING exactly when /readyz
is 200, so NOT_SERVING while draining or while Triton is down) and server reflection (so grpcurl works without
.proto files). Implemented RPCs: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig,
ModelInfer, and ModelStreamInfer for the generator models (:mod:`service.gateway.api.grpc_stream`); the others answer
UNIMPLEMENTED.

Errors map through each error class's ``grpc_code`` (:mod:`service.gateway.errors`); anything unexpected is
INTERNAL with the generic message and a logged traceback. Every RPC is counted in the request metrics with the
HTTP-equivalent status code (OK = 200, a gateway error its class's status, a cancelled call 499), so dashboards and
the autoscaler read one vocabulary whatever the protocol.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from service.gateway.api import v2_codec as codec
from service.gateway.api.auth import GrpcApiKeyInterceptor
from service.gateway.dataplane import CallInfo, DataPlane
from service.gateway.errors import ClientClosedRequest, InvalidInput, Overloaded, ServiceError, public_error

logger = logging.getLogger("service.gateway.grpc")

SERVICE_NAME = "inference.GRPCInferenceService"
HEALTH_SERVICE_NAME = "grpc.health.v1.Health"
#: Room above max_body_bytes for the protobuf framing of a request carrying that many bytes of text.
_MESSAGE_OVERHEAD_BYTES = 64 * 1024

R = TypeVar("R")

#: RPC name -> ``operation`` label of the request metrics.
OPERATIONS = {
    "ServerLive": "health",
    "ServerReady": "health",
    "ModelReady": "health",
    "ServerMetadata": "metadata",
    "ModelMetadata": "metadata",
    "ModelConfig": "metadata",
    "ModelInfer": "classify",
}


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str, int]:
    """The gRPC status, the message a client may see, and the HTTP-equivalent code of any exception.

    Exceptions outside the hierarchy and ``Internal`` give INTERNAL with the generic message, so no text leaks.
    """
    public = public_error(exc)
    return grpc.StatusCode[public.grpc_code], public.message, public.status


def _rpc(method: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Wrap an RPC: map errors to gRPC statuses without leaking text, and count it in the request metrics."""
    name = method.__name__
    operation = OPERATIONS.get(name, "other")

    @functools.wraps(method)
    async def wrapper(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> R:
        started = time.perf_counter()
        code = 200
        info = CallInfo()
        try:
            return await method(self, request, context, info)
        except asyncio.CancelledError:
            code = ClientClosedRequest.status  # the client cancelled or its deadline passed; nobody is listening
            raise
        except Exception as exc:
            if not isinstance(exc, ServiceError):
                logger.exception("unhandled error in %s", name)
            status, message, code = grpc_status(exc)
            if isinstance(exc, Overloaded):
                context.set_trailing_metadata((("retry-after", str(exc.retry_after_seconds)),))
            await context.abort(status, message)
            raise AssertionError("unreachable") from None  # abort raises  # pragma: no cover
        finally:
            self.dataplane.runtime.metrics.observe_request(
                operation, "grpc", info.variant, code, time.perf_counter() - started
            )

    return wrapper


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """v2 ``GRPCInferenceService`` for the text classifier, on the gateway's runtime.

    Args:
        dataplane: The gateway's data plane.
    """

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    @_rpc
    async def ServerLive(self, request: Any, context: Any, info: CallInfo) -> Any:  # noqa: N802 - gRPC method names
        """Live while the process runs."""
        return service_pb2.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, request: Any, context: Any, info: CallInfo) -> Any:  # noqa: N802 - gRPC method names
        """Ready exactly when /readyz is 200."""
        ready, _ = await self.dataplane.readiness()
        return service_pb2.ServerReadyResponse(ready=ready)

    @_rpc
    async def ModelReady(self, request: Any, context: Any, info: CallInfo) -> Any:  # noqa: N802 - gRPC method names
        """Ready when the model's batcher runs, Triton is ready and the gateway is not draining."""
        dp = self.dataplane
        ready = await dp.model_ready(dp.resolve_model(request.name, request.version))
        return service_pb2.ModelReadyResponse(ready=ready)

    @_rpc
    async def ServerMetadata(self, request: Any, context: Any, info: CallInfo) -> Any:  # noqa: N802 - gRPC method names
        """Name, version and extensions."""
        name, version = self.dataplane.server_metadata()
        return service_pb2.ServerMetadataResponse(name=name, version=version, extensions=codec.EXTENSIONS)

    @_rpc
    async def ModelMetadata(self, request: Any, context: Any, info: CallInfo) -> Any:  # noqa: N802 - gRPC method names
        """The 'text' input and the 'probabilities' and 'labels' outputs."""
        meta = codec.model_metadata(self.dataplane.describe(request.name, request.version))
        tm = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tm(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["inputs"]],
            outputs=[tm(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["outputs"]],
        )

    @_rpc
    async def ModelConfig(self, request: Any, context: Any, info: CallInfo) -> Any:  # noqa: N802 - gRPC method names
        """A Triton ModelConfig: max_batch_size is the texts one request may carry; labels in a parameter."""
        cfg_dict = codec.model_config(self.dataplane.describe(request.name, request.version))
        cfg = model_config_pb2.ModelConfig(
            name=cfg_dict["name"],
            platform=cfg_dict["platform"],
            max_batch_size=cfg_dict["max_batch_size"],
            input=[
                model_config_pb2.ModelInput(
                    name=t["name"], data_type=model_config_pb2.DataType.Value(t["data_type"]), dims=t["dims"]
                )
                for t in cfg_dict["input"]
            ],
            output=[
                model_config_pb2.ModelOutput(
                    name=t["name"], data_type=model_config_pb2.DataType.Value(t["data_type"]), dims=t["dims"]
                )
                for t in cfg_dict["output"]
            ],
        )
        for key, value in cfg_dict["parameters"].items():
            cfg.parameters[key].string_value = value["string_value"]
        return service_pb2.ModelConfigResponse(config=cfg)

    @_rpc
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext, info: CallInfo) -> Any:  # noqa: N802 - gRPC method names
        """Classify the texts of the 'text' input; one row of each output per text."""
        arrived = time.monotonic()
        dp = self.dataplane
        fixed = dp.resolve_model(request.model_name, request.model_version)
        if len(request.inputs) != 1:
            raise InvalidInput(f"the model takes exactly one input ({codec.INPUT_NAME!r}), got {len(request.inputs)}")
        tensor = request.inputs[0]
        count = codec.check_input_header(tensor.name, tensor.datatype, list(tensor.shape))
        dp.check_count(count)
        limit = dp.settings.max_client_batch_size
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1:
                raise InvalidInput("raw_input_contents must hold exactly one entry, for the 'text' input")
            texts = codec.decode_texts(count, raw=request.raw_input_contents[0], items=None, max_items=limit)
        else:
            texts = codec.decode_texts(count, raw=None, items=list(tensor.contents.bytes_contents), max_items=limit)
        params = request.parameters
        requested = None
        if "variant" in params:
            if params["variant"].WhichOneof("parameter_choice") != "string_param":
                raise InvalidInput("parameter 'variant' must be a string")
            requested = params["variant"].string_param
        timeout = None
        if "timeout" in params:
            choice = params["timeout"].WhichOneof("parameter_choice")
            raw = getattr(params["timeout"], choice) if choice in ("int64_param", "uint64_param") else None
            timeout = codec.timeout_seconds(raw if raw is not None else "not an integer")
        wanted = codec.check_outputs([o.name for o in request.outputs] or None)
        deadline = dp.deadline(arrived, timeout, context.time_remaining())
        done = await dp.classify(texts, variant=dp.pick_variant(fixed, requested), deadline=deadline, info=info)

        response = service_pb2.ModelInferResponse(
            model_name=request.model_name, model_version=done.model_version, id=request.id
        )
        response.parameters["variant"].string_param = done.variant
        response.parameters["model"].string_param = done.model
        for out_tensor in codec.encode_outputs(done, wanted):
            out = response.outputs.add(name=out_tensor.name)
            out.datatype, out.shape[:] = out_tensor.datatype, out_tensor.shape
            response.raw_output_contents.append(out_tensor.raw)
        context.set_trailing_metadata(
            (
                ("x-queue-time", str(round(done.queue_seconds * 1000))),
                ("x-inference-time", str(round(done.inference_seconds * 1000))),
            )
        )
        return response

    async def ModelStreamInfer(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:  # noqa: N802 - gRPC method names
        """Text generation with decoupled responses (tokens as they come): :mod:`service.gateway.api.grpc_stream`."""
        from service.gateway.api.grpc_stream import model_stream_infer

        async for response in model_stream_infer(self.dataplane.runtime, request_iterator, context):
            yield response


class GatewayHealth(health_pb2_grpc.HealthServicer):
    """``grpc.health.v1.Health`` backed by the gateway's readiness.

    ``Check`` computes the status on every call (SERVING when /readyz would answer 200), so a Kubernetes gRPC probe
    sees Triton outages and draining without any polling here. ``Watch`` sends the current status, then
    NOT_SERVING once draining begins. Known services: "" (the whole server) and ``inference.GRPCInferenceService``.

    Args:
        dataplane: The gateway's data plane.
    """

    SERVICES = ("", SERVICE_NAME)

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        runtime = dataplane.runtime
        self._drained = asyncio.Event()
        loop = asyncio.get_running_loop()
        # The drain flag may be set from a signal handler: hand the event over through the loop, thread-safely.
        runtime.add_drain_listener(lambda: loop.call_soon_threadsafe(self._drained.set))

    async def _status(self, service: str) -> int:
        if service not in self.SERVICES:
            return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        ready, _ = await self.dataplane.readiness()
        return health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802 - gRPC method names
        """The current status; NOT_FOUND for an unknown service (as the protocol asks)."""
        status = await self._status(request.service)
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:  # noqa: N802 - gRPC method names
        """Stream the status now and the change to NOT_SERVING when draining starts; ends when the client does."""
        status = await self._status(request.service)
        yield health_pb2.HealthCheckResponse(status=status)
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            return
        if not self.dataplane.runtime.draining:
            await self._drained.wait()
        if status != health_pb2.HealthCheckResponse.NOT_SERVING:
            yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)


class GrpcServer:
    """The gateway's gRPC server: v2 inference, health and reflection, bound on ``host:port``.

    Args:
        dataplane: The gateway's data plane (its runtime started).
        host: Bind address.
        port: Port; 0 picks a free one.
    """

    def __init__(self, dataplane: DataPlane, host: str, port: int) -> None:
        self.dataplane = dataplane
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        """Bind and start serving.

        Returns:
            The bound port.

        Raises:
            RuntimeError: The address cannot be bound (e.g. the port is taken).
        """
        s = self.dataplane.settings
        interceptors = [GrpcApiKeyInterceptor(s.api_keys, exempt_services=(HEALTH_SERVICE_NAME,))] if s.api_keys else []
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                # The same body limit as REST; grpc itself answers RESOURCE_EXHAUSTED above it.
                ("grpc.max_receive_message_length", s.max_body_bytes + _MESSAGE_OVERHEAD_BYTES),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                # Without this, a second gateway could bind the same port and silently share its traffic.
                ("grpc.so_reuseport", 0),
            ],
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.dataplane), server)
        health_pb2_grpc.add_HealthServicer_to_server(GatewayHealth(self.dataplane), server)
        reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{self.host}:{self.requested_port}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise RuntimeError(f"cannot bind the gRPC server to {address}: {exc}") from None
        if port == 0:
            raise RuntimeError(f"cannot bind the gRPC server to {address}")
        await server.start()
        self._server, self.port = server, port
        logger.info("gRPC (v2 GRPCInferenceService, health, reflection) listening on %s:%d", self.host, port)
        return port

    async def stop(self, grace_seconds: float) -> None:
        """Refuse new RPCs at once and give the running ones up to ``grace_seconds`` to finish.

        Args:
            grace_seconds: Longest wait for RPCs in progress (they are answered by the still-running batchers).
        """
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(grace_seconds)
