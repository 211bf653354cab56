"""The v2 gRPC server through the real app factory, with the fake backend.

Real grpc.aio server on a free 127.0.0.1 port, real tritonclient clients; only the inference server is faked, so
overload, unavailability and deadlines can be produced on demand. One test per documented gRPC status.
"""

from __future__ import annotations

import asyncio
import json

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as grpcaio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from service.gateway.api.grpc_v2 import grpc_status
from service.gateway.backend.fake import FakeBackend
from service.gateway.errors import ERROR_TABLE, BackendError, BackendUnavailable, Internal, Overloaded
from tests.helpers.gateway import (
    LABELS,
    TEXTS,
    grpc_error,
    grpc_infer,
    make_settings,
    rest_probabilities,
    text_input,
)
from tests.helpers.gateway import serve_with_grpc as serve


def test_every_error_has_a_grpc_status():
    for cls, (status, _, code) in ERROR_TABLE.items():
        exc = cls("boom", retry_after_seconds=1) if cls is Overloaded else cls("boom")
        mapped, message, http_status = grpc_status(exc)
        assert mapped == grpc.StatusCode[code], cls
        assert http_status == status
        assert message == ("internal server error" if cls is Internal else "boom")
    assert grpc_status(RuntimeError("secret")) == (grpc.StatusCode.INTERNAL, "internal server error", 500)
    assert grpc_status(Internal("detail")) == (grpc.StatusCode.INTERNAL, "internal server error", 500)
    assert grpc_status(BackendUnavailable("down")) == (grpc.StatusCode.UNAVAILABLE, "down", 503)


async def test_grpc_infer_matches_v1_classify(repo):
    async with serve(make_settings(repo)) as (client, url, _):
        rest = (await client.post("/v1/classify", json={"texts": TEXTS})).json()
        result = await grpc_infer(url, TEXTS)
        fp16 = await grpc_infer(url, TEXTS, model="classifier_fp16")
        by_param = await grpc_infer(url, TEXTS, parameters={"variant": "fp16"})
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (len(TEXTS), len(LABELS))
    np.testing.assert_allclose(probs, rest_probabilities(rest), atol=1e-6)
    assert [b.decode() for b in result.as_numpy("labels")] == [r["label"] for r in rest["results"]]
    response = result.get_response()
    assert response.model_name == "classifier" and response.model_version == "1"
    assert response.parameters["variant"].string_param == "int8"
    assert fp16.get_response().parameters["model"].string_param == "classifier_fp16"
    assert by_param.get_response().parameters["model"].string_param == "classifier_fp16"


async def test_grpc_metadata_readiness_and_config(repo):
    async with serve(make_settings(repo)) as (_, url, _app):
        client = grpcaio.InferenceServerClient(url)
        try:
            assert await client.is_server_live() and await client.is_server_ready()
            assert await client.is_model_ready("classifier_int8") and await client.is_model_ready("classifier", "1")
            meta = await client.get_model_metadata("classifier", as_json=True)
            config = await client.get_model_config("classifier_fp16", as_json=True)
            server = await client.get_server_metadata(as_json=True)
            with pytest.raises(InferenceServerException) as missing:
                await client.is_model_ready("classifier_fp64")
        finally:
            await client.close()
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": ["-1"]}]
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "labels"]
    assert json.loads(config["config"]["parameters"]["labels"]["string_value"]) == list(LABELS)
    assert server["name"] == "loraserve-gateway"
    assert missing.value.status() == "StatusCode.NOT_FOUND"


async def test_invalid_argument(repo):
    async with serve(make_settings(repo, max_client_batch_size=3)) as (_, url, _app):
        too_many = await grpc_error(url, ["a"] * 4)
        blank = await grpc_error(url, ["   "])
        bad_variant = await grpc_error(url, ["a"], parameters={"variant": "fp64"})
        conflict = await grpc_error(url, ["a"], model="classifier_int8", parameters={"variant": "fp16"})
        client = grpcaio.InferenceServerClient(url)
        try:
            wrong_name = grpcaio.InferInput("TEXT", [1], "BYTES")
            wrong_name.set_data_from_numpy(np.array([b"a"], dtype=object))
            with pytest.raises(InferenceServerException) as named:
                await client.infer("classifier", [wrong_name])
            not_utf8 = grpcaio.InferInput("text", [1], "BYTES")
            not_utf8.set_data_from_numpy(np.array([b"\xff\xfe"], dtype=object))
            with pytest.raises(InferenceServerException) as utf8:
                await client.infer("classifier", [not_utf8])
            with pytest.raises(InferenceServerException) as output:
                await client.infer("classifier", [text_input(["a"])], outputs=[grpcaio.InferRequestedOutput("logits")])
        finally:
            await client.close()
    for err in (too_many, blank, bad_variant, conflict, named.value, utf8.value, output.value):
        assert err.status() == "StatusCode.INVALID_ARGUMENT", err


