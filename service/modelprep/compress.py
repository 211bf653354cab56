"""Model compression: structured FFN pruning, unstructured magnitude pruning, distillation into fewer layers.

Every function takes a config and writes a plain Hugging Face model directory (``model/`` + ``tokenizer/`` +
``merge.json``, the layout of a merged model), so the result exports, quantizes and publishes exactly like the
merged LoRA model.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf
from tqdm.auto import tqdm

from .config import DistillConfig, MagnitudePruneConfig, PruneConfig, config_to_dict
from .data import Dataset
from .errors import PrepError
from .modeling import load_merged, predict_logits
from .tokens import encode, length_grouped_batches


def _save(model, tokenizer, out: Path, meta: dict, source_meta: dict) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out / "model"))
    tokenizer.save_pretrained(str(out / "tokenizer"))
    merged = {
        "labels": source_meta["labels"],
        "max_length": source_meta["max_length"],
        "truncation": source_meta.get("truncation", "head"),
        "data_hash": source_meta.get("data_hash"),
        "merged": False,
        "max_abs_logit_diff_vs_adapter": None,
        **meta,
    }
    (out / "merge.json").write_text(json.dumps(merged, indent=2, default=str))
    return out


def _soft_loss(student_logits, teacher_logits, labels, has_label, temperature: float, alpha: float):
    """alpha * KL(teacher || student) at temperature T (scaled by T^2) + (1 - alpha) * label cross-entropy.

    Rows without a label (perturbed copies) take the distillation term for their whole weight.
    """
    t = temperature
    kd = nnf.kl_div(nnf.log_softmax(student_logits / t, -1), nnf.softmax(teacher_logits / t, -1), reduction="none").sum(
        -1
    ) * (t * t)
    ce = nnf.cross_entropy(student_logits, labels, reduction="none")
    return (alpha * kd + (1 - alpha) * torch.where(has_label, ce, kd)).mean()


def layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Pairs (student hidden state, teacher hidden state) matched by the hidden-state loss.

    Index 0 is the embedding output; student layer j's output is matched with the teacher's output at the same
    relative depth (uniform mapping, as in TinyBERT), so the last layers always meet.
    """
    return [(0, 0)] + [(j, round(j * teacher_layers / student_layers)) for j in range(1, student_layers + 1)]


def _hidden_loss(student_hidden, teacher_hidden, attention_mask, pairs: list[tuple[int, int]]):
    """Mean squared error between matched hidden states over the real (unpadded) tokens, summed over the pairs."""
    mask = attention_mask.unsqueeze(-1).to(student_hidden[0].dtype)
    denom = mask.sum() * student_hidden[0].shape[-1]
    return sum((((student_hidden[i] - teacher_hidden[j]) ** 2) * mask).sum() / denom for i, j in pairs)


def perturb(text: str, vocabulary: list[str], rng: random.Random, drop: float = 0.1, replace: float = 0.15) -> str:
    """A perturbed copy of ``text`` for distillation: each word dropped with probability ``drop`` or replaced by a
    random training word with probability ``replace``. The teacher labels it; the label of the original is not used.
    """
    out = []
    for word in text.split():
        r = rng.random()
        if r < drop:
            continue
        out.append(rng.choice(vocabulary) if r < drop + replace else word)
    return " ".join(out) or text


