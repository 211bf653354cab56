"""Merge LoRA adapters into the base weights, so serving runs one dense model with no adapter overhead."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from .errors import PrepError
from .modeling import load_classifier, load_tokenizer, predict_logits, resolve_base_model


def is_adapter(model_dir: Path) -> bool:
    """True when ``model_dir`` holds a peft adapter rather than a full model."""
    return (Path(model_dir) / "adapter_config.json").is_file()


def load_trained(train_dir: Path):
    """Load what ``train`` saved: (model, tokenizer, labels, max_length, truncation). LoRA comes back un-merged."""
    train_dir = Path(train_dir)
    meta_path = train_dir / "train.json"
    if not meta_path.is_file():
        raise PrepError(f"{train_dir} is not a training output (no train.json)")
    meta = json.loads(meta_path.read_text())
    labels = meta["labels"]
    tokenizer = load_tokenizer(train_dir / "tokenizer")
    model_dir = train_dir / "model"
    if is_adapter(model_dir):
        from peft import PeftModel

        base = resolve_base_model(meta.get("base_model"))
        model = PeftModel.from_pretrained(load_classifier(base, labels), str(model_dir))
    else:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), local_files_only=True)
    model.eval()
    return model, tokenizer, labels, int(meta["config"]["max_length"]), meta["config"].get("truncation", "head")


def merge_adapter(train_dir: Path, output_dir: Path, parity_texts: list[str] | None = None) -> Path:
    """Fold the adapter into the weights (``merge_and_unload``) and save a plain model + tokenizer.

    A full or layered fine-tune has nothing to merge and is copied as is.

    Args:
        train_dir: a training output directory.
        output_dir: where the merged ``model/`` and ``tokenizer/`` are written (with ``merge.json``).
        parity_texts: texts on which the merged model's logits are compared with the adapter model's.

    Returns:
        ``output_dir``.
    """
    train_dir, output_dir = Path(train_dir), Path(output_dir)
    model, tokenizer, labels, max_length, truncation = load_trained(train_dir)
    parity: float | None = None
    if hasattr(model, "merge_and_unload"):
        before = (
            predict_logits(model, tokenizer, parity_texts, max_length, truncation=truncation) if parity_texts else None
        )
        merged = model.merge_and_unload()
        merged.eval()
        if before is not None:
            after = predict_logits(merged, tokenizer, parity_texts, max_length, truncation=truncation)
            parity = float(np.abs(after - before).max())
    else:
        merged = model
    if output_dir.exists():
        shutil.rmtree(output_dir)
    merged.save_pretrained(str(output_dir / "model"))
    tokenizer.save_pretrained(str(output_dir / "tokenizer"))
    meta = json.loads((train_dir / "train.json").read_text())
    (output_dir / "merge.json").write_text(
        json.dumps(
            {
                "source": str(train_dir),
                "merged": parity is not None,
                "max_abs_logit_diff_vs_adapter": parity,
                "labels": labels,
                "max_length": max_length,
                "truncation": truncation,
                "data_hash": meta.get("data_hash"),
                "train_config": meta.get("config"),
            },
            indent=2,
        )
    )
    return output_dir
