"""``POST /v1/generate`` through the real app factory and the real tritonserver (the classifier side is the fake)."""

from __future__ import annotations

import asyncio
import json
import os
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.gateway.api.generate import ChatMessage, GenerationSettings, held_back, render_chatml
from service.gateway.app import create_app
from service.gateway.backend.fake import FakeBackend
from service.gateway.backend.generator import GenerateParams, GeneratorClient
from service.gateway.settings import Settings
from tests.generator.conftest import MODEL, free_port, make_settings
from tests.helpers.gateway import LABELS, assert_error
from tests.unit.test_metrics_conventions import check_family

pytestmark = pytest.mark.integration

PROMPT = "The quick brown fox"


@pytest.fixture
def generation_env(monkeypatch):
    monkeypatch.setenv("GATEWAY_GENERATE__ENABLED", "1")
    monkeypatch.setenv("GATEWAY_GENERATE__MAX_NEW_TOKENS", "128")
    return monkeypatch


@asynccontextmanager
async def gateway(repo: Path, triton, **kw):
    settings = make_settings(repo, triton, **kw)
    app = create_app(settings, FakeBackend(len(LABELS)))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=60) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


def sse_events(text: str) -> list[tuple[str, object]]:
    events = []
    for block in text.strip().split("\n\n"):
        kind, data = "message", None
        for line in block.splitlines():
            if line.startswith("event: "):
                kind = line[len("event: ") :]
            elif line.startswith("data: "):
                raw = line[len("data: ") :]
                data = raw if raw == "[DONE]" else json.loads(raw)
        events.append((kind, data))
    return events


async def backend_tokens(triton, ids: list[int], n: int) -> list[int]:
    client = GeneratorClient(triton.grpc_url)
    try:
        return [e.token_id async for e in client.stream(MODEL, ids, GenerateParams(max_new_tokens=n, ignore_eos=True))]
    finally:
        await client.aclose()


async def test_json_and_sse_give_the_backends_greedy_text(combined_repository, generator_triton, generation_env):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(next((combined_repository / MODEL).glob("*/tokenizer.json"))))
    ids = tokenizer.encode(PROMPT, add_special_tokens=False).ids
    expected = tokenizer.decode(await backend_tokens(generator_triton, ids, 16), skip_special_tokens=True)
    body = {"prompt": PROMPT, "max_new_tokens": 16, "ignore_eos": True}
    async with gateway(combined_repository, generator_triton) as client:
        whole = await client.post("/v1/generate", json=body, headers={"x-request-id": "gen-1"})
        streamed = await client.post("/v1/generate", json={**body, "stream": True})
    assert whole.status_code == 200, whole.text
    data = whole.json()
    assert data["text"] == expected
    assert data["finish_reason"] == "length" and data["model"] == MODEL and data["variant"] == "fp32"
    assert data["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 16}
    assert whole.headers["x-request-id"] == "gen-1" and whole.headers["x-time-to-first-token"].isdigit()
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed.text)
    assert events[-1] == ("message", "[DONE]")
    final = events[-2][1]
    pieces = [d for k, d in events[:-2]]
    assert all(k == "message" for k, _ in events)
    assert "".join(p["text"] for p in pieces) == final["text"] == expected
    assert sum(len(p["token_ids"]) for p in pieces) <= 16 and final["usage"]["completion_tokens"] == 16


async def test_stop_string_ends_the_generation_and_frees_the_cache(
    combined_repository, generator_triton, generation_env
):
    async with gateway(combined_repository, generator_triton) as client:
        full = (
            await client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 24, "ignore_eos": True})
        ).json()
        text = full["text"]
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        assert stop.strip(), text
        cut = await client.post(
            "/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 24, "ignore_eos": True, "stop": [stop]}
        )
        streamed = await client.post(
            "/v1/generate",
            json={"prompt": PROMPT, "max_new_tokens": 24, "ignore_eos": True, "stop": [stop], "stream": True},
        )
        stats = await client.app.state.generation.client.stats(MODEL)
    assert cut.status_code == 200
    assert cut.json()["finish_reason"] == "stop"
    assert cut.json()["text"] == text[: text.find(stop)]
    events = sse_events(streamed.text)
    assert "".join(d["text"] for _, d in events[:-2]) == text[: text.find(stop)]
    assert stats["kv_cache_bytes"] == 0 or stats["active_sequences"] <= 1


