"""The classifier's model adapter: exact tokenization at admission, truncation as trained, padding, softmax."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from tokenizers import Tokenizer

from service.gateway.backend.fake import FakeBackend, write_fake_repository
from service.gateway.errors import DeadlineExceeded, Internal
from service.gateway.metrics import GatewayMetrics
from service.gateway.model import ClassifierModel, TextEncoder, softmax
from service.gateway.repository import RepositoryError, load_variant_model
from service.triton import repository as contract
from tests.helpers.gateway import LABELS, LONG, SHORT, base_tokenizer_json


def test_lengths_are_exact_token_counts_with_special_tokens():
    path = base_tokenizer_json()
    encoder = TextEncoder(path, max_length=64)
    plain = Tokenizer.from_file(str(path))
    plain.no_padding()
    plain.no_truncation()
    for text in (SHORT, "Where is Rome ?", "a"):
        (row,) = encoder.encode([text])
        assert row.tolist() == plain.encode(text).ids  # [CLS] ... [SEP], no padding, no estimate
    (long_row,) = encoder.encode([LONG * 3])
    assert len(long_row) == 64 and long_row[-1] == plain.token_to_id("[SEP]")


def test_head_tail_truncation_keeps_the_start_and_the_end():
    path = base_tokenizer_json()
    encoder = TextEncoder(path, max_length=16, truncation="head_tail", head_tokens=5)
    plain = Tokenizer.from_file(str(path))
    plain.no_padding()
    plain.no_truncation()
    text = " ".join(f"word{i}" for i in range(40))
    full = plain.encode(text).ids
    (row,) = encoder.encode([text])
    assert row.tolist() == full[:5] + full[-11:]
    (short,) = encoder.encode([SHORT])  # under the limit: untouched
    assert short.tolist() == plain.encode(SHORT).ids
    with pytest.raises(RepositoryError):
        TextEncoder(path, max_length=16, truncation="head_tail", head_tokens=16)


def test_pad_to_the_longest_row_of_the_batch():
    encoder = TextEncoder(base_tokenizer_json(), max_length=64)
    rows = encoder.encode([SHORT, LONG])
    ids, mask = encoder.pad(rows)
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert ids.shape == mask.shape == (2, max(len(r) for r in rows))
    assert mask[0].sum() == len(rows[0]) and (ids[0, len(rows[0]) :] == encoder.pad_id).all()


def test_labels_json_truncation_reaches_the_encoder(tmp_path):
    repo = write_fake_repository(tmp_path / "repo", base_tokenizer_json(), labels=LABELS, variants=("int8",))
    vdir = repo / "classifier_int8" / "1"
    info = contract.read_labels(vdir)
    contract.write_labels(vdir, dataclasses.replace(info, truncation="head_tail", head_tokens=3))
    model = load_variant_model(repo, "classifier_int8", "int8", None)
    adapter = ClassifierModel(
        model, FakeBackend(len(LABELS)), GatewayMetrics(version="t", git_sha="t"), tokenize_in_thread=False
    )
    assert adapter.encoder.truncation == "head_tail" and adapter.encoder.head_tokens == 3


async def test_process_returns_probabilities_and_checks_the_shape(tmp_path):
    repo = write_fake_repository(tmp_path / "repo", base_tokenizer_json(), labels=LABELS, variants=("int8",))
    model = load_variant_model(repo, "classifier_int8", "int8", None)
    metrics = GatewayMetrics(version="t", git_sha="t")
    adapter = ClassifierModel(model, FakeBackend(len(LABELS)), metrics, tokenize_in_thread=True)
    rows = await adapter.prepare([SHORT] * 12)  # more than the inline limit: tokenized in a worker thread
    predictions = await adapter.process(rows, timeout_seconds=5.0)
    assert len(predictions) == 12 and predictions[0].model_version == "1"
    assert all(abs(p.probabilities.sum() - 1.0) < 1e-9 for p in predictions)
    broken = ClassifierModel(model, FakeBackend(len(LABELS), row_delta=1), metrics, tokenize_in_thread=False)
    with pytest.raises(Internal):
        await broken.process(rows, timeout_seconds=5.0)
    slow = ClassifierModel(model, FakeBackend(len(LABELS), latency_seconds=1.0), metrics, tokenize_in_thread=False)
    with pytest.raises(DeadlineExceeded):
        await slow.process(rows, timeout_seconds=0.05)
    errors = metrics.registry.get_sample_value(
        "gateway_backend_errors_total", {"model": "classifier_int8", "status": "deadline_exceeded"}
    )
    assert errors == 1


def test_softmax_is_stable_for_large_logits():
    probs = softmax(np.array([[1000.0, 0.0], [-1000.0, -999.0]], dtype=np.float32))
    assert np.isfinite(probs).all() and np.allclose(probs.sum(axis=1), 1.0)
    assert probs[0, 0] == pytest.approx(1.0) and probs[1, 1] > probs[1, 0]
