"""Classification scores on label indices (numpy only): accuracy, macro-F1, per-class precision and recall."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: ``selection_metric="auto"`` selects on macro-F1 when the rarest training class has less than this share of the
#: uniform share 1/K (< 25% of the texts with 2 classes, < 8.3% with 6): accuracy then mostly rewards the
#: majority classes.
IMBALANCE_SHARE = 0.5


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float((np.asarray(pred) == np.asarray(gold)).mean()) if len(gold) else 0.0


def per_class(pred: np.ndarray, gold: np.ndarray, n_classes: int) -> list[dict[str, float | int]]:
    """Precision, recall, F1 and support of every class index (0 where undefined: no prediction or no example)."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    rows = []
    for c in range(n_classes):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        rows.append(
            {
                "precision": tp / (tp + fp) if tp + fp else 0.0,
                "recall": tp / (tp + fn) if tp + fn else 0.0,
                "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
                "support": tp + fn,
                "_present": tp + fp + fn > 0,
            }
        )
    return rows


def macro_f1(pred: np.ndarray, gold: np.ndarray, n_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in gold or predictions."""
    f1s = [r["f1"] for r in per_class(pred, gold, n_classes) if r["_present"]]
    return float(np.mean(f1s)) if f1s else 0.0


def class_report(pred: np.ndarray, gold: np.ndarray, label_names: Sequence[str]) -> dict[str, dict]:
    """Per-class precision/recall/F1/support keyed by label name (for the report)."""
    return {
        name: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if not k.startswith("_")}
        for name, row in zip(label_names, per_class(pred, gold, len(label_names)), strict=False)
    }


def is_imbalanced(labels: Sequence[int], n_classes: int) -> bool:
    """True when the rarest class has less than ``IMBALANCE_SHARE`` x 1/K of the examples."""
    if not labels or n_classes < 2:
        return False
    counts = np.bincount(np.asarray(labels), minlength=n_classes)
    return bool(counts.min() / counts.sum() < IMBALANCE_SHARE / n_classes)


#: ``auto`` selects on macro-F1 only when every class has at least this many validation examples: below that, one
#: example moves a class's F1 by several points and the best epoch would be picked by noise (TREC's ABBR class has 9).
MIN_VALIDATION_SUPPORT = 20


def resolve_selection_metric(
    metric: str, labels: Sequence[int], n_classes: int, validation_labels: Sequence[int] | None = None
) -> tuple[str, str]:
    """(``accuracy`` or ``macro_f1``, why): ``auto`` picks macro-F1 for imbalanced training labels when every class
    has at least ``MIN_VALIDATION_SUPPORT`` validation examples, accuracy otherwise."""
    if metric != "auto":
        return metric, "given"
    if not is_imbalanced(labels, n_classes):
        return "accuracy", "auto: classes balanced"
    if validation_labels is not None:
        smallest = int(np.bincount(np.asarray(validation_labels, dtype=int), minlength=n_classes).min())
        if smallest < MIN_VALIDATION_SUPPORT:
            return "accuracy", (
                f"auto: classes imbalanced, but the rarest has {smallest} validation examples "
                f"(< {MIN_VALIDATION_SUPPORT}): its F1 is too noisy to select on"
            )
    return "macro_f1", "auto: classes imbalanced"


def score(metric: str, pred: np.ndarray, gold: np.ndarray, n_classes: int) -> float:
    """The named metric (``accuracy`` or ``macro_f1``)."""
    return macro_f1(pred, gold, n_classes) if metric == "macro_f1" else accuracy(pred, gold)


def balanced_class_weights(labels: Sequence[int], n_classes: int) -> list[float]:
    """n / (K x count_c) per class (scikit-learn's "balanced"); a class absent from training gets weight 1."""
    counts = np.bincount(np.asarray(labels), minlength=n_classes).astype(float)
    n = counts.sum()
    return [float(n / (n_classes * c)) if c else 1.0 for c in counts]
