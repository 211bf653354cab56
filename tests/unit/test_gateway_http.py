"""HTTP contract through the real app factory with the fake backend: one test per documented status code."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.gateway.app import create_app
from service.gateway.backend.fake import FakeBackend, write_fake_repository
from service.gateway.errors import BackendError, BackendUnavailable
from service.gateway.runtime import StartupError
from tests.helpers.gateway import LABELS, LONG, SHORT, assert_error, base_tokenizer_json, make_settings, serve


async def test_200_single_text(repo):
    async with serve(make_settings(repo)) as client:
        resp = await client.post("/v1/classify", json={"text": SHORT}, headers={"x-request-id": "abc-123"})
    assert resp.status_code == 200
    body = resp.json()
    assert body["variant"] == "int8" and body["model"] == "classifier_int8" and body["model_version"] == "1"
    (result,) = body["results"]
    assert set(result["probabilities"]) == set(LABELS)
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    assert result["label"] == max(result["probabilities"], key=result["probabilities"].get)
    assert result["score"] == pytest.approx(result["probabilities"][result["label"]])
    assert resp.headers["x-request-id"] == "abc-123"
    for name in ("x-queue-time", "x-inference-time", "x-total-time"):
        assert re.fullmatch(r"\d+", resp.headers[name]), name


async def test_200_list_and_variant_choice(repo):
    backend = FakeBackend(len(LABELS))
    async with serve(make_settings(repo), backend) as client:
        resp = await client.post("/v1/classify", json={"texts": [SHORT, "Where is Rome ?"], "variant": "fp16"})
        single = await client.post("/v1/classify", json={"text": "Where is Rome ?", "variant": "fp16"})
    assert resp.status_code == 200
    body = resp.json()
    assert body["variant"] == "fp16" and body["model"] == "classifier_fp16" and len(body["results"]) == 2
    assert body["results"][1] == single.json()["results"][0]  # order kept, same answer alone or batched
    assert {c.model for c in backend.calls} == {"classifier_fp16"}
    assert re.fullmatch(r"[0-9a-f]{32}", resp.headers["x-request-id"])  # generated when not sent


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"text": ""},
        {"text": "a", "texts": ["b"]},
        {"texts": []},
        {"text": 3},
        {"text": "a", "bogus": 1},
        {"text": "a", "deadline_ms": 0},
    ],
)
async def test_422_invalid_input_has_the_error_shape(repo, payload):
    async with serve(make_settings(repo)) as client:
        resp = await client.post("/v1/classify", json=payload)
    assert_error(resp, 422, "invalid_input")


async def test_422_malformed_json(repo):
    async with serve(make_settings(repo)) as client:
        resp = await client.post("/v1/classify", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(resp, 422, "invalid_input")


async def test_422_unknown_variant(repo):
    async with serve(make_settings(repo)) as client:
        resp = await client.post("/v1/classify", json={"text": "a", "variant": "fp64"})
    body = assert_error(resp, 422, "invalid_input")
    assert "fp64" in body["error"] and "int8" in body["error"]


async def test_413_too_many_texts(repo):
    async with serve(make_settings(repo, max_client_batch_size=3)) as client:
        resp = await client.post("/v1/classify", json={"texts": ["a", "b", "c", "d"]})
    assert_error(resp, 413, "payload_too_large")


async def test_413_body_too_large(repo):
    async with serve(make_settings(repo, max_body_bytes=1024)) as client:
        resp = await client.post("/v1/classify", json={"text": "x" * 2000})
    assert_error(resp, 413, "payload_too_large")


async def test_413_text_too_long(repo):
    async with serve(make_settings(repo, max_text_chars=50)) as client:
        resp = await client.post("/v1/classify", json={"texts": ["short", "y" * 51]})
    assert_error(resp, 413, "payload_too_large")


async def test_429_queue_full_with_retry_after(repo):
    backend = FakeBackend(len(LABELS))
    gate = backend.hold()
    settings = make_settings(
        repo, max_client_batch_size=1, retry_after_seconds=7, batch={"max_queue_size": 1, "max_inflight_batches": 1}
    )
    async with serve(settings, backend) as client:
        busy = asyncio.create_task(client.post("/v1/classify", json={"text": "in flight"}))
        await backend.wait_entered(1)
        queued = asyncio.create_task(client.post("/v1/classify", json={"text": "queued"}))
        batcher = client.app.state.runtime.served["int8"].batcher
        for _ in range(500):  # bounded: until the second request sits in the queue
            if batcher.queue_depth == 1:
                break
            await asyncio.sleep(0.01)
        resp = await client.post("/v1/classify", json={"text": "refused"})
        gate.set()
        assert (await busy).status_code == 200 and (await queued).status_code == 200
    assert_error(resp, 429, "overloaded")
    assert resp.headers["retry-after"] == "7"


async def test_503_backend_unavailable(repo):
    backend = FakeBackend(len(LABELS), fail_with=BackendUnavailable("inference server unavailable"))
    async with serve(make_settings(repo), backend) as client:
        resp = await client.post("/v1/classify", json={"text": "a"})
    assert_error(resp, 503, "backend_unavailable")


async def test_503_while_draining_and_readyz_false(repo):
    async with serve(make_settings(repo)) as client:
        assert (await client.get("/readyz")).status_code == 200
        client.app.state.runtime.draining = True
        resp = await client.post("/v1/classify", json={"text": "a"})
        ready = await client.get("/readyz")
    assert_error(resp, 503, "backend_unavailable")
    assert_error(ready, 503, "not_ready")


async def test_504_deadline(repo):
    backend = FakeBackend(len(LABELS))
    gate = backend.hold()
    async with serve(make_settings(repo), backend) as client:
        resp = await client.post("/v1/classify", json={"text": "a", "deadline_ms": 50})
        header = await client.post("/v1/classify", json={"text": "b"}, headers={"x-deadline-ms": "50"})
        gate.set()
    assert_error(resp, 504, "deadline_exceeded")
    assert_error(header, 504, "deadline_exceeded")


async def test_502_backend_error(repo):
    backend = FakeBackend(len(LABELS), fail_with=BackendError("inference server failed for model classifier_int8"))
    async with serve(make_settings(repo), backend) as client:
        resp = await client.post("/v1/classify", json={"text": "a"})
    assert_error(resp, 502, "backend_error")


async def test_500_does_not_leak_the_exception(repo):
    backend = FakeBackend(len(LABELS), fail_with=RuntimeError("secret-db-password"))
    async with serve(make_settings(repo), backend) as client:
        resp = await client.post("/v1/classify", json={"text": "a"})
    body = assert_error(resp, 500, "internal")
    assert "secret" not in resp.text and "RuntimeError" not in resp.text
    assert body["error"] == "internal server error"


async def test_500_from_a_route_bug_does_not_leak(repo):
    async with serve(make_settings(repo)) as client:
        runtime = client.app.state.runtime
        served, runtime.served = runtime.served, None  # breaks the route: AttributeError inside the handler
        try:
            resp = await client.post("/v1/classify", json={"text": "a"})
        finally:
            runtime.served = served
    assert_error(resp, 500, "internal")
    assert "NoneType" not in resp.text and "AttributeError" not in resp.text


async def test_404_unknown_route_has_the_error_shape(repo):
    async with serve(make_settings(repo)) as client:
        resp = await client.get("/nope")
    assert_error(resp, 404, "not_found")


async def test_concurrent_requests_share_batches(repo):
    settings = make_settings(repo, batch={"max_batch_size": 16, "max_wait_seconds": 0.2, "flush_when_idle": False})
    backend = FakeBackend(len(LABELS))
    async with serve(settings, backend) as client:
        resps = await asyncio.gather(
            *(client.post("/v1/classify", json={"text": f"question {i} ?"}) for i in range(16))
        )
        metrics = (await client.get("/metrics")).text
    assert all(r.status_code == 200 for r in resps)
    count = _sample(metrics, "gateway_batch_size_count", variant="int8")
    total = _sample(metrics, "gateway_batch_size_sum", variant="int8")
    assert total == 16 and count < 16  # fewer backend calls than requests: they were batched
    assert len(backend.calls) == count


async def test_client_disconnect_is_dropped_and_counted(repo):
    """A raw ASGI call whose client disconnects while its text is queued behind a busy slot."""
    backend = FakeBackend(len(LABELS))
    gate = backend.hold()
    settings = make_settings(repo, batch={"max_inflight_batches": 1})
    app = create_app(settings, backend)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            busy = asyncio.create_task(client.post("/v1/classify", json={"text": "in flight"}))
            await backend.wait_entered(1)
            gone = asyncio.Event()
            sent: list[dict] = []
            body = json.dumps({"text": "will disconnect"}).encode()
            messages = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive():
                if messages:
                    return messages.pop(0)
                await gone.wait()
                return {"type": "http.disconnect"}

            async def send(message):
                sent.append(message)

            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": "/v1/classify",
                "raw_path": b"/v1/classify",
                "query_string": b"",
                "root_path": "",
                "headers": [(b"content-type", b"application/json")],
                "client": ("127.0.0.1", 1),
                "server": ("gateway", 80),
            }
            call = asyncio.create_task(app(scope, receive, send))
            batcher = app.state.runtime.served["int8"].batcher
            for _ in range(500):  # bounded: until the text is queued
                if batcher.queue_depth == 1:
                    break
                await asyncio.sleep(0.01)
            gone.set()
            await asyncio.wait_for(call, 10)
            gate.set()
            assert (await busy).status_code == 200
            metrics = (await client.get("/metrics")).text
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [499]
    assert _sample(metrics, "gateway_requests_rejected_total", reason="client_disconnect") == 1
    assert len(backend.calls) == 1  # the abandoned text was never sent


async def test_models_health_and_openapi(repo):
    async with serve(make_settings(repo)) as client:
        models = (await client.get("/v1/models")).json()
        assert (await client.get("/healthz")).json() == {"status": "alive"}
        assert (await client.get("/readyz")).json() == {"status": "ready"}
        assert (await client.get("/health/ready")).status_code == 200
        openapi = (await client.get("/openapi.json")).json()
        docs = await client.get("/docs")
    assert models["default_variant"] == "int8" and models["max_batch_size"] == 32
    assert {m["variant"]: m["model"] for m in models["models"]} == {
        "int8": "classifier_int8",
        "fp16": "classifier_fp16",
    }
    assert all(m["labels"] == list(LABELS) and m["version"] == 1 for m in models["models"])
    assert "/v1/classify" in openapi["paths"] and docs.status_code == 200
    documented = set(openapi["paths"]["/v1/classify"]["post"]["responses"])
    assert {"200", "413", "422", "429", "500", "502", "503", "504"} <= documented


async def test_readyz_false_when_backend_not_ready(repo):
    backend = FakeBackend(len(LABELS))
    async with serve(make_settings(repo), backend) as client:
        backend.is_ready = False
        resp = await client.get("/readyz")
    assert_error(resp, 503, "not_ready")


async def test_startup_refuses_batch_larger_than_triton(repo):
    app = create_app(make_settings(repo, batch={"max_batch_size": 128}), FakeBackend(len(LABELS)))
    with pytest.raises(StartupError, match=r"max_batch_size \(128\).*\(64\)"):
        async with app.router.lifespan_context(app):
            pass


async def test_startup_refuses_missing_model(tmp_path):
    repo = write_fake_repository(tmp_path / "repo", base_tokenizer_json(), variants=("int8",))
    app = create_app(make_settings(repo), FakeBackend(len(LABELS)))
    with pytest.raises(StartupError, match="classifier_fp16"):
        async with app.router.lifespan_context(app):
            pass


async def test_metrics_follow_the_naming_rules(repo):
    async with serve(make_settings(repo)) as client:
        await client.post("/v1/classify", json={"text": SHORT})
        await client.post("/v1/classify", json={"text": LONG, "variant": "fp16"})
        text = (await client.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text) if f.name.startswith("gateway_")}
    expected = {
        "gateway_requests": "counter",
        "gateway_request_duration_seconds": "histogram",
        "gateway_queue_wait_seconds": "histogram",
        "gateway_batch_size": "histogram",
        "gateway_backend_request_duration_seconds": "histogram",
        "gateway_backend_errors": "counter",
        "gateway_queue_depth": "gauge",
        "gateway_inflight_batches": "gauge",
        "gateway_requests_rejected": "counter",
        "gateway_build_info": "gauge",
    }
    for name, kind in expected.items():
        assert families[name].type == kind, name
    for name, fam in families.items():
        assert re.fullmatch(r"gateway_[a-z0-9_]+", name) and ":" not in name
        for unit in ("ms", "us", "milliseconds", "microseconds"):  # whole name parts: "_used_" is not "_us"
            assert unit not in name.split("_")
        if fam.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in fam.samples), name
        if fam.type == "histogram" and ("duration" in name or "wait" in name):
            assert name.endswith("_seconds")
        for s in fam.samples:  # bounded labels: never a request id or an input
            assert set(s.labels) <= {
                "operation",
                "protocol",
                "primary",
                "shadow",
                "code",
                "variant",
                "model",
                "status",
                "reason",
                "version",
                "git_sha",
                "le",
            }
    labels = {"operation": "classify", "protocol": "rest_v1", "code": "200"}
    assert _sample(text, "gateway_requests_total", variant="int8", **labels) == 1
    assert _sample(text, "gateway_requests_total", variant="fp16", **labels) == 1


def _sample(text: str, name: str, **labels: str) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"{name}{labels} not found")
