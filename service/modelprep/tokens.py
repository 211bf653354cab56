"""Tokenization shared by every verb: truncation (head or head+tail), token-length statistics, batching by length.

Training, evaluation, calibration, ONNX parity and compression all encode text through ``encode`` here, so a
model is always trained, checked and measured on exactly the tokens it will see. Nothing here imports torch at
module level: ``encode(..., tensors="np")`` serves ONNX Runtime without it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np

from .config import TRUNCATIONS
from .errors import ConfigError

#: head+tail truncation keeps this share of the token budget from the start of a long text and the rest from its
#: end (Sun et al., 2019, "How to Fine-Tune BERT for Text Classification?" found head 128 + tail 382 of 510 best).
HEAD_SHARE = 0.25
#: ``--max-length auto`` never goes below this many tokens (shorter buys no speed: batches pad to their longest).
AUTO_MIN_LENGTH = 16


def _specials(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens a single text is wrapped in: ([CLS], [SEP]) on BERT, (<s>, </s>) on MPNet."""
    empty = list(tokenizer("", add_special_tokens=True)["input_ids"])
    return empty[:1], empty[1:]


def _special_count(tokenizer) -> int:
    head, tail = _specials(tokenizer)
    return len(head) + len(tail)


def token_lengths(tokenizer, texts: Sequence[str], batch_size: int = 512) -> list[int]:
    """Untruncated token counts of ``texts``, special tokens included (what ``max_length`` is compared with)."""
    extra = _special_count(tokenizer)
    out: list[int] = []
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[s : s + batch_size]), add_special_tokens=False, truncation=False)
        out.extend(len(ids) + extra for ids in enc["input_ids"])
    return out


def auto_max_length(lengths: Sequence[int], coverage: float = 0.95, model_max: int = 512) -> int:
    """The truncation length that keeps ``coverage`` of the texts whole, rounded up to a multiple of 16.

    Args:
        lengths: token counts of the training texts (``token_lengths``).
        coverage: share of the texts that must fit untruncated.
        model_max: the base model's position limit.

    Returns:
        A length in ``[AUTO_MIN_LENGTH, model_max]``.
    """
    if not 0.5 <= coverage <= 1.0:
        raise ConfigError(f"max_length_coverage must be in [0.5, 1], got {coverage}")
    if not lengths:
        return min(model_max, 64)
    q = float(np.quantile(np.asarray(lengths), coverage, method="higher"))
    return int(min(model_max, max(AUTO_MIN_LENGTH, 16 * math.ceil(q / 16))))


def length_summary(lengths: Sequence[int], max_length: int) -> dict[str, float | int]:
    """Percentiles of the token counts and the share of texts longer than ``max_length`` (cut by truncation)."""
    if not lengths:
        return {"texts": 0, "max_length": max_length, "truncated_share": 0.0}
    a = np.asarray(lengths)
    return {
        "texts": int(a.size),
        "max_length": int(max_length),
        "p50": int(np.quantile(a, 0.5, method="higher")),
        "p90": int(np.quantile(a, 0.9, method="higher")),
        "p95": int(np.quantile(a, 0.95, method="higher")),
        "p99": int(np.quantile(a, 0.99, method="higher")),
        "max": int(a.max()),
        "mean": round(float(a.mean()), 1),
        "truncated_share": round(float((a > max_length).mean()), 4),
    }


def _head_tail(ids: list[int], budget: int) -> list[int]:
    if len(ids) <= budget:
        return ids
    head = max(1, round(budget * HEAD_SHARE))
    tail = budget - head
    return ids[:head] + (ids[-tail:] if tail > 0 else [])


def encode(tokenizer, texts: Sequence[str], max_length: int, truncation: str = "head", tensors: str = "pt") -> dict:
    """Tokenize a batch, truncated to ``max_length`` tokens and padded to the batch's longest.

    Args:
        tokenizer: a Hugging Face (fast) tokenizer.
        texts: the batch.
        max_length: token budget including the special tokens.
        truncation: ``"head"`` keeps the first tokens; ``"head_tail"`` keeps the first quarter of the budget and
            the last three quarters from the end of the text (long documents often conclude at the end).
        tensors: ``"pt"`` (torch) or ``"np"`` (INT64 numpy arrays, for ONNX Runtime).

    Returns:
        ``{"input_ids": ..., "attention_mask": ...}``.
    """
    if truncation not in TRUNCATIONS:
        raise ConfigError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    if truncation == "head":
        enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="np")
        ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    else:
        first, last = _specials(tokenizer)
        budget = max_length - len(first) - len(last)
        raw = tokenizer(list(texts), add_special_tokens=False, truncation=False)["input_ids"]
        rows = [first + _head_tail(list(r), budget) + last for r in raw]
        width = max((len(r) for r in rows), default=0)
        pad = tokenizer.pad_token_id or 0
        ids = np.full((len(rows), width), pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
    if tensors == "np":
        return {"input_ids": ids, "attention_mask": mask}
    import torch

    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


def length_grouped_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, then sort within windows of 50 batches by length: little padding, still a random order."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    window = batch_size * 50
    batches: list[list[int]] = []
    for s in range(0, len(idx), window):
        chunk = sorted(idx[s : s + window], key=lambda i: lengths[i])
        batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def length_sorted_chunks(texts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Indices of ``texts`` in batches of similar character length (inference: little padding)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