async def test_resource_exhausted_on_overload_with_retry_after(repo):
    backend = FakeBackend(len(LABELS))
    gate = backend.hold()
    settings = make_settings(
        repo, max_client_batch_size=1, retry_after_seconds=3, batch={"max_queue_size": 1, "max_inflight_batches": 1}
    )
    async with serve(settings, backend) as (client, url, app):
        busy = asyncio.create_task(client.post("/v1/classify", json={"text": "in flight"}))
        await backend.wait_entered(1)
        queued = asyncio.create_task(client.post("/v1/classify", json={"text": "queued"}))
        batcher = app.state.runtime.served["int8"].batcher
        for _ in range(500):  # bounded: until the second request sits in the queue
            if batcher.queue_depth == 1:
                break
            await asyncio.sleep(0.01)
        channel = grpc.aio.insecure_channel(url)
        try:
            from tritonclient.grpc import service_pb2, service_pb2_grpc

            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = service_pb2.ModelInferRequest(model_name="classifier")
            request.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"refused")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(request)
        finally:
            await channel.close()
        gate.set()
        assert (await busy).status_code == 200 and (await queued).status_code == 200
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("retry-after", "3") in tuple(info.value.trailing_metadata() or ())


async def test_unavailable_and_internal_without_leaks(repo):
    down = FakeBackend(len(LABELS), fail_with=BackendUnavailable("inference server unavailable"))
    async with serve(make_settings(repo), down) as (_, url, _app):
        unavailable = await grpc_error(url, ["a"])
    broken = FakeBackend(len(LABELS), fail_with=RuntimeError("secret-db-password"))
    async with serve(make_settings(repo), broken) as (_, url, _app):
        internal = await grpc_error(url, ["a"])
    upstream = FakeBackend(len(LABELS), fail_with=BackendError("inference server failed for model x"))
    async with serve(make_settings(repo), upstream) as (_, url, _app):
        backend_error = await grpc_error(url, ["a"])
    assert unavailable.status() == "StatusCode.UNAVAILABLE"
    assert internal.status() == "StatusCode.INTERNAL" and "secret" not in internal.message()
    assert "internal server error" in internal.message()
    assert backend_error.status() == "StatusCode.INTERNAL"


async def test_unavailable_while_draining_and_health_not_serving(repo):
    async with serve(make_settings(repo)) as (_, url, app):
        channel = grpc.aio.insecure_channel(url)
        health = health_pb2_grpc.HealthStub(channel)
        try:
            before = await health.Check(health_pb2.HealthCheckRequest(service=""))
            named = await health.Check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"))
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            first = await watch.read()
            app.state.runtime.draining = True
            second = await asyncio.wait_for(watch.read(), 5)
            watch.cancel()
            after = await health.Check(health_pb2.HealthCheckRequest(service=""))
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await health.Check(health_pb2.HealthCheckRequest(service="nope"))
        finally:
            await channel.close()
        draining = await grpc_error(url, ["a"])
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert before.status == serving and named.status == serving and first.status == serving
    assert second.status == not_serving and after.status == not_serving
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert draining.status() == "StatusCode.UNAVAILABLE"


async def test_deadline_exceeded_honours_the_client_deadline(repo):
    backend = FakeBackend(len(LABELS))
    gate = backend.hold()
    async with serve(make_settings(repo), backend) as (_, url, app):
        grpc_deadline = await grpc_error(url, ["a"], client_timeout=0.2)
        triton_timeout = await grpc_error(url, ["b"], timeout=200_000)  # Triton's 'timeout' parameter, in µs
        gate.set()
        metrics = app.state.runtime.metrics.render()[0].decode()
    assert grpc_deadline.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert triton_timeout.status() == "StatusCode.DEADLINE_EXCEEDED"
    # Counted as classify over gRPC, with the HTTP-equivalent code of DEADLINE_EXCEEDED (504): one vocabulary.
    assert 'gateway_requests_total{code="504",operation="classify",protocol="grpc",variant="int8"} 2.0' in metrics


async def test_grpc_and_rest_share_batches(repo):
    settings = make_settings(repo, batch={"max_batch_size": 16, "max_wait_seconds": 0.3, "flush_when_idle": False})
    backend = FakeBackend(len(LABELS))
    async with serve(settings, backend) as (client, url, _app):
        rest = [client.post("/v1/classify", json={"text": f"rest question {i} ?"}) for i in range(4)]
        v2 = [
            client.post(
                "/v2/models/classifier/infer",
                json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [f"v2 question {i} ?"]}]},
            )
            for i in range(4)
        ]
        rpc = [grpc_infer(url, [f"grpc question {i} ?"]) for i in range(4)]
        results = await asyncio.gather(*rest, *v2, *rpc)
    assert all(r.status_code == 200 for r in results[:8])
    assert sum(c.rows for c in backend.calls) == 12
    assert len(backend.calls) < 12  # fewer backend calls than requests...
    assert max(c.rows for c in backend.calls) > 4  # ...and at least one batch mixed the protocols