def _distill_loop(
    student,
    teacher,
    tokenizer,
    data: Dataset,
    max_length: int,
    *,
    epochs: int,
    lr: float,
    temperature: float,
    alpha: float,
    batch_size: int,
    seed: int,
    max_steps: int | None,
    desc: str,
    masks: dict | None = None,
    progress: bool = True,
    hidden_weight: float = 0.0,
    augment_copies: int = 0,
) -> list[dict]:
    """Train ``student`` on teacher logits + labels; keeps the best validation checkpoint.

    With ``hidden_weight`` > 0 the student's embedding and layer outputs are also pulled towards the teacher's
    (``layer_map``); with ``augment_copies`` > 0 every epoch adds that many perturbed copies of each training text,
    learnt from the teacher's logits only.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    n_rows = len(data.train) * (1 + augment_copies)
    steps_per_epoch = math.ceil(n_rows / batch_size)
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    warm = max(1, int(0.06 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm))
    )
    teacher.eval()
    pairs = layer_map(student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    want_hidden = hidden_weight > 0
    vocabulary = sorted({w for t in data.train.texts for w in t.split()}) if augment_copies else []
    history, best, best_state, step = [], None, None, 0
    for epoch in range(epochs):
        student.train()
        t0 = time.perf_counter()
        texts, labels = list(data.train.texts), list(data.train.labels)
        for _ in range(augment_copies):
            texts += [perturb(t, vocabulary, rng) for t in data.train.texts]
            labels += [-1] * len(data.train)
        bar = tqdm(
            length_grouped_batches([len(t) for t in texts], batch_size, rng),
            desc=f"{desc} {epoch + 1}/{epochs}",
            unit="batch",
            disable=not progress,
        )
        for b in bar:
            enc = encode(tokenizer, [texts[i] for i in b], max_length)
            y = torch.tensor([labels[i] for i in b])
            has_label = y >= 0
            with torch.no_grad():
                t_out = teacher(
                    input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=want_hidden
                )
            s_out = student(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=want_hidden
            )
            loss = _soft_loss(s_out.logits, t_out.logits, y.clamp(min=0), has_label, temperature, alpha)
            if want_hidden:
                loss = loss + hidden_weight * _hidden_loss(
                    s_out.hidden_states, t_out.hidden_states, enc["attention_mask"], pairs
                )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if masks:
                _apply_masks(student, masks)
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if max_steps is not None and step >= max_steps:
                break
        bar.close()
        rec = {"epoch": epoch + 1, "seconds": time.perf_counter() - t0}
        if len(data.validation):
            logits = predict_logits(student, tokenizer, data.validation.texts, max_length)
            acc = float((logits.argmax(1) == np.array(data.validation.labels)).mean())
            rec["validation_accuracy"] = acc
            if best is None or acc > best:
                best, best_state = acc, copy.deepcopy(student.state_dict())
        history.append(rec)
        if not progress:  # --quiet: no bars, but every epoch still says where it is
            acc_txt = f", validation accuracy {rec['validation_accuracy']:.4f}" if "validation_accuracy" in rec else ""
            print(f"[modelprep] {desc} epoch {epoch + 1}/{epochs}: {rec['seconds']:.0f} s{acc_txt}", flush=True)
        if max_steps is not None and step >= max_steps:
            break
    if best_state is not None:
        student.load_state_dict(best_state)
    return history


def ffn_neuron_scores(
    model, tokenizer, texts: list[str], max_length: int, batches: int, batch_size: int = 32
) -> list[torch.Tensor]:
    """Importance of every FFN neuron per layer: mean |activation| on sample texts x norm of its outgoing weights."""
    layers = model.base_model.encoder.layer
    sums = [torch.zeros(layer.intermediate.dense.out_features) for layer in layers]
    counts = [0]
    hooks = []

    def make_hook(i):
        def hook(_mod, _inp, out):
            # out: [batch, seq, intermediate] after the activation; padding rows add ~constant noise only
            sums[i].add_(out.detach().abs().sum(dim=(0, 1)))
            if i == 0:
                counts[0] += out.shape[0] * out.shape[1]

        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.intermediate.register_forward_hook(make_hook(i)))
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, min(len(texts), batches * batch_size), batch_size):
                enc = encode(tokenizer, texts[s : s + batch_size], max_length)
                model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        for h in hooks:
            h.remove()
    scores = []
    for i, layer in enumerate(layers):
        out_norm = layer.output.dense.weight.detach().norm(dim=0)  # [intermediate]
        scores.append(sums[i] / max(1, counts[0]) * out_norm)
    return scores


def prune_ffn(model, keep: int, scores: list[torch.Tensor]):
    """Keep the ``keep`` most important FFN neurons of every layer; returns the (modified) model."""
    from transformers.pytorch_utils import prune_linear_layer

    for layer, s in zip(model.base_model.encoder.layer, scores, strict=False):
        idx = torch.argsort(s, descending=True)[:keep].sort().values
        layer.intermediate.dense = prune_linear_layer(layer.intermediate.dense, idx, dim=0)
        layer.output.dense = prune_linear_layer(layer.output.dense, idx, dim=1)
    model.config.intermediate_size = keep
    return model


def structured_prune(
    cfg: PruneConfig, source_dir: Path, data: Dataset, output_dir: Path, *, progress: bool = True
) -> Path:
    """Prune FFN neurons of the model in ``source_dir`` (a merged/distilled model dir), then recover.

    Returns:
        ``output_dir`` (a model directory like the merged one, with a smaller ``intermediate_size``).
    """
    teacher, tokenizer = load_merged(source_dir)
    src_meta = json.loads((Path(source_dir) / "merge.json").read_text())
    max_length = int(src_meta["max_length"])
    student = copy.deepcopy(teacher)
    before = sum(p.numel() for p in student.parameters())
    inter = student.config.intermediate_size
    keep = max(1, round(inter * cfg.ffn_keep_fraction))
    scores = ffn_neuron_scores(student, tokenizer, data.train.texts, max_length, cfg.score_batches)
    prune_ffn(student, keep, scores)
    after = sum(p.numel() for p in student.parameters())
    history = []
    if cfg.recovery_epochs:
        history = _distill_loop(
            student,
            teacher,
            tokenizer,
            data,
            max_length,
            epochs=cfg.recovery_epochs,
            lr=cfg.learning_rate,
            temperature=cfg.temperature,
            alpha=cfg.alpha,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            max_steps=None,
            desc="prune recovery",
            progress=progress,
            hidden_weight=cfg.hidden_weight,
            augment_copies=cfg.augment_copies,
        )
    return _save(
        student,
        tokenizer,
        output_dir,
        {
            "compression": "structured_ffn_prune",
            "config": config_to_dict(cfg),
            "source": str(source_dir),
            "intermediate_size": [inter, keep],
            "parameters": [before, after],
            "removed_fraction": 1 - after / before,
            "history": history,
        },
        src_meta,
    )


def make_student(teacher, layers: tuple[int, ...]):
    """A copy of the teacher that keeps only the given encoder layers (weights copied, not re-initialized)."""
    n = teacher.config.num_hidden_layers
    if max(layers) >= n:
        raise PrepError(f"student_layers {layers} name a layer beyond the teacher's {n}")
    student = copy.deepcopy(teacher)
    student.base_model.encoder.layer = torch.nn.ModuleList(
        [copy.deepcopy(teacher.base_model.encoder.layer[i]) for i in layers]
    )
    student.config.num_hidden_layers = len(layers)
    return student


def distill(cfg: DistillConfig, teacher_dir: Path, data: Dataset, output_dir: Path, *, progress: bool = True) -> Path:
    """Distil the fine-tuned model into a student with ``cfg.student_layers`` of its layers.

    Returns:
        ``output_dir`` (a model directory like the merged one).
    """
    teacher, tokenizer = load_merged(teacher_dir)
    src_meta = json.loads((Path(teacher_dir) / "merge.json").read_text())
    max_length = int(src_meta["max_length"])
    student = make_student(teacher, cfg.student_layers)
    history = _distill_loop(
        student,
        teacher,
        tokenizer,
        data,
        max_length,
        epochs=cfg.epochs,
        lr=cfg.learning_rate,
        temperature=cfg.temperature,
        alpha=cfg.alpha,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        max_steps=cfg.max_steps,
        desc="distill",
        progress=progress,
        hidden_weight=cfg.hidden_weight,
        augment_copies=cfg.augment_copies,
    )
    return _save(
        student,
        tokenizer,
        output_dir,
        {
            "compression": "distillation",
            "config": config_to_dict(cfg),
            "source": str(teacher_dir),
            "parameters": [sum(p.numel() for p in teacher.parameters()), sum(p.numel() for p in student.parameters())],
            "history": history,
        },
        src_meta,
    )


def _prunable(model) -> dict[str, torch.nn.Parameter]:
    return {
        n: p for n, p in model.named_parameters() if ".encoder.layer." in n and n.endswith("weight") and p.dim() == 2
    }


def _apply_masks(model, masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                p.mul_(masks[n])


def global_magnitude_masks(model, sparsity: float) -> dict[str, torch.Tensor]:
    """Masks that zero the ``sparsity`` share of smallest-magnitude encoder Linear weights (one global threshold)."""
    params = _prunable(model)
    flat = torch.cat([p.detach().abs().flatten() for p in params.values()])
    k = int(sparsity * flat.numel())
    if k == 0:
        return {n: torch.ones_like(p) for n, p in params.items()}
    threshold = torch.kthvalue(flat, k).values
    return {n: (p.detach().abs() > threshold).to(p.dtype) for n, p in params.items()}


def sparsity_of(model) -> float:
    """Share of exactly-zero weights among the encoder's Linear weights."""
    params = _prunable(model)
    zeros = sum(int((p == 0).sum()) for p in params.values())
    return zeros / max(1, sum(p.numel() for p in params.values()))


