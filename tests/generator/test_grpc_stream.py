"""Generation through the gateway's v2 gRPC ``ModelStreamInfer`` with tritonclient's ``start_stream``.

A real gateway (app factory, its grpc.aio server on a free port) in front of the real tritonserver serving the tiny
random generator (tests/generator/conftest.py); the client is tritonclient's synchronous gRPC client, whose stream
runs in its own thread, so the test's event loop (which runs the gateway) only waits on a queue in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import queue
from contextlib import asynccontextmanager

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families

from service.gateway.api.grpc_stream import request_body
from service.gateway.backend.generator import GenerateParams, GeneratorClient
from service.gateway.errors import InvalidInput
from tests.generator.conftest import MODEL, make_settings
from tests.helpers.gateway import serve_with_grpc

pytestmark = pytest.mark.integration

PROMPT = "The quick brown fox"


@pytest.fixture
def generation_env(monkeypatch):
    monkeypatch.setenv("GATEWAY_GENERATE__ENABLED", "1")
    monkeypatch.setenv("GATEWAY_GENERATE__MAX_NEW_TOKENS", "128")
    return monkeypatch


@asynccontextmanager
async def gateway(repo, triton, **kw):
    async with serve_with_grpc(make_settings(repo, triton, grpc_port=0, **kw)) as (http, url, app):
        yield http, url, app


def text_tensor(name: str, value: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value.encode()], dtype=object))
    return tensor


def scalar(name: str, datatype: str, value) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1], datatype)
    dtype = {"INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "BOOL": np.bool_}[datatype]
    tensor.set_data_from_numpy(np.array([value], dtype=dtype))
    return tensor


def inputs(prompt: str = PROMPT, max_new_tokens: int = 12, **extra) -> list[grpcclient.InferInput]:
    tensors = [text_tensor("prompt", prompt), scalar("max_new_tokens", "INT32", max_new_tokens)]
    tensors.append(scalar("ignore_eos", "BOOL", True))
    for name, (datatype, value) in extra.items():
        tensors.append(scalar(name, datatype, value))
    return tensors


class Stream:
    """tritonclient's stream against the gateway; responses land in a thread-safe queue."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(lambda result, error: self.responses.put((result, error)), headers=headers)

    async def next(self, timeout: float = 60.0):
        return await asyncio.to_thread(self.responses.get, True, timeout)

    async def until_final(self, request_id: str | None = None) -> list:
        """Responses until the final one (of ``request_id`` if given); errors end it too."""
        got = []
        while True:
            result, error = await self.next()
            got.append((result, error))
            if error is not None:
                return got
            response = result.get_response()
            if request_id is not None and response.id != request_id:
                continue
            if response.parameters["triton_final_response"].bool_param:
                return got

    async def close(self, cancel: bool = False) -> None:
        await asyncio.to_thread(self.client.stop_stream, cancel)
        await asyncio.to_thread(self.client.close)


def decoded(result) -> tuple[str, list[int], str]:
    text = result.as_numpy("text_output")[0].decode()
    return text, result.as_numpy("token_ids").tolist(), result.as_numpy("finish_reason")[0].decode()