async def test_chat_messages_use_the_models_chat_format():
    from service.generator.base import load_tokenizer

    tokenizer = load_tokenizer()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reference = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    ours = tokenizer(render_chatml([ChatMessage(**m) for m in messages], _SYSTEM), add_special_tokens=False)
    assert list(ours["input_ids"]) == list(reference)
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    reference = tokenizer.apply_chat_template(with_system, add_generation_prompt=True, return_dict=True)["input_ids"]
    ours = tokenizer(render_chatml([ChatMessage(**m) for m in with_system], _SYSTEM), add_special_tokens=False)
    assert list(ours["input_ids"]) == list(reference)


_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


async def test_seeded_sampling_is_reproducible_through_the_gateway(
    combined_repository, generator_triton, generation_env
):
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_new_tokens": 10, "temperature": 0.9,
            "top_p": 0.9, "seed": 11, "ignore_eos": True}  # fmt: skip
    async with gateway(combined_repository, generator_triton) as client:
        a = (await client.post("/v1/generate", json=body)).json()
        b = (await client.post("/v1/generate", json=body)).json()
    assert a["text"] == b["text"] and a["usage"]["completion_tokens"] == 10


@pytest.mark.parametrize(
    ("body", "status", "error_type"),
    [
        ({"prompt": "   "}, 422, "invalid_input"),
        ({}, 422, "invalid_input"),
        ({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, 422, "invalid_input"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 422, "invalid_input"),
        ({"messages": [{"role": "system", "content": "only a system turn"}]}, 422, "invalid_input"),
        ({"prompt": "hi", "max_new_tokens": 129}, 422, "invalid_input"),
        ({"prompt": "hi", "max_new_tokens": 0}, 422, "invalid_input"),
        ({"prompt": "hi", "temperature": -0.5}, 422, "invalid_input"),
        ({"prompt": "hi", "temperature": 1.0, "top_p": 0}, 422, "invalid_input"),
        ({"prompt": "hi", "stop": [""]}, 422, "invalid_input"),
        ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 422, "invalid_input"),
        ({"prompt": "hi", "variant": "int4"}, 422, "invalid_input"),
        ({"prompt": "hi", "surprise": 1}, 422, "invalid_input"),
        ({"prompt": "word " * 1100, "max_new_tokens": 8}, 413, "payload_too_large"),
        ({"prompt": "x" * 20_001}, 413, "payload_too_large"),
    ],
)
async def test_bad_input_gets_the_error_shape(
    combined_repository, generator_triton, generation_env, body, status, error_type
):
    async with gateway(combined_repository, generator_triton) as client:
        resp = await client.post("/v1/generate", json=body)
        assert_error(resp, status, error_type)
        # ... and the backend keeps serving.
        ok = await client.post("/v1/generate", json={"prompt": "hi", "max_new_tokens": 2, "ignore_eos": True})
    assert ok.status_code == 200


async def test_stream_limit_gives_429_with_retry_after(combined_repository, generator_triton, generation_env):
    generation_env.setenv("GATEWAY_GENERATE__MAX_STREAMS", "1")
    body = {"prompt": PROMPT, "max_new_tokens": 100, "ignore_eos": True}
    async with gateway(combined_repository, generator_triton) as client:
        first = asyncio.ensure_future(client.post("/v1/generate", json=body))
        for _ in range(500):
            if client.app.state.generation.in_flight:
                break
            await asyncio.sleep(0.01)
        second = await client.post("/v1/generate", json={**body, "max_new_tokens": 2})
        assert (await first).status_code == 200
    assert_error(second, 429, "overloaded")
    assert second.headers["retry-after"] == "1"


