"""``python -m service.gateway --embedded-triton`` with generation on: the embedded Triton loads the generator too.

One process-level run against a repository holding the tiny classifier build (tests/conftest.py) and the tiny random
generator (tests/generator/conftest.py): classify, generate over REST and over the gateway's gRPC stream, drain.
"""

from __future__ import annotations

import queue
import re
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.gateway.__main__ import embedded_models
from service.gateway.settings import Settings
from tests.generator.conftest import MODEL
from tests.helpers.gateway_process import QUESTIONS, GatewayProcess

pytestmark = pytest.mark.integration

GRPC_LINE = re.compile(r"gateway gRPC \(v2 GRPCInferenceService, health\) at (\S+)")


@pytest.fixture(scope="module")
def full_repository(tiny_repository, generator_repository, tmp_path_factory) -> Path:
    """The tiny classifier variants and the generator, as links in one repository."""
    repo = tmp_path_factory.mktemp("embedded") / "model_repository"
    repo.mkdir()
    for model in ("classifier_int8", "classifier_fp16"):
        (repo / model).symlink_to(Path(tiny_repository) / model, target_is_directory=True)
    (repo / MODEL).symlink_to(generator_repository / MODEL, target_is_directory=True)
    return repo


def test_embedded_models_add_the_published_generator(full_repository, tmp_path, monkeypatch):
    for name in ("GATEWAY_VARIANTS", "GATEWAY_GENERATE__ENABLED", "GATEWAY_GENERATE__VARIANTS"):
        monkeypatch.delenv(name, raising=False)
    on = Settings(triton={"model_repository": full_repository}, generate={"enabled": True})
    assert embedded_models(on) == ("classifier_int8", "classifier_fp16", MODEL)
    off = Settings(triton={"model_repository": full_repository})
    assert embedded_models(off) == ("classifier_int8", "classifier_fp16")
    (tmp_path / "generator_fp32").mkdir()  # a config without a version directory is not published
    (tmp_path / "generator_fp32" / "config.pbtxt").write_text("name: 'generator_fp32'")
    with pytest.raises(ValueError, match="build-generator"):
        embedded_models(Settings(triton={"model_repository": tmp_path}, generate={"enabled": True}))


def test_gateway_with_embedded_triton_serves_the_generator(full_repository, tmp_path):
    import tritonclient.grpc as grpcclient

    gw = GatewayProcess(
        ["--embedded-triton", "--model-repository", str(full_repository), "--triton-log", str(tmp_path / "t.log")],
        {"GATEWAY_GENERATE__ENABLED": "1", "GATEWAY_DRAIN_GRACE_SECONDS": "0"},
        tmp_path / "gateway.log",
    )
    try:
        url = gw.wait_ready(180)
        assert "/v1/generate" in gw.log()  # the ready message shows a generate example
        classified = httpx.post(f"{url}/v1/classify", json={"text": QUESTIONS[0]}, timeout=30)
        generated = httpx.post(
            f"{url}/v1/generate", json={"prompt": "Hello there", "max_new_tokens": 5, "ignore_eos": True}, timeout=60
        )
        grpc_url = GRPC_LINE.search(gw.log()).group(1)
        client = grpcclient.InferenceServerClient(grpc_url)
        answers: queue.Queue = queue.Queue()
        client.start_stream(lambda result, error: answers.put((result, error)))
        prompt = grpcclient.InferInput("prompt", [1], "BYTES")
        prompt.set_data_from_numpy(np.array([b"Hello there"], dtype=object))
        limit = grpcclient.InferInput("max_new_tokens", [1], "INT32")
        limit.set_data_from_numpy(np.array([3], dtype=np.int32))
        client.async_stream_infer(MODEL, [prompt, limit], request_id="e")
        streamed = []
        while True:
            result, error = answers.get(timeout=60)
            assert error is None, error
            streamed.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        client.stop_stream()
        client.close()
        assert gw.terminate(timeout_seconds=60) == 0
    finally:
        gw.stop()
    assert classified.status_code == 200, classified.text
    assert generated.status_code == 200, generated.text
    assert generated.json()["usage"]["completion_tokens"] == 5 and generated.json()["model"] == MODEL
    assert streamed[-1].as_numpy("finish_reason")[0] in (b"length", b"eos")
    assert "generator_fp32" in (tmp_path / "t.log").read_text(errors="replace")


def test_generation_on_without_a_generator_fails_before_starting_triton(tiny_repository, tmp_path):
    gw = GatewayProcess(
        ["--embedded-triton", "--model-repository", str(tiny_repository), "--triton-log", str(tmp_path / "t.log")],
        {"GATEWAY_GENERATE__ENABLED": "1"},
        tmp_path / "gateway.log",
    )
    try:
        code = gw.proc.wait(timeout=60)
    finally:
        gw.stop()
    assert code == 1
    assert "generator_fp32 is not published" in gw.log() and "build-generator" in gw.log()
    assert not (tmp_path / "t.log").exists()  # Triton was never started