def magnitude_prune(
    cfg: MagnitudePruneConfig, source_dir: Path, data: Dataset, output_dir: Path, *, progress: bool = True
) -> Path:
    """Iterative global magnitude pruning with recovery (distilling from the unpruned model) between rounds.

    Dense kernels (ONNX Runtime's MatMul on CPU) do not skip zeros, so this shrinks nothing and speeds nothing up
    by itself; it shows how much sparsity the model tolerates, and the zeros compress well on disk.
    """
    teacher, tokenizer = load_merged(source_dir)
    src_meta = json.loads((Path(source_dir) / "merge.json").read_text())
    max_length = int(src_meta["max_length"])
    student = copy.deepcopy(teacher)
    rounds = []
    for r in range(1, cfg.steps + 1):
        s = cfg.target_sparsity * (1 - (1 - r / cfg.steps) ** 3)  # cubic schedule: prune fast first, then gently
        masks = global_magnitude_masks(student, s)
        _apply_masks(student, masks)
        hist = _distill_loop(
            student,
            teacher,
            tokenizer,
            data,
            max_length,
            epochs=1,
            lr=cfg.learning_rate,
            temperature=2.0,
            alpha=0.5,
            batch_size=cfg.batch_size,
            seed=cfg.seed + r,
            max_steps=cfg.recovery_steps_per_round,
            desc=f"magnitude round {r}/{cfg.steps}",
            masks=masks,
            progress=progress,
        )
        rounds.append({"round": r, "target": s, "sparsity": sparsity_of(student), "history": hist})
    return _save(
        student,
        tokenizer,
        output_dir,
        {
            "compression": "magnitude_prune",
            "config": config_to_dict(cfg),
            "source": str(source_dir),
            "sparsity": sparsity_of(student),
            "rounds": rounds,
        },
        src_meta,
    )
