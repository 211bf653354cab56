"""Rank programs that run the split model and return what the parity checks compare.

They live in the package (not in the tests) because spawned processes import them by name; the tests, the
benchmark and ``python -m service.parallel check`` all use them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from service.parallel.llama import LlamaShard, LlamaSpec, WeightSource
from service.parallel.pp import build_pipeline_stage, pipeline_forward, pipeline_greedy_generate
from service.parallel.tp import build_tensor_parallel, tp_greedy_generate


@dataclass(frozen=True)
class ParityCase:
    """One model and input to run split: ``weights`` is a state dict or a ``.safetensors`` path."""

    name: str
    spec: LlamaSpec
    weights: dict[str, torch.Tensor] | str
    ids: torch.Tensor
    new_tokens: int
    micro_batches: tuple[int, ...] = (1, 2)
    check_no_cache: bool = True  # TP greedy also without the cache (recomputes the sequence every step)


def weight_source(weights: dict[str, torch.Tensor] | str) -> WeightSource:
    if isinstance(weights, str):
        return WeightSource.from_safetensors(weights)
    return WeightSource.from_state_dict(weights)


def _param_bytes(model: LlamaShard) -> int:
    return model.parameter_bytes()


def parity_worker(rank: int, world: int, cases: list[ParityCase]) -> dict[str, dict[str, object]]:
    """For each case: TP logits and greedy tokens (with and without cache), then PP for each micro-batch count.

    Logits and tokens are returned by the rank that has them (TP: rank 0; PP: the last rank), ``None`` elsewhere.
    """
    results: dict[str, dict[str, object]] = {}
    for case in cases:
        source = weight_source(case.weights)
        out: dict[str, object] = {}
        tp = build_tensor_parallel(case.spec, source, rank, world)
        with torch.no_grad():
            logits = tp(case.ids)
        tokens = tp_greedy_generate(tp, case.ids, case.new_tokens)
        tokens_no_cache = (
            tp_greedy_generate(tp, case.ids, case.new_tokens, use_cache=False) if case.check_no_cache else None
        )
        out["tp"] = {
            "logits": logits if rank == 0 else None,
            "tokens": tokens,
            "tokens_no_cache": tokens_no_cache,
            "param_bytes": _param_bytes(tp),
            "kv_groups": tp.shard.kv_groups,
            "ffn": tp.shard.ffn,
        }
        del tp
        stage = build_pipeline_stage(case.spec, source, rank, world)
        for m in case.micro_batches:
            logits = pipeline_forward(stage, case.ids, m)
            tokens = pipeline_greedy_generate(stage, case.ids, case.new_tokens, m)
            out[f"pp_m{m}"] = {
                "logits": logits,
                "tokens": tokens,
                "param_bytes": _param_bytes(stage),
                "layers": stage.shard.layers,
            }
        results[case.name] = out
    return results