async def test_deadline_mid_generation_is_504_and_frees_the_cache(
    combined_repository, generator_triton, generation_env
):
    body = {"prompt": PROMPT, "max_new_tokens": 128, "ignore_eos": True, "timeout_seconds": 0.2}
    async with gateway(combined_repository, generator_triton) as client:
        # The random model streams ~100-200 tokens/s here: 128 tokens do not fit in 0.2 s.
        resp = await client.post("/v1/generate", json=body)
        service = client.app.state.generation
        stats = await service.client.stats(MODEL)
        for _ in range(200):
            if stats["kv_cache_reserved_bytes"] == 0:
                break
            await asyncio.sleep(0.01)
            stats = await service.client.stats(MODEL)
        evicted = service.metrics.evictions_total.labels(variant="fp32", reason="deadline")._value.get()
    assert_error(resp, 504, "deadline_exceeded")
    assert stats["kv_cache_reserved_bytes"] == 0 and stats["kv_cache_bytes"] == 0
    assert evicted == 1


async def test_disabled_generation_is_404_and_documented(combined_repository, generator_triton, monkeypatch):
    monkeypatch.delenv("GATEWAY_GENERATE__ENABLED", raising=False)
    async with gateway(combined_repository, generator_triton) as client:
        resp = await client.post("/v1/generate", json={"prompt": "hi"})
        spec = (await client.get("/openapi.json")).json()
    assert_error(resp, 404, "not_found")
    op = spec["paths"]["/v1/generate"]["post"]
    assert {"200", "404", "413", "422", "429", "503", "504"} <= set(op["responses"])
    assert "text/event-stream" in op["responses"]["200"]["content"]
    assert "GenerateRequest" in json.dumps(op["requestBody"])


async def test_api_keys_apply_to_generate(combined_repository, generator_triton, generation_env):
    key = "k" * 24
    async with gateway(combined_repository, generator_triton, api_keys=key) as client:
        missing = await client.post("/v1/generate", json={"prompt": "hi", "max_new_tokens": 2})
        ok = await client.post(
            "/v1/generate", json={"prompt": "hi", "max_new_tokens": 2}, headers={"authorization": f"Bearer {key}"}
        )
    assert_error(missing, 401, "unauthenticated")
    assert ok.status_code == 200


