"""Accuracy, agreement and in-process speed of each ONNX variant on the held-out test split."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .config import EvalConfig
from .export import onnx_logits, ort_session


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float((pred == gold).mean()) if len(gold) else 0.0


def macro_f1(pred: np.ndarray, gold: np.ndarray, n_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in gold or predictions."""
    f1s = []
    for c in range(n_classes):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else 0.0


@dataclass
class VariantReport:
    """One row of the report."""

    name: str
    path: str
    size_bytes: int
    accuracy: float
    macro_f1: float
    agreement_with_fp32: float | None = None
    max_abs_logit_diff_vs_fp32: float | None = None
    throughput: dict[str, float] = field(default_factory=dict)  # "batch size" -> median sequences/s
    throughput_runs: dict[str, list[float]] = field(default_factory=dict)
    served: bool = False
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _feeds(tokenizer, texts: list[str], max_length: int, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Up to 16 batches of consecutive test texts, each padded to its own longest (as the gateway pads)."""
    feeds = []
    for s in range(0, max(batch_size, min(len(texts), batch_size * 16)), batch_size):
        chunk = [texts[(s + k) % len(texts)] for k in range(batch_size)]
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="np")
        feeds.append(
            {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
        )
    return feeds


def _timed_rate(session, feeds: list[dict], batch_size: int, seconds: float) -> float:
    n, i = 0, 0
    t0 = time.perf_counter()
    while True:
        session.run(None, feeds[i % len(feeds)])
        n += batch_size
        i += 1
        if time.perf_counter() - t0 >= seconds:
            return n / (time.perf_counter() - t0)


def measure_throughput_interleaved(
    sessions: dict[str, object], tokenizer, texts: list[str], max_length: int, cfg: EvalConfig, progress=None
) -> dict[str, tuple[dict[str, float], dict[str, list[float]]]]:
    """Sequences per second of every session at each batch size: the median of ``cfg.repeats`` rounds.

    Each round times every session once per batch size, one after the other, so a slow spell of a shared machine
    (another tenant, a noisy neighbour) lowers all variants alike instead of one, and the ratios the report and
    its targets rest on stay fair. All sessions read the same batches.

    Returns:
        name -> (median sequences/s per batch size, every round's rate per batch size).
    """
    rates: dict[str, dict[str, list[float]]] = {name: {} for name in sessions}
    feeds = {bs: _feeds(tokenizer, texts, max_length, bs) for bs in cfg.batch_sizes}
    for session in sessions.values():  # warm-up: first runs allocate and pick kernels
        for bs in cfg.batch_sizes:
            for f in feeds[bs][:2]:
                session.run(None, f)
    for _ in range(cfg.repeats):
        for bs in cfg.batch_sizes:
            for name, session in sessions.items():
                rates[name].setdefault(str(bs), []).append(_timed_rate(session, feeds[bs], bs, cfg.seconds_per_repeat))
                if progress is not None:
                    progress.update(1)
    return {
        name: (
            {bs: statistics.median(r) for bs, r in by_bs.items()},
            {bs: [round(x, 2) for x in r] for bs, r in by_bs.items()},
        )
        for name, by_bs in rates.items()
    }


def evaluate_variant(
    name: str,
    path: Path,
    tokenizer,
    texts: list[str],
    gold: list[int],
    n_classes: int,
    max_length: int,
    cfg: EvalConfig,
    reference_logits: np.ndarray | None = None,
) -> tuple[VariantReport, np.ndarray, object]:
    """Accuracy and agreement of one ONNX file; returns its report row, its test logits and its session (for
    ``measure_throughput_interleaved``, which fills ``row.throughput`` with every variant measured side by side)."""
    threads = cfg.threads or os.cpu_count() or 1
    session = ort_session(path, threads=threads)
    logits = onnx_logits(session, tokenizer, texts, max_length)
    pred = logits.argmax(1)
    gold_a = np.asarray(gold)
    row = VariantReport(
        name=name,
        path=str(path),
        size_bytes=Path(path).stat().st_size,
        accuracy=accuracy(pred, gold_a),
        macro_f1=macro_f1(pred, gold_a, n_classes),
    )
    if reference_logits is not None:
        row.agreement_with_fp32 = float((pred == reference_logits.argmax(1)).mean())
        row.max_abs_logit_diff_vs_fp32 = float(np.abs(logits - reference_logits).max())
    return row, logits, session
