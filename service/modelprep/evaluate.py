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


def measure_throughput(
    session, tokenizer, texts: list[str], max_length: int, cfg: EvalConfig, progress=None
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Sequences per second at each batch size, median of ``cfg.repeats`` runs of ``cfg.seconds_per_repeat``.

    Batches are consecutive test texts padded to their longest (as the gateway does), so the figures reflect
    real lengths rather than a fixed padded shape.
    """
    medians: dict[str, float] = {}
    runs: dict[str, list[float]] = {}
    for bs in cfg.batch_sizes:
        feeds = []
        for s in range(0, max(bs, min(len(texts), bs * 16)), bs):
            chunk = [texts[(s + k) % len(texts)] for k in range(bs)]
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="np")
            feeds.append({"input_ids": enc["input_ids"].astype(np.int64),
                          "attention_mask": enc["attention_mask"].astype(np.int64)})
        for f in feeds[:2]:  # warm-up
            session.run(None, f)
        rates = []
        for _ in range(cfg.repeats):
            n = 0
            t0 = time.perf_counter()
            i = 0
            while True:
                session.run(None, feeds[i % len(feeds)])
                n += bs
                i += 1
                if time.perf_counter() - t0 >= cfg.seconds_per_repeat:
                    break
            rates.append(n / (time.perf_counter() - t0))
            if progress is not None:
                progress.update(1)
        medians[str(bs)] = statistics.median(rates)
        runs[str(bs)] = [round(r, 2) for r in rates]
    return medians, runs


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
    progress=None,
) -> tuple[VariantReport, np.ndarray]:
    """Evaluate one ONNX file; returns its report row and its test logits."""
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
    if cfg.throughput:
        row.throughput, row.throughput_runs = measure_throughput(session, tokenizer, texts, max_length, cfg, progress)
    return row, logits
