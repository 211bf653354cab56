"""LoRA fine-tuning of the causal LM and its evaluation (answer perplexity and exact-answer accuracy).

LoRA uses the reference text's settings (r=16, alpha=32, dropout 0.1) on the attention projections
(``q_proj, k_proj, v_proj, o_proj``); the loss covers the assistant reply only (prompt tokens are masked with
-100), and the adapter is merged afterwards (``merge_and_unload``), so the served model has no extra latency.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .data import Example, chat_prompt_ids
from .kvmodel import KVCacheLM, greedy_decode, torch_step

IGNORE_INDEX = -100


@dataclass
class LoraRecipe:
    """LoRA hyper-parameters (validated).

    Attributes:
        r: Rank of the update.
        alpha: Scaling numerator (update scaled by alpha / r).
        dropout: Dropout on the adapter input.
        targets: Module names that get an adapter.
        steps: Optimizer steps.
        batch_size: Examples per step.
        learning_rate: AdamW learning rate.
        seed: Seed of initialization and batch order.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.1
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    steps: int = 120
    batch_size: int = 8
    learning_rate: float = 1e-3
    seed: int = 13

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1:
            raise ValueError(f"LoRA r and alpha must be >= 1, got r={self.r} alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.steps < 0 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError(f"bad schedule: steps={self.steps} batch_size={self.batch_size} lr={self.learning_rate}")
        if not self.targets:
            raise ValueError("LoRA needs at least one target module")


@dataclass
class TrainResult:
    """What training did.

    Attributes:
        trainable_parameters: Adapter parameters.
        total_parameters: All parameters of the adapted model.
        seconds: Wall-clock training time.
        losses: Mean loss of each tenth of the steps.
    """

    trainable_parameters: int
    total_parameters: int
    seconds: float
    losses: list[float]


def encode_example(tokenizer: Any, example: Example, eos_token: str) -> tuple[list[int], list[int]]:
    """Input ids and labels of one example (labels are -100 over the prompt)."""
    prompt = chat_prompt_ids(tokenizer, example.prompt)
    answer = tokenizer(example.answer + eos_token, add_special_tokens=False)["input_ids"]
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + list(answer)


def _collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, (x, y) in enumerate(rows):  # right padding for training (no cache involved)
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_lora(model: Any, tokenizer: Any, train: Sequence[Example], recipe: LoraRecipe) -> tuple[Any, TrainResult]:
    """Train a LoRA adapter and return the merged model.

    Args:
        model: A ``LlamaForCausalLM`` (changed in place by merging; pass a copy to keep the base).
        tokenizer: Its tokenizer.
        train: Training examples.
        recipe: Hyper-parameters.

    Returns:
        ``(merged_model, result)``: a plain ``LlamaForCausalLM`` in eval mode with the update folded in.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(recipe.seed)
    config = LoraConfig(
        r=recipe.r,
        lora_alpha=recipe.alpha,
        lora_dropout=recipe.dropout,
        target_modules=list(recipe.targets),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    eos = tokenizer.eos_token or ""
    rows = [encode_example(tokenizer, e, eos) for e in train]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=recipe.learning_rate)
    warmup = max(1, recipe.steps // 10)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, recipe.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    rng = random.Random(recipe.seed)
    order: list[int] = []
    losses: list[float] = []
    window: list[float] = []
    peft_model.train()
    started = time.perf_counter()
    for _ in range(recipe.steps):
        if len(order) < recipe.batch_size:
            fresh = list(range(len(rows)))
            rng.shuffle(fresh)
            order.extend(fresh)
        batch = _collate([rows[order.pop()] for _ in range(recipe.batch_size)], pad_id)
        loss = peft_model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peft_model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss.item())
        if len(window) >= max(1, recipe.steps // 10):
            losses.append(sum(window) / len(window))
            window = []
    if window:
        losses.append(sum(window) / len(window))
    seconds = time.perf_counter() - started
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged, TrainResult(trainable, total, seconds, losses)


@dataclass
class AnswerScores:
    """Teacher-forced scores of the expected replies.

    Attributes:
        perplexity: ``exp(mean negative log-likelihood per reply token)``.
        greedy_exact: Share of examples whose reply greedy decoding reproduces token for token. Exact, from the
            same single pass: greedy decoding yields the reference reply (end token included) if and only if every
            reply position's most probable token, given the reference prefix, is the reference token.
    """

    perplexity: float
    greedy_exact: float


def answer_scores(model: Any, tokenizer: Any, examples: Sequence[Example], batch_size: int = 8) -> AnswerScores:
    """Perplexity and greedy exact-match accuracy of the expected replies, in one teacher-forced pass per batch.

    Args:
        model: A ``LlamaForCausalLM``.
        tokenizer: Its tokenizer.
        examples: Held-out examples.
        batch_size: Examples per forward pass.

    Returns:
        The scores.
    """
    eos = tokenizer.eos_token or ""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total_nll, total_tokens, exact = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            rows = [encode_example(tokenizer, e, eos) for e in examples[start : start + batch_size]]
            batch = _collate(rows, pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            logp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
            picked = labels.clamp(min=0).unsqueeze(-1)
            nll = -logp.gather(-1, picked).squeeze(-1)
            keep = labels != IGNORE_INDEX
            total_nll += float(nll[keep].sum())
            total_tokens += int(keep.sum())
            hits = (logp.argmax(-1) == labels) | ~keep
            exact += int(hits.all(dim=1).sum())
    return AnswerScores(math.exp(total_nll / max(1, total_tokens)), exact / max(1, len(examples)))


def answer_perplexity(model: Any, tokenizer: Any, examples: Sequence[Example], batch_size: int = 8) -> float:
    """Perplexity of the expected replies given the prompts (see :func:`answer_scores`)."""
    return answer_scores(model, tokenizer, examples, batch_size).perplexity


@dataclass
class AccuracyResult:
    """Greedy answers scored against the expected sentence.

    Attributes:
        exact: Share of replies equal to the expected sentence (whitespace-trimmed).
        samples: A few ``(question, expected, got)`` triples for the report.
    """

    exact: float
    samples: list[tuple[str, str, str]]


def answer_accuracy(
    model: Any, tokenizer: Any, examples: Sequence[Example], max_new_tokens: int = 24, keep_samples: int = 3
) -> AccuracyResult:
    """Exact-answer accuracy of greedy decoding (with the KV cache) on held-out examples."""
    module = KVCacheLM(model).eval()
    step = torch_step(module)
    eos_id = tokenizer.eos_token_id
    hits = 0
    samples: list[tuple[str, str, str]] = []
    for example in examples:
        prompt = chat_prompt_ids(tokenizer, example.prompt)
        ids = greedy_decode(step, module.empty_past, prompt, max_new_tokens, eos_token_id=eos_id)
        got = tokenizer.decode(ids, skip_special_tokens=True).strip()
        hits += int(got == example.answer)
        if len(samples) < keep_samples:
            samples.append((example.question, example.answer, got))
    return AccuracyResult(hits / max(1, len(examples)), samples)
