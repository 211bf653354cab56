"""Shared fixtures: a tiny but real model build, published into a temporary Triton model repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory):
    """A real build (TREC subset, 12 LoRA steps, merge, ONNX export, FP16, INT8 dynamic) of about 20 s.

    Returns the ``BuildResult``; its ``published`` maps ``int8``/``fp16`` to the version directories.
    """
    pytest.importorskip("torch")
    from service.modelprep.config import BuildConfig
    from service.modelprep.pipeline import build

    root = tmp_path_factory.mktemp("tiny-build")
    cfg = BuildConfig.tiny(workdir=root / "work", repository=root / "model_repository")
    return build(cfg, progress=False)


@pytest.fixture(scope="session")
def tiny_repository(tiny_build) -> Path:
    """A Triton model repository with ``classifier_int8/1`` and ``classifier_fp16/1`` (docs/model_repository.md)."""
    return Path(tiny_build.published["int8"]).parents[1]