async def test_generation_metrics(combined_repository, generator_triton, generation_env):
    async with gateway(combined_repository, generator_triton) as client:
        for stream in (False, True):
            resp = await client.post(
                "/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 6, "ignore_eos": True, "stream": stream}
            )
            assert resp.status_code == 200
        await client.post("/v1/generate", json={"prompt": ""})
        await asyncio.sleep(0.3)  # the gauge refresh after each generation
        text = (await client.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    generation = {n: f for n, f in families.items() if n.startswith("gateway_generate_") and not n.endswith("_created")}
    assert len(generation) == 8
    for family in generation.values():  # the gateway's naming conventions (tests/unit/test_metrics_conventions.py)
        labels = {"variant", "kind"} if family.name == "gateway_generate_tokens" else {"variant"}
        if family.name == "gateway_generate_kv_cache_evictions":
            labels = {"variant", "reason"}
        check_family(family, family.type, labels)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("gateway_generate_time_to_first_token_seconds_count", variant="fp32") == 2
    assert value("gateway_generate_inter_token_latency_seconds_count", variant="fp32") == 2 * 5
    assert value("gateway_generate_tokens_per_second_count", variant="fp32") == 2
    assert value("gateway_generate_tokens_total", variant="fp32", kind="completion") == 12
    assert value("gateway_generate_kv_cache_bytes", variant="fp32") == 0
    assert value("gateway_generate_active_sequences", variant="fp32") == 0
    assert value("gateway_generate_kv_cache_budget_bytes", variant="fp32") == 24 * 1024 * 1024
    ok = value("gateway_requests_total", operation="generate", protocol="rest_v1", variant="fp32", code="200")
    assert ok == 2
    assert value("gateway_requests_total", operation="generate", protocol="rest_v1", variant="fp32", code="422") == 1


async def test_client_disconnect_mid_stream_frees_the_cache(combined_repository, generator_triton, generation_env):
    import uvicorn

    settings = make_settings(combined_repository, generator_triton)
    app = create_app(settings, FakeBackend(len(LABELS)))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    task = asyncio.ensure_future(server.serve())
    try:
        for _ in range(500):
            if server.started:
                break
            await asyncio.sleep(0.02)
        service = app.state.generation
        before = await service.client.stats(MODEL)
        body = {"prompt": PROMPT, "max_new_tokens": 120, "ignore_eos": True, "stream": True}
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client,
            client.stream("POST", "/v1/generate", json=body) as resp,
        ):
            assert resp.status_code == 200
            seen = 0
            async for line in resp.aiter_lines():
                seen += line.startswith("data: ")
                if seen == 4:
                    during = await service.client.stats(MODEL)
                    break  # leaving the block closes the connection mid-stream
        after = before
        for _ in range(300):
            after = await service.client.stats(MODEL)
            if after["kv_cache_reserved_bytes"] == before["kv_cache_reserved_bytes"] and not service.in_flight:
                break
            await asyncio.sleep(0.02)
        evicted = service.metrics.evictions_total.labels(variant="fp32", reason="client_disconnect")._value.get()
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)
    assert during["kv_cache_bytes"] > before["kv_cache_bytes"]
    assert after["kv_cache_bytes"] == before["kv_cache_bytes"]
    assert after["kv_cache_reserved_bytes"] == before["kv_cache_reserved_bytes"]
    assert after["evictions_total"] == before["evictions_total"] + 1
    assert evicted == 1


def test_settings_validation():
    with pytest.raises(ValueError, match="default_variant"):
        GenerationSettings(variants=("fp32",), default_variant="int8")
    with pytest.raises(ValueError, match="default_max_new_tokens"):
        GenerationSettings(max_new_tokens=8, default_max_new_tokens=64)
    with pytest.raises(ValueError, match="generate.max_streams"):
        Settings(generate={"max_streams": 0})


def test_generation_settings_are_the_gateway_settings_nested_group(monkeypatch):
    for name in [n for n in os.environ if n.startswith("GATEWAY_")]:
        monkeypatch.delenv(name)
    assert Settings().generate == GenerationSettings() and Settings().generate.enabled is False
    # The environment names of the separate settings object it replaced keep working.
    monkeypatch.setenv("GATEWAY_GENERATE__ENABLED", "1")
    monkeypatch.setenv("GATEWAY_GENERATE__VARIANTS", "fp32, int8")
    monkeypatch.setenv("GATEWAY_GENERATE__DEFAULT_VARIANT", "int8")
    monkeypatch.setenv("GATEWAY_GENERATE__MAX_STREAMS", "3")
    monkeypatch.setenv("GATEWAY_GENERATE__REQUEST_TIMEOUT_SECONDS", "7.5")
    g = Settings().generate
    assert (g.enabled, g.variants, g.default_variant, g.max_streams, g.request_timeout_seconds) == (
        True, ("fp32", "int8"), "int8", 3, 7.5
    )  # fmt: skip
    monkeypatch.setenv("GATEWAY_GENERATE__SURPRISE", "1")
    with pytest.raises(ValueError, match="surprise"):
        Settings()
    # ... and the app's generation service uses exactly this group.
    monkeypatch.delenv("GATEWAY_GENERATE__SURPRISE")
    app = create_app(Settings(generate={"enabled": False, "max_streams": 5}), FakeBackend(len(LABELS)))
    assert app.state.generation.config.max_streams == 5 and app.state.generation.config.enabled is False
    assert app.state.runtime.generation is app.state.generation


def test_held_back_keeps_possible_stop_prefixes():
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("hello", ["xyz"]) == 0
    assert held_back("ab", ["abc", "b!"]) == 2
