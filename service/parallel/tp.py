"""Tensor parallelism (Megatron-style) over a gloo group: every rank holds a slice of every layer.

Inside each decoder layer, q/k/v and gate/up are column-parallel (a rank computes only its heads' and its MLP
columns' outputs from the replicated input, with no communication) and o/down are row-parallel (a rank multiplies
its slice of the inner dimension and the partial sums are all-reduced). That is two all-reduces of a
``[batch, tokens, hidden]`` tensor per layer: one after attention, one after the MLP. The embedding, final norm and
head are replicated, so every rank ends with the full logits; rank 0 picks each greedy token and broadcasts it, so
the ranks can never diverge on a tie.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from service.parallel.llama import LlamaShard, LlamaSpec, Shard, WeightSource, load_shard


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the group in place (Megatron's ``g`` operator in the forward pass)."""
    dist.all_reduce(t)
    return t


def build_tensor_parallel(
    spec: LlamaSpec, source: WeightSource, rank: int, world: int, dtype: torch.dtype = torch.float32
) -> LlamaShard:
    """This rank's slice of the model, wired to all-reduce over the default process group."""
    shard = Shard.tensor_parallel(spec, rank, world)
    return load_shard(spec, shard, source, reduce=all_reduce_sum if world > 1 else None, dtype=dtype)


@torch.no_grad()
def tp_greedy_generate(
    model: LlamaShard,
    ids: torch.Tensor,
    new_tokens: int,
    use_cache: bool = True,
    timings: dict[str, float] | None = None,
) -> torch.Tensor:
    """Greedy decoding on a tensor-parallel model; every rank returns the same ``[batch, new_tokens]`` ids.

    Args:
        model: this rank's shard (a whole model when not split).
        ids: the prompt ``[batch, tokens]``, identical on every rank.
        new_tokens: tokens to generate.
        use_cache: keep a KV cache (else recompute the whole sequence every step).
        timings: if given, receives ``perf_counter`` stamps ``prefill_end`` (first token chosen) and ``end`` (and ``*_cpu``: this process's CPU time, ``process_time``).
    """
    split = model.shard.tp_world > 1  # an unsplit model in a group (data parallel) decides alone

    def pick(logits: torch.Tensor) -> torch.Tensor:
        nxt = logits[:, -1].argmax(-1, keepdim=True).contiguous()
        if split:
            dist.broadcast(nxt, src=0)
        return nxt

    out: list[torch.Tensor] = []
    if use_cache:
        cache = model.new_cache(ids.shape[0], ids.shape[1] + new_tokens)
        nxt = pick(model(ids, 0, cache))
        out.append(nxt)
        if timings is not None:
            timings["prefill_end"], timings["prefill_end_cpu"] = time.perf_counter(), time.process_time()
        while len(out) < new_tokens:
            nxt = pick(model(nxt, cache.length, cache))
            out.append(nxt)
    else:
        seq = ids
        while len(out) < new_tokens:
            nxt = pick(model(seq))
            out.append(nxt)
            if timings is not None and len(out) == 1:
                timings["prefill_end"], timings["prefill_end_cpu"] = time.perf_counter(), time.process_time()
            seq = torch.cat([seq, nxt], dim=1)
    if timings is not None:
        timings["end"], timings["end_cpu"] = time.perf_counter(), time.process_time()
    return torch.cat(out, dim=1)
