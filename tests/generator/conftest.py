"""Fixtures of the generator tests: a published random generator and one real tritonserver serving it.

The serving model is a random Llama of SmolLM2's architecture (hidden 384, 4 layers, the real 49,152-token
vocabulary): untrained, but with enough work per decode step that batching pays as it does for the real model,
and it exports and loads in seconds. The real SmolLM2 is exercised by test_real_model.py and the build report.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from service.gateway.backend.fake import write_fake_repository
from service.gateway.settings import Settings
from service.generator.publish import ServingLimits
from tests.helpers.gateway import LABELS, base_tokenizer_json

pytest.importorskip("torch")

MODEL = "generator_fp32"
#: Budget of the serving tests' engine: 24 MiB of KV cache. The random model's cache costs
#: 2 x 4 layers x 2 heads x 96 x 4 bytes = 6,144 bytes per token, so the budget holds ~4,000 tokens.
SERVING_LIMITS = ServingLimits(
    max_kv_cache_bytes=24 * 1024 * 1024, max_active_sequences=12, max_context_tokens=1024, max_new_tokens_limit=256
)


@pytest.fixture(scope="session")
def generator_repository(tmp_path_factory) -> Path:
    """A model repository holding ``generator_fp32/1`` (random weights, real tokenizer)."""
    from service.generator.pipeline import publish_random_generator

    root = tmp_path_factory.mktemp("generator")
    publish_random_generator(root / "model_repository", root / "work", limits=SERVING_LIMITS)
    return root / "model_repository"


@pytest.fixture(scope="session")
def generator_triton(generator_repository, tmp_path_factory):
    """A real tritonserver serving the generator on free 127.0.0.1 ports; stopped after the session."""
    from service.triton.launcher import TritonLaunchConfig, TritonServer

    log_path = tmp_path_factory.mktemp("generator-triton") / "tritonserver.log"
    server = TritonServer(
        TritonLaunchConfig(model_repository=generator_repository, log_path=log_path, startup_timeout_seconds=180.0)
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def combined_repository(generator_repository, tmp_path_factory) -> Path:
    """The fake classifier's files plus the real generator model, in one repository."""
    repo = write_fake_repository(tmp_path_factory.mktemp("combined") / "repo", base_tokenizer_json(), labels=LABELS)
    (repo / MODEL).symlink_to(generator_repository / MODEL, target_is_directory=True)
    return repo


def make_settings(repo: Path, triton, **kw) -> Settings:
    """Settings on the combined repository, Triton's gRPC URL for the generator (the classifier side is fake)."""
    return Settings(
        triton={"model_repository": repo, "grpc_url": triton.grpc_url}, batch={"max_wait_seconds": 0.0}, **kw
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