async def backend_tokens(triton, ids: list[int], n: int) -> list[int]:
    client = GeneratorClient(triton.grpc_url)
    try:
        return [e.token_id async for e in client.stream(MODEL, ids, GenerateParams(max_new_tokens=n, ignore_eos=True))]
    finally:
        await client.aclose()


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def test_tokens_stream_as_several_responses_with_a_final_flag(
    combined_repository, generator_triton, generation_env
):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(next((combined_repository / MODEL).glob("*/tokenizer.json"))))
    ids = tokenizer.encode(PROMPT, add_special_tokens=False).ids
    expected = tokenizer.decode(await backend_tokens(generator_triton, ids, 12), skip_special_tokens=True)
    async with gateway(combined_repository, generator_triton) as (http, url, _app):
        stream = Stream(url)
        try:
            # Two requests on the one stream (tritonclient's model): both run, answers tell them apart by id.
            stream.client.async_stream_infer(MODEL, inputs(), request_id="a", enable_empty_final_response=True)
            stream.client.async_stream_infer(
                "generator", inputs(max_new_tokens=4, stream=("BOOL", False)), request_id="b"
            )
            got = []
            finals = set()
            while finals != {"a", "b"}:
                result, error = await stream.next()
                assert error is None, error
                got.append(result)
                response = result.get_response()
                if response.parameters["triton_final_response"].bool_param:
                    finals.add(response.id)
        finally:
            await stream.close()
        metrics = (await http.get("/metrics")).text
    a = [r for r in got if r.get_response().id == "a"]
    b = [r for r in got if r.get_response().id == "b"]
    assert len(a) >= 4  # several token responses, then the final one
    assert [r.get_response().parameters["triton_final_response"].bool_param for r in a] == [False] * (len(a) - 1) + [
        True
    ]
    pieces = [decoded(r) for r in a]
    assert "".join(t for t, _, _ in pieces) == expected
    assert [f for _, _, f in pieces] == [""] * (len(a) - 1) + ["length"]
    assert sum(len(i) for _, i, _ in pieces) <= 12
    last = a[-1].get_response()
    assert last.model_name == MODEL and last.parameters["completion_tokens"].int64_param == 12
    assert last.parameters["prompt_tokens"].int64_param == len(ids)
    assert last.parameters["time_to_first_token_seconds"].double_param > 0
    # stream=false: one response with the whole text (the bare prefix names the default variant).
    assert len(b) == 1
    text_b, ids_b, finish_b = decoded(b[0])
    assert finish_b == "length" and len(ids_b) <= 4 and text_b == tokenizer.decode(ids_b, skip_special_tokens=True)
    assert metric(metrics, "gateway_requests_total", operation="generate", protocol="grpc", code="200") == 2
    assert metric(metrics, "gateway_generate_time_to_first_token_seconds_count", variant="fp32") == 2


@pytest.mark.parametrize(
    ("model", "tensors", "status", "error_type"),
    [
        (MODEL, [text_tensor("prompt", "   ")], "INVALID_ARGUMENT", "invalid_input"),
        (MODEL, inputs(max_new_tokens=129), "INVALID_ARGUMENT", "invalid_input"),
        (MODEL, inputs(temperature=("FP32", -1.0)), "INVALID_ARGUMENT", "invalid_input"),
        (MODEL, inputs(top_p=("FP32", 0.0), temperature=("FP32", 1.0)), "INVALID_ARGUMENT", "invalid_input"),
        (MODEL, [text_tensor("prompt", "hi"), text_tensor("text_input", "hi")], "INVALID_ARGUMENT", "invalid_input"),
        (MODEL, [text_tensor("surprise", "hi")], "INVALID_ARGUMENT", "invalid_input"),
        (MODEL, [text_tensor("prompt", "word " * 1100)], "INVALID_ARGUMENT", "payload_too_large"),
        ("generator_int4", inputs(), "NOT_FOUND", "not_found"),
        ("classifier_int8", inputs(), "NOT_FOUND", "not_found"),
    ],
)
async def test_a_bad_request_gets_an_error_response_with_its_grpc_status(
    combined_repository, generator_triton, generation_env, model, tensors, status, error_type
):
    async with gateway(combined_repository, generator_triton) as (http, url, _app):
        stream = Stream(url)
        try:
            stream.client.async_stream_infer(model, tensors, request_id="bad")
            (_, error), *_ = await stream.until_final()
            # ... the stream and the backend keep serving.
            stream.client.async_stream_infer(MODEL, inputs(max_new_tokens=2), request_id="ok")
            after = await stream.until_final("ok")
        finally:
            await stream.close()
        metrics = (await http.get("/metrics")).text
    assert error is not None
    assert str(error).startswith(f"[StatusCode.{status}] {error_type}: "), str(error)
    assert all(e is None for _, e in after) and decoded(after[-1][0])[2] == "length"
    http_status = {"invalid_input": "422", "payload_too_large": "413", "not_found": "404"}[error_type]
    assert metric(metrics, "gateway_requests_total", operation="generate", protocol="grpc", code=http_status) == 1


async def test_generation_off_is_not_found(combined_repository, generator_triton, monkeypatch):
    monkeypatch.delenv("GATEWAY_GENERATE__ENABLED", raising=False)
    async with gateway(combined_repository, generator_triton) as (_http, url, _app):
        stream = Stream(url)
        try:
            stream.client.async_stream_infer(MODEL, inputs())
            (_, error), *_ = await stream.until_final()
        finally:
            await stream.close()
    assert str(error).startswith("[StatusCode.NOT_FOUND] not_found: text generation is not enabled")


