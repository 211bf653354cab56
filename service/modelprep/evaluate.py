"""Accuracy, agreement and in-process speed of each ONNX variant on the held-out test split."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .config import EvalConfig
from .onnxrt import onnx_logits, ort_session
from .scoring import accuracy, class_report, macro_f1
from .tokens import encode


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
    per_class: dict[str, dict] = field(default_factory=dict)  # label -> precision, recall, f1, support

    def to_dict(self) -> dict:
        return asdict(self)


def _feeds(
    tokenizer, texts: list[str], max_length: int, batch_size: int, truncation: str = "head"
) -> list[dict[str, np.ndarray]]:
    """Up to 16 batches of consecutive test texts, each padded to its own longest (as the gateway pads)."""
    feeds = []
    for s in range(0, max(batch_size, min(len(texts), batch_size * 16)), batch_size):
        chunk = [texts[(s + k) % len(texts)] for k in range(batch_size)]
        feeds.append(encode(tokenizer, chunk, max_length, truncation, tensors="np"))
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
    sessions: dict[str, object],
    tokenizer,
    texts: list[str],
    max_length: int,
    cfg: EvalConfig,
    progress=None,
    truncation: str = "head",
) -> dict[str, tuple[dict[str, float], dict[str, list[float]]]]:
    """Sequences per second of every session at each batch size: the median of ``cfg.repeats`` rounds.

    Each round times every session once per batch size, one after the other, so a slow spell of a shared machine
    (another tenant, a noisy neighbour) lowers all variants alike instead of one, and the ratios the report and
    its targets rest on stay fair. All sessions read the same batches.

    Returns:
        name -> (median sequences/s per batch size, every round's rate per batch size).
    """
    rates: dict[str, dict[str, list[float]]] = {name: {} for name in sessions}
    feeds = {bs: _feeds(tokenizer, texts, max_length, bs, truncation) for bs in cfg.batch_sizes}
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
    label_names: list[str] | None = None,
    truncation: str = "head",
) -> tuple[VariantReport, np.ndarray, object]:
    """Accuracy and agreement of one ONNX file; returns its report row, its test logits and its session (for
    ``measure_throughput_interleaved``, which fills ``row.throughput`` with every variant measured side by side).
    The row carries per-class precision and recall."""
    threads = cfg.threads or os.cpu_count() or 1
    session = ort_session(path, threads=threads)
    logits = onnx_logits(session, tokenizer, texts, max_length, truncation=truncation)
    pred = logits.argmax(1)
    gold_a = np.asarray(gold)
    row = VariantReport(
        name=name,
        path=str(path),
        size_bytes=Path(path).stat().st_size,
        accuracy=accuracy(pred, gold_a),
        macro_f1=macro_f1(pred, gold_a, n_classes),
        per_class=class_report(pred, gold_a, label_names or [str(i) for i in range(n_classes)]),
    )
    if reference_logits is not None:
        row.agreement_with_fp32 = float((pred == reference_logits.argmax(1)).mean())
        row.max_abs_logit_diff_vs_fp32 = float(np.abs(logits - reference_logits).max())
    return row, logits, session
