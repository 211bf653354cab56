"""Fine-tuning: LoRA (peft), layered freezing, or full fine-tuning of an encoder classifier, with early stopping."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import TrainConfig, config_to_dict
from .data import Dataset, Split
from .errors import PrepError
from .modeling import (
    ATTENTION_PROJECTIONS,
    count_parameters,
    load_classifier,
    load_tokenizer,
    model_type,
    predict_logits,
    resolve_base_model,
)
from .progress import Progress, Silent, fmt_seconds
from .scoring import balanced_class_weights, resolve_selection_metric, score
from .tokens import auto_max_length, encode, length_grouped_batches, length_summary, token_lengths

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

# peft asks transformers a deprecated question on every model it wraps; the answer is right, the warning is noise
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _num_layers(model) -> int:
    return int(model.config.num_hidden_layers)


def lora_targets_for(cfg: TrainConfig, model) -> list[str]:
    """The configured LoRA targets, or the attention projections of the model's family."""
    if cfg.lora_targets:
        return list(cfg.lora_targets)
    kind = getattr(model.config, "model_type", "bert")
    return list(ATTENTION_PROJECTIONS.get(kind, ATTENTION_PROJECTIONS["bert"]))


def _has_pooler(model) -> bool:
    return any(".pooler." in n for n, _ in model.named_parameters())


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
            p.requires_grad = _layered_trainable(name, cfg)
        return model
    # LoRA (optionally combined with layered freezing: adapters only above the frozen layers)
    from peft import LoraConfig, TaskType, get_peft_model

    targets = lora_targets_for(cfg, model)
    layers = list(range(cfg.freeze_layers, n_layers)) if cfg.freeze_layers else None
    lcfg = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        layers_to_transform=layers,
        modules_to_save=["pooler"] if cfg.train_pooler and _has_pooler(model) else None,
        bias="none",
    )
    try:
        return get_peft_model(model, lcfg)
    except ValueError as e:
        raise PrepError(f"LoRA targets {targets} do not match the model's modules: {e}") from None


def _layered_trainable(name: str, cfg: TrainConfig) -> bool:
    if name.startswith("classifier") or ".pooler." in name:
        return True
    marker = ".layer."
    if marker not in name:
        return False  # embeddings (and MPNet's relative attention bias) stay frozen
    idx = int(name.split(marker, 1)[1].split(".", 1)[0])
    if idx < cfg.freeze_layers:
        return False
    if cfg.layered_tune == "all":
        return True
    return ".attention." in name


def resolve_max_length(cfg: TrainConfig, tokenizer, texts: list[str]) -> tuple[TrainConfig, dict]:
    """``cfg`` with a concrete ``max_length`` (``"auto"`` resolved on ``texts``) and the token-length summary.

    Returns:
        (config with an int ``max_length``, ``length_summary`` of ``texts`` at that length plus how it was chosen).
    """
    lengths = token_lengths(tokenizer, texts)
    model_max = int(min(512, getattr(tokenizer, "model_max_length", 512) or 512))
    if cfg.max_length == "auto":
        chosen = auto_max_length(lengths, cfg.max_length_coverage, model_max)
        how = f"auto: {100 * cfg.max_length_coverage:.0f}% of the training texts fit"
    else:
        chosen, how = int(cfg.max_length), "given"
    summary = {**length_summary(lengths, chosen), "chosen": how, "truncation": cfg.truncation}
    return dataclasses.replace(cfg, max_length=chosen), summary


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
    best_epoch: int | None = None
    selection_metric: str = "accuracy"
    best_validation_score: float | None = None
    stopped_early: bool = False
    train_seconds: float = 0.0
    seconds_to_best: float | None = None
    #: this process's CPU seconds (all threads): unlike wall time, not inflated by a paused or shared machine
    cpu_seconds_to_best: float | None = None
    train_cpu_seconds: float = 0.0