async def test_api_keys_apply_to_the_stream(combined_repository, generator_triton, generation_env):
    key = "s" * 24
    async with gateway(combined_repository, generator_triton, api_keys=key) as (_http, url, _app):
        refused = Stream(url)
        try:
            refused.client.async_stream_infer(MODEL, inputs(max_new_tokens=2))
            (_, error), *_ = await refused.until_final()
        finally:
            await refused.close()
        allowed = Stream(url, headers={"authorization": f"Bearer {key}"})
        try:
            allowed.client.async_stream_infer(MODEL, inputs(max_new_tokens=2))
            ok = await allowed.until_final()
        finally:
            await allowed.close()
    assert error is not None and error.status() == "StatusCode.UNAUTHENTICATED"
    assert ok[-1][1] is None and decoded(ok[-1][0])[2] == "length"


async def test_the_request_timeout_ends_the_generation_with_deadline_exceeded(
    combined_repository, generator_triton, generation_env
):
    async with gateway(combined_repository, generator_triton) as (_http, url, app):
        stream = Stream(url)
        try:
            # 128 tokens do not fit in 0.2 s (the random model streams ~100-200 tokens/s here).
            stream.client.async_stream_infer(MODEL, inputs(max_new_tokens=128), request_id="slow", timeout=200_000)
            got = await stream.until_final()
        finally:
            await stream.close()
        service = app.state.generation
        stats = await service.client.stats(MODEL)
        for _ in range(200):
            if stats["kv_cache_reserved_bytes"] == 0:
                break
            await asyncio.sleep(0.01)
            stats = await service.client.stats(MODEL)
    error = got[-1][1]
    assert str(error).startswith("[StatusCode.DEADLINE_EXCEEDED] deadline_exceeded: "), str(error)
    assert stats["kv_cache_reserved_bytes"] == 0


async def test_cancelling_the_stream_frees_the_kv_cache(combined_repository, generator_triton, generation_env):
    async with gateway(combined_repository, generator_triton) as (http, url, app):
        service = app.state.generation
        before_stats = await service.client.stats(MODEL)
        before = metric((await http.get("/metrics")).text, "gateway_generate_kv_cache_bytes", variant="fp32")
        stream = Stream(url)
        try:
            stream.client.async_stream_infer(MODEL, inputs(max_new_tokens=120), request_id="long")
            for _ in range(4):
                _, error = await stream.next()
                assert error is None, error
            during = metric((await http.get("/metrics")).text, "gateway_generate_kv_cache_bytes", variant="fp32")
        finally:
            await stream.close(cancel=True)  # the client cancels the stream mid-generation
        text = (await http.get("/metrics")).text
        for _ in range(300):  # the cancellation reaches the model, which frees the cache at its next iteration
            text = (await http.get("/metrics")).text
            if metric(text, "gateway_generate_kv_cache_bytes", variant="fp32") == before and not service.in_flight:
                break
            await asyncio.sleep(0.02)
        after_stats = await service.client.stats(MODEL)
    assert during > before
    assert metric(text, "gateway_generate_kv_cache_bytes", variant="fp32") == before
    assert metric(text, "gateway_generate_kv_cache_evictions_total", variant="fp32", reason="client_disconnect") == 1
    assert metric(text, "gateway_requests_total", operation="generate", protocol="grpc", code="200") == 1
    assert after_stats["kv_cache_reserved_bytes"] == before_stats["kv_cache_reserved_bytes"]
    assert after_stats["evictions_total"] == before_stats["evictions_total"] + 1


def test_request_body_maps_tensors_to_the_rest_fields():
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=MODEL, id="x")
    for name, datatype, raw in [
        ("messages", "BYTES", json.dumps([{"role": "user", "content": "hi"}]).encode()),
        ("stop", "BYTES", b"\n\n"),
    ]:
        tensor = request.inputs.add(name=name, datatype=datatype)
        tensor.shape.append(1)
        tensor.contents.bytes_contents.append(raw)
    tensor = request.inputs.add(name="seed", datatype="INT64")
    tensor.shape.append(1)
    tensor.contents.int64_contents.append(7)
    body = request_body(request)
    assert body.messages[0].content == "hi" and body.stop == ["\n\n"] and body.seed == 7 and body.stream is True
    request.inputs[2].contents.int64_contents.append(8)  # two seeds for a shape of [1]
    with pytest.raises(InvalidInput, match="2 elements"):
        request_body(request)
