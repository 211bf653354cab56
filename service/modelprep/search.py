"""A small search over fine-tuning recipes (which layers to freeze, LoRA rank and targets) under a time budget.

Each candidate trains for an equal share of the budget on the same data and is scored on the validation split;
the best recipe (ties: the cheaper one) is returned with what every candidate cost. This replaces choosing the
layers to tune by hand, the "next step" our reference text names.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import TrainConfig, check, config_to_dict
from .data import Dataset


def default_candidates(base: TrainConfig) -> tuple[TrainConfig, ...]:
    """LoRA ranks and targets, LoRA above frozen layers, and layered freezing at two depths."""
    common = {
        "batch_size": base.batch_size,
        "max_length": base.max_length,
        "seed": base.seed,
        "base_model": base.base_model,
        "epochs": base.epochs,
    }
    return (
        TrainConfig.lora(lora_r=8, **common),
        TrainConfig.lora(lora_r=16, **common),
        TrainConfig.lora(lora_r=16, lora_targets=("query", "key", "value", "attention.output.dense"), **common),
        TrainConfig.lora(lora_r=16, train_pooler=False, **common),
        TrainConfig.lora(lora_r=16, freeze_layers=2, **common),
        TrainConfig.layered(freeze_layers=2, **common),
        TrainConfig.layered(freeze_layers=4, **common),
    )


@dataclass
class SearchConfig:
    """Attributes:
    budget_seconds: total training time shared equally by the candidates.
    candidates: recipes to try; empty = ``default_candidates(TrainConfig())``.
    """

    budget_seconds: float = 600.0
    candidates: tuple[TrainConfig, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        check(self.budget_seconds > 0, f"budget_seconds must be > 0, got {self.budget_seconds}")
        self.candidates = tuple(self.candidates) or default_candidates(TrainConfig())


def describe(c: TrainConfig) -> str:
    """A one-line name of a recipe."""
    if c.method == "lora":
        s = f"lora r={c.lora_r} on {'+'.join(c.lora_targets) or 'the attention projections'}"
        s += " +pooler" if c.train_pooler else " (pooler frozen)"
        if c.freeze_layers:
            s += f", layers >= {c.freeze_layers}"
        return s
    if c.method == "layered":
        return f"layered: freeze {c.freeze_layers}, tune upper {c.layered_tune}"
    return "full fine-tuning"


def search_recipes(cfg: SearchConfig, data: Dataset, output: Path | None = None, *, progress: bool = True) -> dict:
    """Train every candidate for ``budget_seconds / len(candidates)`` and rank them on validation accuracy.

    Returns:
        ``{"best": {...}, "candidates": [...], "budget_seconds": ...}``; written to ``output`` as JSON if given.
    """
    from .finetune import train

    share = cfg.budget_seconds / len(cfg.candidates)
    results = []
    for c in cfg.candidates:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = train(replace(c), data, Path(tmp), progress=progress, max_train_seconds=share)
            wall = time.perf_counter() - t0
        results.append(
            {
                "recipe": describe(c),
                "config": config_to_dict(c),
                "validation_accuracy": res.best_validation_accuracy,
                "trainable_parameters": res.trainable_parameters,
                "trainable_fraction": res.trainable_parameters / res.total_parameters,
                "steps": res.steps,
                "seconds": wall,
                "seconds_per_epoch": res.epoch_seconds[0] if res.epoch_seconds else None,
            }
        )
    ranked = sorted(results, key=lambda r: (-(r["validation_accuracy"] or 0.0), r["seconds"]))
    out = {
        "budget_seconds": cfg.budget_seconds,
        "seconds_per_candidate": share,
        "best": ranked[0],
        "candidates": ranked,
    }
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(out, indent=2, default=str))
    return out
