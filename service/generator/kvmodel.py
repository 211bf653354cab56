"""A Llama forward pass with explicit past keys/values, written for ONNX export, plus reference greedy decoding.

Why our own forward instead of exporting ``LlamaForCausalLM`` directly: the served graph needs a flat, stable
signature (``input_ids, attention_mask, position_ids, past_key_0, past_value_0, ...`` in, ``logits,
present_key_0, ...`` out) with a dynamic past length (0 for a prefill), left padding for batches of sequences
of different lengths, and logits of the last position only (a prefill of 256 tokens would otherwise return
256 x 49,152 floats that nobody reads). The module reuses the Hugging Face model's own submodules (projections,
RMSNorm, MLP), so LoRA merging and weights stay theirs; :func:`check_against_hf` proves the outputs equal the
Hugging Face model's.

One graph serves both phases: a prefill is a call with past length 0 and ``S`` prompt tokens, a decode step a
call with ``S = 1``. ``attention_mask`` is ``[B, past + S]`` (1 = real token, 0 = left padding) and
``position_ids`` ``[B, S]`` counts real tokens only, so padded rows give the same numbers as unpadded ones.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

INPUT_NAMES_BASE = ("input_ids", "attention_mask", "position_ids")
OUTPUT_LOGITS = "logits"


def past_names(num_layers: int) -> list[str]:
    """Input names of the cache: ``past_key_<i>``, ``past_value_<i>`` per layer, in order."""
    return [f"past_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    """Output names of the updated cache: ``present_key_<i>``, ``present_value_<i>`` per layer."""
    return [f"present_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]


@dataclass(frozen=True)
class CacheShape:
    """What one token of KV cache costs.

    Attributes:
        num_layers: Decoder layers.
        num_kv_heads: Key/value heads (grouped-query attention: fewer than query heads).
        head_dim: Width of one head.
        bytes_per_value: 4 for FP32, 2 for FP16.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    bytes_per_value: int = 4

    @property
    def bytes_per_token(self) -> int:
        """Keys and values of every layer for one token."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.bytes_per_value


class KVCacheLM(nn.Module):
    """Llama decoder with a flat past/present signature (see the module docstring).

    Args:
        hf_model: A ``LlamaForCausalLM`` (LoRA already merged, or none).
        last_logits_only: Return logits of the last position only (serving); False returns every position
            (perplexity, tests).
    """

    def __init__(self, hf_model: Any, *, last_logits_only: bool = True) -> None:
        super().__init__()
        cfg = hf_model.config
        self.decoder = hf_model.model
        self.lm_head = hf_model.lm_head
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"only default RoPE is supported, got {rope.get('rope_type')!r}")
        inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.last_logits_only = last_logits_only

    def cache_shape(self, bytes_per_value: int = 4) -> CacheShape:
        """The per-token cost of this model's cache."""
        return CacheShape(self.num_layers, self.num_kv_heads, self.head_dim, bytes_per_value)

    def empty_past(self, batch: int = 1, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """A zero-length cache for a prefill."""
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [torch.zeros(shape, dtype=dtype) for _ in range(2 * self.num_layers)]

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Run ``S`` new tokens on top of a cache of length ``P``.

        Args:
            input_ids: ``[B, S]`` int64.
            attention_mask: ``[B, P + S]`` int64, 1 for real tokens.
            position_ids: ``[B, S]`` int64 positions of the new tokens.
            *past: ``2 * num_layers`` tensors ``[B, kv_heads, P, head_dim]`` (key, value per layer).

        Returns:
            ``(logits, *present)``: logits ``[B, 1 or S, vocab]`` and the cache ``[B, kv_heads, P + S, head_dim]``.
        """
        batch, seq = input_ids.shape
        hidden = self.decoder.embed_tokens(input_ids)
        dtype = hidden.dtype
        freqs = position_ids.unsqueeze(-1).to(torch.float32) * self.inv_freq  # [B, S, d/2]
        angles = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [B, 1, S, d]
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)

        total = attention_mask.shape[1]
        past_len = total - seq
        key_positions = torch.arange(total, device=input_ids.device)
        query_positions = torch.arange(seq, device=input_ids.device) + past_len
        causal = key_positions.unsqueeze(0) <= query_positions.unsqueeze(1)  # [S, T]
        allowed = causal.unsqueeze(0).unsqueeze(0) & (attention_mask > 0).unsqueeze(1).unsqueeze(2)  # [B,1,S,T]
        # Half the dtype's minimum: finite (no NaN for a fully padded row), and far below any real score.
        bias = torch.where(
            allowed, torch.zeros((), dtype=dtype), torch.full((), torch.finfo(dtype).min / 2, dtype=dtype)
        )
        scale = 1.0 / math.sqrt(self.head_dim)
        groups = self.num_heads // self.num_kv_heads

        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.decoder.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + self._rotate_half(q) * sin
            k = k * cos + self._rotate_half(k) * sin
            k = torch.cat((past[2 * i], k), dim=2)
            v = torch.cat((past[2 * i + 1], v), dim=2)
            presents.extend((k, v))
            # Grouped-query attention: each KV head serves `groups` query heads.
            kk = k.unsqueeze(2).expand(batch, self.num_kv_heads, groups, total, self.head_dim)
            kk = kk.reshape(batch, self.num_heads, total, self.head_dim)
            vv = v.unsqueeze(2).expand(batch, self.num_kv_heads, groups, total, self.head_dim)
            vv = vv.reshape(batch, self.num_heads, total, self.head_dim)
            scores = torch.matmul(q, kk.transpose(-1, -2)) * scale + bias
            probs = torch.softmax(scores, dim=-1)
            out = torch.matmul(probs, vv).transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        hidden = self.decoder.norm(hidden)
        if self.last_logits_only:
            hidden = hidden[:, -1:, :]
        logits = self.lm_head(hidden)
        return (logits, *presents)


#: ``step(input_ids, attention_mask, position_ids, past) -> (last_logits [B, V] numpy/tensor, present list)``
StepFn = Callable[[Any, Any, Any, list[Any]], tuple[Any, list[Any]]]


def torch_step(module: KVCacheLM) -> StepFn:
    """A :data:`StepFn` running the torch module (no grad)."""

    def step(ids: Any, mask: Any, pos: Any, past: list[Any]) -> tuple[Any, list[Any]]:
        with torch.no_grad():
            out = module(torch.as_tensor(ids), torch.as_tensor(mask), torch.as_tensor(pos), *past)
        return out[0][:, -1, :], list(out[1:])

    return step


def greedy_decode(
    step: StepFn,
    empty_past: Callable[[], list[Any]],
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    use_cache: bool = True,
    eos_token_id: int | None = None,
    as_array: Callable[[list[list[int]]], Any] = lambda rows: torch.tensor(rows, dtype=torch.int64),
) -> list[int]:
    """Greedy decoding of one prompt, with the KV cache or by recomputing the whole sequence every step.

    Args:
        step: The model call (:func:`torch_step`, or an ONNX Runtime one).
        empty_past: Returns a zero-length cache.
        prompt: Prompt token ids.
        max_new_tokens: Tokens to generate (fewer if ``eos_token_id`` comes first).
        use_cache: Feed one token per step on top of the cache; False re-runs the whole sequence each step.
        eos_token_id: Stop after this token.
        as_array: Builds the backend's int64 array from nested lists.

    Returns:
        The generated ids (the prompt excluded).
    """
    tokens = list(prompt)
    generated: list[int] = []
    past = empty_past()
    feed = list(prompt)
    for _ in range(max_new_tokens):
        if use_cache:
            start = len(tokens) - len(feed)
            ids = as_array([feed])
            mask = as_array([[1] * len(tokens)])
            pos = as_array([list(range(start, len(tokens)))])
            logits, past = step(ids, mask, pos, past)
        else:
            ids = as_array([tokens])
            mask = as_array([[1] * len(tokens)])
            pos = as_array([list(range(len(tokens)))])
            logits, _ = step(ids, mask, pos, empty_past())
        token = int(logits[0].argmax())
        generated.append(token)
        tokens.append(token)
        feed = [token]
        if eos_token_id is not None and token == eos_token_id:
            break
    return generated


def tokens_per_second(decode: Callable[[], list[int]], repeats: int = 1) -> float:
    """Best-of-``repeats`` decoding speed (generated tokens per wall-clock second)."""
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        n = len(decode())
        best = max(best, n / max(time.perf_counter() - started, 1e-9))
    return best


def check_against_hf(hf_model: Any, module: KVCacheLM, input_ids: torch.Tensor) -> float:
    """Largest absolute difference between the Hugging Face model's logits and ours (all positions, no cache).

    Args:
        hf_model: The ``LlamaForCausalLM`` the module wraps.
        module: A :class:`KVCacheLM` with ``last_logits_only=False``.
        input_ids: ``[B, S]`` ids.

    Returns:
        ``max |logits_hf - logits_ours|``.
    """
    batch, seq = input_ids.shape
    with torch.no_grad():
        reference = hf_model(input_ids=input_ids).logits
        mask = torch.ones(batch, seq, dtype=torch.int64)
        pos = torch.arange(seq).unsqueeze(0).expand(batch, seq)
        ours = module(input_ids, mask, pos, *module.empty_past(batch))[0]
    return float((reference - ours).abs().max())
