"""Pipeline parallelism over a gloo group: each rank holds a contiguous range of layers (a stage).

Activations ``[micro_batch, tokens, hidden]`` flow rank r -> r+1 with point-to-point sends. A batch is cut into
micro-batches so the stages work on different micro-batches at the same time (GPipe's fill and drain: with M
micro-batches on S stages, each stage idles for S-1 of the M+S-1 slots, the "bubble").

Greedy decoding keeps a KV cache per stage and per micro-batch. The last stage turns logits into the next token
and sends it back to stage 0, which embeds it for the next step; while micro-batch m travels down the pipeline,
stage 0 already works on micro-batch m+1, so with M >= S micro-batches the stages stay busy in the steady state
(the scheme vLLM and TensorRT-LLM use for pipeline-parallel decoding). With one micro-batch every step is a full
bubble: the stages take turns.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from service.parallel.llama import LlamaShard, LlamaSpec, Shard, WeightSource, load_shard, split_range


def build_pipeline_stage(
    spec: LlamaSpec, source: WeightSource, rank: int, world: int, dtype: torch.dtype = torch.float32
) -> LlamaShard:
    """This rank's stage: its layers, plus the embedding on the first rank and norm + head on the last."""
    return load_shard(spec, Shard.pipeline_stage(spec, rank, world), source, dtype=dtype)


def micro_batch_sizes(batch: int, micro_batches: int) -> list[int]:
    """Split ``batch`` sequences into ``min(batch, micro_batches)`` micro-batches of near-equal size."""
    m = max(1, min(batch, micro_batches))
    return [b - a for a, b in (split_range(batch, m, i) for i in range(m))]


class _Sends:
    """Outstanding non-blocking sends (the tensors stay referenced until their send completes)."""

    def __init__(self) -> None:
        self._pending: list[tuple[object, torch.Tensor]] = []

    def send(self, t: torch.Tensor, dst: int) -> None:
        t = t.contiguous()
        self._pending.append((dist.isend(t, dst), t))

    def wait(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()


@torch.no_grad()
def pipeline_forward(stage: LlamaShard, ids: torch.Tensor, micro_batches: int) -> torch.Tensor | None:
    """One forward pass (prefill) of ``ids`` through the pipeline, GPipe-style.

    Every rank passes the same ``ids`` (only the first stage reads the values; the others need the shape).

    Returns:
        the logits ``[batch, tokens, vocab]`` on the last rank, ``None`` elsewhere.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    first, last = rank == 0, rank == world - 1
    batch, tokens = ids.shape
    hidden = stage.spec.hidden_size
    sends = _Sends()
    outputs = []
    offset = 0
    for size in micro_batch_sizes(batch, micro_batches):
        if first:
            x = ids[offset : offset + size]
        else:
            x = torch.empty(size, tokens, hidden, dtype=next(stage.parameters()).dtype)
            dist.recv(x, rank - 1)
        y = stage(x)
        if last:
            outputs.append(y)
        else:
            sends.send(y, rank + 1)
        offset += size
    sends.wait()
    return torch.cat(outputs) if last else None


@torch.no_grad()
def pipeline_greedy_generate(
    stage: LlamaShard,
    ids: torch.Tensor,
    new_tokens: int,
    micro_batches: int,
    timings: dict[str, float] | None = None,
) -> torch.Tensor | None:
    """Greedy decoding through the pipeline with a KV cache per stage and micro-batch.

    Args:
        stage: this rank's stage.
        ids: the prompt ``[batch, tokens]`` (every rank passes it; only the first stage reads the values).
        new_tokens: tokens to generate.
        micro_batches: how many micro-batches the batch is cut into.
        timings: if given, receives ``perf_counter`` stamps ``prefill_end`` (this stage finished the prompt of
            every micro-batch) and ``end`` (and ``*_cpu``: this process's CPU time, ``process_time``).

    Returns:
        the ``[batch, new_tokens]`` generated ids on the last rank, ``None`` elsewhere.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    first, last = rank == 0, rank == world - 1
    batch, prompt = ids.shape
    hidden = stage.spec.hidden_size
    dtype = next(stage.parameters()).dtype
    sizes = micro_batch_sizes(batch, micro_batches)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    caches = [stage.new_cache(size, prompt + new_tokens) for size in sizes]
    generated: list[list[torch.Tensor]] = [[] for _ in sizes]
    # Sends of the previous step are awaited only at the end of the next one: waiting for this step's own sends
    # would hold the last stage until stage 0 takes the last micro-batch's token, serialising the pipeline.
    previous, sends = _Sends(), _Sends()
    for step in range(new_tokens):
        pos = 0 if step == 0 else prompt + step - 1
        width = prompt if step == 0 else 1
        for m, size in enumerate(sizes):
            if first:
                if step == 0:
                    x = ids[starts[m] : starts[m] + size]
                elif last:  # a single stage: the token is already here
                    x = generated[m][-1]
                else:
                    x = torch.empty(size, 1, dtype=torch.long)
                    dist.recv(x, world - 1)  # the token the last stage chose for this micro-batch
            else:
                x = torch.empty(size, width, hidden, dtype=dtype)
                dist.recv(x, rank - 1)
            y = stage(x, pos, caches[m])
            if not last:
                sends.send(y, rank + 1)
                continue
            nxt = y[:, -1].argmax(-1, keepdim=True)
            generated[m].append(nxt)
            if step < new_tokens - 1 and not first:
                sends.send(nxt, 0)
        previous.wait()
        previous, sends = sends, _Sends()
        if timings is not None and step == 0:
            timings["prefill_end"], timings["prefill_end_cpu"] = time.perf_counter(), time.process_time()
    previous.wait()
    sends.wait()
    if timings is not None:
        timings["end"], timings["end_cpu"] = time.perf_counter(), time.process_time()
    if not last:
        return None
    return torch.cat([torch.cat(g, dim=1) for g in generated])
