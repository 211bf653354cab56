"""Fixtures of the in-process tests: a fake model repository with the real base tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.gateway.backend.fake import write_fake_repository
from tests.helpers.gateway import LABELS, base_tokenizer_json


@pytest.fixture
def repo(tmp_path) -> Path:
    """A fake repository: classifier_int8/1 and classifier_fp16/1 with labels.json and tokenizer.json, no model."""
    return write_fake_repository(tmp_path / "repo", base_tokenizer_json(), labels=LABELS)
