"""The classifier's model adapter: everything the gateway knows about the model, per served variant.

The batcher is model-agnostic; this module supplies its two ends:

- at admission, :meth:`ClassifierModel.prepare` tokenizes a request's texts once, exactly (the token counts drive
  length bucketing and the padded-token budget; no estimate), truncated the way the version was trained;
- per batch, :meth:`ClassifierModel.process` pads the prepared rows to the batch's longest, calls the backend once,
  checks the answer's shape, and turns logits into probabilities (softmax).

Only the ``tokenizers`` library and numpy are used: no transformers, no torch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from service.gateway.backend.base import InferenceBackend
from service.gateway.errors import DeadlineExceeded, Internal, ServiceError
from service.gateway.metrics import GatewayMetrics
from service.gateway.repository import RepositoryError, VariantModel

logger = logging.getLogger("service.gateway.model")

#: Requests with more texts than this are tokenized in a worker thread (the tokenizers library releases the GIL), so
#: a large request does not hold the event loop; small ones are tokenized inline, where a thread hop costs more
#: than the work.
TOKENIZE_INLINE_MAX_TEXTS = 8


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one text.

    Attributes:
        probabilities: FP64 [num_labels], columns in the order of the model's labels.
        model_version: The model version that answered, as the server reports it.
    """

    probabilities: np.ndarray
    model_version: str


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 for stable probabilities.

    Args:
        logits: [rows, classes].

    Returns:
        Probabilities of the same shape, each row summing to 1.
    """
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class TextEncoder:
    """Tokenizes texts for one model version (exact ids, truncated as in training) and pads batches of them.

    Args:
        tokenizer_path: The version's tokenizer.json.
        max_length: Truncation length in tokens.
        truncation: ``"head"`` (keep the first max_length tokens) or ``"head_tail"``.
        head_tokens: With ``"head_tail"``: keep the first ``head_tokens`` and the last ``max_length - head_tokens``
            tokens (special tokens included, so the first and the last special token survive).
    """

    def __init__(self, tokenizer_path, max_length: int, *, truncation: str = "head", head_tokens: int = 0) -> None:
        tok = Tokenizer.from_file(str(tokenizer_path))
        saved_padding = tok.padding or {}
        pad_token = saved_padding.get("pad_token", "[PAD]")
        pad_id = saved_padding.get("pad_id", tok.token_to_id(pad_token))
        if pad_id is None:
            raise RepositoryError(f"{tokenizer_path}: no padding token ({pad_token!r} is not in the vocabulary)")
        if truncation not in ("head", "head_tail"):
            raise RepositoryError(f"unknown truncation {truncation!r}")
        if truncation == "head_tail" and not 1 <= head_tokens < max_length:
            raise RepositoryError(f"head_tokens must be in [1, {max_length}), got {head_tokens}")
        # Rows are padded per batch here, never by the tokenizer (a saved tokenizer.json often pads to 128).
        tok.no_padding()
        if truncation == "head":
            tok.enable_truncation(max_length)
        else:
            tok.no_truncation()
        self._tokenizer = tok
        self.pad_id = int(pad_id)
        self.max_length = max_length
        self.truncation = truncation
        self.head_tokens = head_tokens

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text (INT64, unpadded, at most max_length long)."""
        # One text (the common request) skips encode_batch's parallel machinery: ~10% less CPU per text.
        encodings = [self._tokenizer.encode(texts[0])] if len(texts) == 1 else self._tokenizer.encode_batch(list(texts))
        rows = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        if self.truncation == "head_tail":
            tail = self.max_length - self.head_tokens
            rows = [
                r if len(r) <= self.max_length else np.concatenate([r[: self.head_tokens], r[-tail:]]) for r in rows
            ]
        return rows

    def pad(self, rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Pad rows to the longest: ``(input_ids, attention_mask)``, both INT64 [len(rows), longest]."""
        longest = max(len(r) for r in rows)
        input_ids = np.full((len(rows), longest), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), longest), dtype=np.int64)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = r
            attention_mask[i, : len(r)] = 1
        return input_ids, attention_mask


class ClassifierModel:
    """The model adapter of one served variant: ``prepare`` at admission, ``process`` per batch.

    Args:
        model: The variant's repository description (name, version, labels, truncation).
        backend: Where batches go (Triton, or the fake backend in unit tests).
        metrics: The gateway's metrics (tokenize time, padded length, backend time and errors).
        tokenize_in_thread: Tokenize requests of more than :data:`TOKENIZE_INLINE_MAX_TEXTS` texts in a thread.
    """

    def __init__(
        self, model: VariantModel, backend: InferenceBackend, metrics: GatewayMetrics, *, tokenize_in_thread: bool
    ) -> None:
        self.model = model
        self.encoder = TextEncoder(
            model.tokenizer_path, model.max_length, truncation=model.truncation, head_tokens=model.head_tokens
        )
        self._backend = backend
        self._metrics = metrics
        self._tokenize_in_thread = tokenize_in_thread
        variant = model.variant
        self._tokenize_time = metrics.tokenize_duration_seconds.labels(variant=variant)
        self._seq_len = metrics.batch_sequence_length.labels(variant=variant)
        self._backend_time = metrics.backend_request_duration_seconds.labels(model=model.model_name)

    async def prepare(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Tokenize one request's texts (exact token counts for the batcher's buckets and budget)."""
        t0 = time.perf_counter()
        if self._tokenize_in_thread and len(texts) > TOKENIZE_INLINE_MAX_TEXTS:
            rows = await asyncio.to_thread(self.encoder.encode, texts)
        else:
            rows = self.encoder.encode(texts)
        self._tokenize_time.observe(time.perf_counter() - t0)
        return rows

    async def process(self, rows: list[np.ndarray], timeout_seconds: float) -> list[Prediction]:
        """Run one batch: pad, one backend call (ended after ``timeout_seconds``), softmax.

        Raises:
            DeadlineExceeded: The backend did not answer within ``timeout_seconds``.
            Internal: The backend's logits do not have one row per text and one column per label.
            ServiceError: What the backend raised (BackendUnavailable, BackendError, DeadlineExceeded).
        """
        m = self.model
        input_ids, attention_mask = self.encoder.pad(rows)
        self._seq_len.observe(input_ids.shape[1])
        t1 = time.perf_counter()
        try:
            try:
                # Cancelling the gRPC call at its deadline cancels it at Triton too.
                out = await asyncio.wait_for(
                    self._backend.infer(m.model_name, m.version, input_ids, attention_mask), timeout_seconds
                )
            except asyncio.TimeoutError:
                raise DeadlineExceeded("deadline passed while the inference server was computing") from None
            finally:
                self._backend_time.observe(time.perf_counter() - t1)
            logits = out.logits
            if logits.ndim != 2 or logits.shape[0] != len(rows) or logits.shape[1] != len(m.labels):
                logger.error(
                    "%s returned logits of shape %s for %d texts and %d labels",
                    m.model_name,
                    tuple(logits.shape),
                    len(rows),
                    len(m.labels),
                )
                raise Internal("the inference backend returned a malformed result")
        except ServiceError as exc:
            self._metrics.backend_errors_total.labels(model=m.model_name, status=exc.error_type).inc()
            raise
        probs = softmax(logits)
        return [Prediction(probabilities=row, model_version=out.model_version) for row in probs]