def train(
    cfg: TrainConfig,
    data: Dataset,
    output_dir: Path,
    *,
    progress: bool | Progress = True,
    max_train_seconds: float | None = None,
) -> TrainResult:
    """Fine-tune the classifier and save it (adapter for LoRA, full model otherwise) to ``output_dir``.

    After every epoch the model is scored on the validation split with the selection metric; the best epoch's
    weights are kept, and training stops once ``cfg.patience`` epochs in a row brought no gain over the best score.
    A score within ``cfg.selection_ties`` validation examples of the best is a tie: no gain, but the later epoch is
    kept.

    Args:
        cfg: method and hyper-parameters (``max_length="auto"`` is resolved on the training texts).
        data: splits and label names.
        output_dir: where ``model/`` (or ``adapter/``), ``tokenizer/`` and ``train.json`` are written.
        progress: a ``Progress`` (lines + optional bars), True (lines and bars) or False (silent).
        max_train_seconds: stop after this much training time (equal time shares in the recipe search).

    Returns:
        A ``TrainResult``; ``output_dir`` holds the saved model.
    """
    prog = progress if isinstance(progress, Progress) else (Progress(bars=True) if progress else Silent())
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    base = resolve_base_model(cfg.base_model)
    tokenizer = load_tokenizer(base)
    cfg, lengths_info = resolve_max_length(cfg, tokenizer, data.train.texts)
    max_length = int(cfg.max_length)
    model = prepare_model(cfg, load_classifier(base, data.label_names))
    trainable, total = count_parameters(model)
    n_classes = len(data.label_names)
    metric, metric_reason = resolve_selection_metric(
        cfg.selection_metric, data.train.labels, n_classes, data.validation.labels
    )

    head_names = ("classifier",)
    head_params = [p for n, p in model.named_parameters() if p.requires_grad and any(h in n for h in head_names)]
    body_params = [p for n, p in model.named_parameters() if p.requires_grad and not any(h in n for h in head_names)]
    groups = [{"params": body_params, "lr": cfg.learning_rate}]
    if head_params:
        groups.append({"params": head_params, "lr": cfg.head_learning_rate or cfg.learning_rate})
    optim = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)
    weights = balanced_class_weights(data.train.labels, n_classes) if cfg.class_weights == "balanced" else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32) if weights else None)

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
    best_score: float | None = None
    peak_score: float | None = None
    tie = cfg.selection_ties / max(1, len(data.validation))
    best_acc: float | None = None
    best_epoch: int | None = None
    best_state: dict[str, torch.Tensor] | None = None
    seconds_to_best: float | None = None
    cpu_seconds_to_best: float | None = None
    epoch_walls: list[float] = []
    stale = 0
    started = time.perf_counter()
    cpu_started = time.process_time()
    stop = stopped_early = False
    eta_said = False
    has_val = len(data.validation) > 0
    for epoch in range(cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        batches = length_grouped_batches(lengths, cfg.batch_size, rng)
        bar = prog.bar(batches, total=len(batches), desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}", unit="batch")
        running = 0.0
        done_in_epoch = 0
        for b in bar:
            enc = encode(tokenizer, [train_split.texts[i] for i in b], max_length, cfg.truncation)
            labels = torch.tensor([train_split.labels[i] for i in b])
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            loss = loss_fn(out.logits.float(), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            step += 1
            done_in_epoch += 1
            running = 0.9 * running + 0.1 * loss.item() if step > 1 else loss.item()
            bar.set_postfix(loss=f"{running:.3f}")
            if not eta_said and done_in_epoch == min(10, steps_per_epoch) and epoch == 0:
                eta_said = True
                per_step = (time.perf_counter() - t0) / done_in_epoch
                left = per_step * (total_steps - step)
                prog.line(
                    f"train: {per_step:.2f} s/step measured; ETA <= {fmt_seconds(left)} for the remaining "
                    f"{total_steps - step} steps ({cfg.epochs} epochs at most"
                    + (
                        f"; early stopping after {cfg.patience} epochs without gain usually ends sooner)"
                        if cfg.patience and has_val
                        else ")"
                    )
                )
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
        improved = False
        note = ""
        if has_val:
            logits = predict_logits(model, tokenizer, data.validation.texts, max_length, truncation=cfg.truncation)
            pred, gold = logits.argmax(1), np.array(data.validation.labels)
            rec["validation_accuracy"] = score("accuracy", pred, gold, n_classes)
            rec["validation_macro_f1"] = score("macro_f1", pred, gold, n_classes)
            current = rec[f"validation_{metric}"]
            # a score within `tie` of the peak is a tie and goes to the later epoch (trained further down the decay)
            # Only a gain over the peak resets patience; a tie (within `tie` of the peak) is no gain, but the kept
            # epoch moves to it: it has trained further down the decaying learning rate.
            gain = peak_score is None or current > peak_score
            tied = not gain and cfg.selection_ties > 0 and current >= peak_score - tie - 1e-9
            if gain or tied:
                improved = True
                note = " (a tie with the best: kept, as the later epoch)" if tied else ""
                peak_score = current if peak_score is None else max(peak_score, current)
                best_score, best_acc, best_epoch = current, rec["validation_accuracy"], epoch + 1
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                seconds_to_best = time.perf_counter() - started
                cpu_seconds_to_best = time.process_time() - cpu_started
            stale = 0 if gain else stale + 1
        rec["seconds_total"] = time.perf_counter() - started
        rec["cpu_seconds_total"] = time.process_time() - cpu_started
        epoch_walls.append(time.perf_counter() - t0)
        history.append(rec)
        left_epochs = cfg.epochs - epoch - 1
        if cfg.patience and has_val and stale >= cfg.patience and left_epochs > 0 and not stop:
            stop = stopped_early = True
        val = (
            f", validation accuracy {rec['validation_accuracy']:.4f}, macro-F1 {rec['validation_macro_f1']:.4f}"
            + ((note or " (best so far)") if improved else f" (best: epoch {best_epoch})")
            if has_val
            else ""
        )
        if stopped_early:
            tail = f"; stopping early: no {metric} gain for {cfg.patience} epochs, keeping epoch {best_epoch}"
        elif left_epochs > 0 and not stop:
            # the median epoch: one epoch stretched by a paused (SIGSTOP) or crowded machine does not set the ETA
            per_epoch = sorted(epoch_walls)[(len(epoch_walls) - 1) // 2]
            tail = f"; ETA <= {fmt_seconds(left_epochs * per_epoch)} for {left_epochs} more"
        else:
            tail = ""
        prog.line(f"train epoch {epoch + 1}/{cfg.epochs}: loss {running:.3f}{val}, {fmt_seconds(elapsed)}{tail}")
        if stop:
            break
    train_seconds = time.perf_counter() - started
    train_cpu_seconds = time.process_time() - cpu_started
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
        best_epoch=best_epoch,
        selection_metric=metric,
        best_validation_score=best_score,
        stopped_early=stopped_early,
        train_seconds=train_seconds,
        seconds_to_best=seconds_to_best,
        cpu_seconds_to_best=cpu_seconds_to_best,
        train_cpu_seconds=train_cpu_seconds,
    )
    (output_dir / "train.json").write_text(
        json.dumps(
            {
                "config": config_to_dict(cfg),
                "base_model": str(base),
                "base_model_type": model_type(base),
                "labels": data.label_names,
                "data_hash": data.data_hash,
                "trainable_parameters": trainable,
                "total_parameters": total,
                "trainable_fraction": trainable / total,
                "epoch_seconds": epoch_seconds,
                "steps": step,
                "best_validation_accuracy": best_acc,
                "best_epoch": best_epoch,
                "selection_metric": metric,
                "selection_reason": metric_reason,
                "best_validation_score": best_score,
                "stopped_early": stopped_early,
                "train_seconds": train_seconds,
                "seconds_to_best": seconds_to_best,
                "cpu_seconds_to_best": cpu_seconds_to_best,
                "train_cpu_seconds": train_cpu_seconds,
                "class_weights": weights,
                "token_lengths": lengths_info,
                "history": history,
            },
            indent=2,
        )
    )
    return result
