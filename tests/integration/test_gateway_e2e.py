"""The gateway in front of the real tritonserver on the tiny built model.

Requests go through the real app factory (in-process ASGI) with the real Triton gRPC backend; the process tests run
``python -m service.gateway`` itself. Request counts stay in the tens: the machine has 2 cores.
"""

from __future__ import annotations

import asyncio
import json
import signal

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer

from tests.helpers.gateway_process import (
    GatewayProcess,
    RecordingTritonBackend,
    closed_port,
    gateway_client,
    gateway_settings,
)

pytestmark = pytest.mark.integration

VARIANTS = ("int8", "fp16")
# Same padded batch, same ONNX file: Triton reproduces in-process ONNX Runtime closely (the Triton tests use the
# same bounds on logits; FP16 casts are more sensitive to kernel and thread order).
PROB_ATOL = {"int8": 1e-4, "fp16": 1e-2}
QUESTIONS = [
    "Who wrote Hamlet ?",
    "Where is Rome ?",
    "What is a meteor ?",
    "How far is the moon ?",
    "When did Napoleon die ?",
]
LONG_QUESTIONS = [
    (
        "What is the name of the longest river in South America and which countries does it flow through before "
        "it reaches the Atlantic Ocean near the old harbour city ?"
    ),
    (
        "Which famous English playwright wrote the tragedy about the prince of Denmark whose father's ghost asks "
        "him to avenge a murder committed by his uncle the new king ?"
    ),
]


def _version_dir(repo, variant):
    return repo / f"classifier_{variant}" / "1"


