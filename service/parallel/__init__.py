"""Tensor and pipeline parallelism for a Llama decoder on ``torch.distributed`` (gloo on CPU; NCCL would do on GPU).

- :mod:`service.parallel.llama`: a torch-only Llama that holds the whole model, a tensor-parallel slice or a
  pipeline stage, and loads just its shard from a ``transformers``-named checkpoint.
- :mod:`service.parallel.tp`: Megatron-style column/row-parallel attention and MLP (two all-reduces per layer).
- :mod:`service.parallel.pp`: layer stages with GPipe-style micro-batches, for prefill and KV-cached decoding.
- :mod:`service.parallel.dist`: spawn N local ranks in a gloo group on 127.0.0.1 and collect their results.
- :mod:`service.parallel.bench`: one process vs TP=2 vs PP=2 on SmolLM2-135M (``python -m service.parallel bench``).

See docs/parallelism.md for what was measured and when each layout pays.
"""