def reference_probabilities(repo, variant: str, texts: list[str]) -> np.ndarray:
    """In-process ONNX Runtime on the same model.onnx, the texts as one batch padded to their longest."""
    vdir = _version_dir(repo, variant)
    meta = json.loads((vdir / "labels.json").read_text())
    tok = Tokenizer.from_file(str(vdir / "tokenizer.json"))
    tok.enable_truncation(meta["max_length"])
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=None)
    enc = tok.encode_batch(texts)
    ids = np.asarray([e.ids for e in enc], dtype=np.int64)
    mask = np.asarray([e.attention_mask for e in enc], dtype=np.int64)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2  # the same thread count Triton's model uses (config.pbtxt)
    sess = ort.InferenceSession(str(vdir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)


def _labels(repo, variant):
    return json.loads((_version_dir(repo, variant) / "labels.json").read_text())["labels"]


def _sample(text: str, name: str, **labels: str) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def _triton_counts(grpc_url: str, model: str) -> tuple[int, int]:
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        stats = client.get_inference_statistics(model_name=model, as_json=True)["model_stats"]
    finally:
        client.close()
    (entry,) = [s for s in stats if s["name"] == model]
    return int(entry.get("inference_count", 0)), int(entry.get("execution_count", 0))


@pytest.mark.parametrize("variant", VARIANTS)
async def test_single_and_list_match_onnxruntime(triton_server, model_repository, variant):
    settings = gateway_settings(model_repository, triton_server.grpc_url)
    labels = _labels(model_repository, variant)
    async with gateway_client(settings) as client:
        singles = [await client.post("/v1/classify", json={"text": q, "variant": variant}) for q in QUESTIONS[:2]]
        listed = await client.post("/v1/classify", json={"texts": QUESTIONS, "variant": variant})
    for resp in singles + [listed]:
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["variant"] == variant and body["model"] == f"classifier_{variant}" and body["model_version"] == "1"
    for q, resp in zip(QUESTIONS, singles, strict=False):
        got = np.array([[resp.json()["results"][0]["probabilities"][lbl] for lbl in labels]])
        np.testing.assert_allclose(
            got, reference_probabilities(model_repository, variant, [q]), atol=PROB_ATOL[variant]
        )
    # Sent alone, the list is one batch of similar lengths: the same padded batch run in process must agree.
    got = np.array([[r["probabilities"][lbl] for lbl in labels] for r in listed.json()["results"]])
    np.testing.assert_allclose(
        got, reference_probabilities(model_repository, variant, QUESTIONS), atol=PROB_ATOL[variant]
    )
    assert [r["label"] for r in listed.json()["results"]] == [labels[i] for i in got.argmax(axis=1)]


async def test_concurrent_requests_share_batches(triton_server, model_repository):
    settings = gateway_settings(
        model_repository,
        triton_server.grpc_url,
        batch={"max_batch_size": 32, "max_wait_seconds": 0.05, "flush_when_idle": False},
    )
    n = 24
    before = _triton_counts(triton_server.grpc_url, "classifier_int8")
    async with gateway_client(settings) as client:
        resps = await asyncio.gather(
            *(client.post("/v1/classify", json={"text": QUESTIONS[i % len(QUESTIONS)]}) for i in range(n))
        )
        metrics = (await client.get("/metrics")).text
    assert all(r.status_code == 200 for r in resps)
    calls = _sample(metrics, "gateway_batch_size_count", variant="int8")
    rows = _sample(metrics, "gateway_batch_size_sum", variant="int8")
    assert rows == n and 1 <= calls < n  # the gateway's own batch-size histogram: fewer calls than requests
    after = _triton_counts(triton_server.grpc_url, "classifier_int8")
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == n  # Triton saw every text...
    assert executions <= calls < n  # ...in fewer model executions than requests


async def test_mixed_lengths_are_grouped(triton_server, model_repository):
    settings = gateway_settings(
        model_repository,
        triton_server.grpc_url,
        batch={
            "max_batch_size": 32,
            "max_wait_seconds": 0.05,
            "flush_when_idle": False,
            "length_bucket_edges": "16,32,64",
        },
    )
    backend = RecordingTritonBackend(settings)
    texts = [QUESTIONS[0], LONG_QUESTIONS[0], QUESTIONS[1], LONG_QUESTIONS[1], QUESTIONS[2]]
    async with gateway_client(settings, backend) as client:
        resps = await asyncio.gather(*(client.post("/v1/classify", json={"text": t}) for t in texts))
    assert all(r.status_code == 200 for r in resps)
    assert sum(b.rows for b in backend.batches) == len(texts)
    short = [b for b in backend.batches if b.seq_len <= 16]
    long = [b for b in backend.batches if b.seq_len > 16]
    assert sum(b.rows for b in short) == 3 and sum(b.rows for b in long) == 2  # short texts not padded to long ones


async def test_504_when_the_deadline_is_too_short(triton_server, model_repository):
    settings = gateway_settings(
        model_repository, triton_server.grpc_url, batch={"max_wait_seconds": 0.05, "flush_when_idle": False}
    )
    async with gateway_client(settings) as client:
        resp = await client.post("/v1/classify", json={"text": QUESTIONS[0], "deadline_ms": 1})
    assert resp.status_code == 504
    assert resp.json() == {"error": resp.json()["error"], "error_type": "deadline_exceeded"}


async def test_504_when_triton_exceeds_the_client_timeout(triton_server, model_repository):
    settings = gateway_settings(model_repository, triton_server.grpc_url, triton={"client_timeout_seconds": 0.0001})
    async with gateway_client(settings) as client:
        resp = await client.post("/v1/classify", json={"text": QUESTIONS[0]})
        metrics = (await client.get("/metrics")).text
    assert resp.status_code == 504 and resp.json()["error_type"] == "deadline_exceeded"
    assert _sample(metrics, "gateway_backend_errors_total", model="classifier_int8", status="deadline_exceeded") == 1


async def test_503_when_triton_goes_away(triton_server, model_repository):
    settings = gateway_settings(model_repository, triton_server.grpc_url)
    backend = RecordingTritonBackend(settings)
    async with gateway_client(settings, backend) as client:
        assert (await client.get("/readyz")).status_code == 200
        # Point the started backend at a port nobody listens on: a genuine gRPC UNAVAILABLE from here on.
        real_client = backend._client
        backend._client = grpcaio.InferenceServerClient(url=f"127.0.0.1:{closed_port()}")
        try:
            resp = await client.post("/v1/classify", json={"text": QUESTIONS[0]})
            ready = await client.get("/readyz")
        finally:
            await backend._client.close()
            backend._client = real_client
    assert resp.status_code == 503 and set(resp.json()) == {"error", "error_type"}
    assert resp.json()["error_type"] == "backend_unavailable"
    assert ready.status_code == 503 and ready.json()["error_type"] == "not_ready"


def test_process_serves_and_drains_on_sigterm(triton_server, model_repository, tmp_path):
    import httpx

    gw = GatewayProcess(
        [],
        {
            "GATEWAY_TRITON__GRPC_URL": triton_server.grpc_url,
            "GATEWAY_TRITON__MODEL_REPOSITORY": str(model_repository),
            "GATEWAY_DRAIN_GRACE_SECONDS": "0.5",
        },
        tmp_path / "gateway.log",
    )
    try:
        url = gw.wait_ready(60)
        resp = httpx.post(f"{url}/v1/classify", json={"texts": QUESTIONS[:2], "variant": "fp16"}, timeout=30)
        assert resp.status_code == 200 and len(resp.json()["results"]) == 2
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
        gw.proc.send_signal(signal.SIGTERM)
        # During the grace period the listener is still open but not ready.
        not_ready = httpx.get(f"{url}/readyz", timeout=10)
        assert not_ready.status_code == 503 and not_ready.json()["error"] == "gateway is draining"
        assert gw.proc.wait(timeout=60) == 0
    finally:
        gw.stop()
    assert triton_server.is_alive()  # an external Triton is not the gateway's to stop


def test_embedded_triton_starts_serves_and_stops(model_repository, tmp_path):
    gw = GatewayProcess(
        [
            "--embedded-triton",
            "--model-repository",
            str(model_repository),
            "--triton-log",
            str(tmp_path / "triton.log"),
        ],
        {"GATEWAY_DRAIN_GRACE_SECONDS": "0"},
        tmp_path / "gateway.log",
    )
    try:
        import httpx

        url = gw.wait_ready(180)
        assert "curl -s -X POST" in gw.log()
        resp = httpx.post(f"{url}/v1/classify", json={"text": QUESTIONS[0]}, timeout=30)
        assert resp.status_code == 200 and resp.json()["variant"] == "int8"
        assert gw.terminate(timeout_seconds=60) == 0
    finally:
        gw.stop()
    # Triton ran (it logged) and the gateway stopped it; the session fixture in conftest.py also fails the run if
    # any tritonserver started by these tests outlives the session.
    assert (tmp_path / "triton.log").read_text(errors="replace")
