"""A compact Llama decoder in plain PyTorch that can hold one shard of the model.

The same module runs the whole model (one process), one tensor-parallel rank (a slice of every layer's heads and
MLP columns) or one pipeline stage (a contiguous range of layers), so the three are compared on identical code.
It needs only ``torch``: the GPU check (``bench/gpu/generator_check.py``) imports it on a machine without
``transformers``. Parameter names follow Hugging Face's ``LlamaForCausalLM`` state dict, so a checkpoint saved by
``transformers`` loads shard by shard (:func:`load_shard`), and the parity tests compare against ``transformers``
itself.

Numerics follow ``transformers``' Llama (RMSNorm in FP32, rotary tables computed in FP32 then cast, SDPA with
``1/sqrt(head_dim)`` scaling). Batches are rectangular: every sequence in a batch has the same prompt length (no
padding masks); that is what the parity tests and the benchmarks use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as nnf

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class LlamaSpec:
    """The architecture numbers of a Llama decoder (the subset of ``LlamaConfig`` this code uses)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    max_positions: int = 2048

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")

    @property
    def heads_per_group(self) -> int:
        """Query heads that share one key/value head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    @staticmethod
    def smollm2_135m() -> LlamaSpec:
        """SmolLM2-135M(-Instruct): 30 layers, hidden 576, 9 query heads sharing 3 KV heads, 49,152 tokens."""
        return LlamaSpec(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_layers=30,
            num_heads=9,
            num_kv_heads=3,
            head_dim=64,
            rope_theta=100000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            max_positions=8192,
        )

    @staticmethod
    def tiny(num_layers: int = 4) -> LlamaSpec:
        """A small random model of the same structure (GQA 4 heads / 2 KV heads) for fast tests."""
        return LlamaSpec(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=160,
            num_layers=num_layers,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            max_positions=512,
        )

    @staticmethod
    def from_hf_config(cfg: object) -> LlamaSpec:
        """Read a ``transformers`` ``LlamaConfig`` (or anything with the same attribute names)."""
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = rope.get("rope_theta") if isinstance(rope, dict) else None
        if rope and isinstance(rope, dict) and rope.get("rope_type", "default") != "default":
            raise ValueError(f"only default RoPE is implemented, got {rope.get('rope_type')!r}")
        heads = cfg.num_attention_heads
        return LlamaSpec(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=cfg.num_key_value_heads or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            rope_theta=float(theta or getattr(cfg, "rope_theta", 10000.0)),
            rms_norm_eps=cfg.rms_norm_eps,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            max_positions=cfg.max_position_embeddings,
        )

    def hf_config_kwargs(self) -> dict[str, object]:
        """Keyword arguments for ``transformers.LlamaConfig`` describing the same model."""
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_positions,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
        }


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """The ``index``-th of ``parts`` contiguous ranges covering ``range(n)``, sizes differing by at most one."""
    if not 0 <= index < parts:
        raise ValueError(f"index {index} outside 0..{parts - 1}")
    if n < parts:
        raise ValueError(f"cannot split {n} items into {parts} non-empty parts")
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass(frozen=True)
class Shard:
    """Which part of the model one process holds.

    ``kv_groups`` is the range of key/value heads (each with its ``heads_per_group`` query heads) and ``ffn`` the
    range of MLP intermediate columns this rank computes in every layer it holds; ``layers`` is the range of
    decoder layers. The whole model is ``Shard.full(spec)``.
    """

    kv_groups: tuple[int, int]
    ffn: tuple[int, int]
    layers: tuple[int, int]
    has_embedding: bool
    has_head: bool
    tp_world: int = 1

    @staticmethod
    def full(spec: LlamaSpec) -> Shard:
        return Shard((0, spec.num_kv_heads), (0, spec.intermediate_size), (0, spec.num_layers), True, True)

    @staticmethod
    def tensor_parallel(spec: LlamaSpec, rank: int, world: int) -> Shard:
        """Megatron-style split: KV groups (with their query heads) and MLP columns divided across ranks.

        Megatron and vLLM require the head counts to divide by the TP size. SmolLM2-135M has 3 KV heads, so on
        2 ranks we split by whole GQA groups as evenly as possible (2 + 1): the math stays exact, the attention
        work is uneven (the MLP, 1,536 columns, splits evenly).
        """
        return Shard(
            kv_groups=split_range(spec.num_kv_heads, world, rank),
            ffn=split_range(spec.intermediate_size, world, rank),
            layers=(0, spec.num_layers),
            has_embedding=True,
            has_head=True,
            tp_world=world,
        )

    @staticmethod
    def pipeline_stage(spec: LlamaSpec, rank: int, world: int) -> Shard:
        """Layers split into ``world`` contiguous stages; the first holds the embedding, the last norm and head."""
        return Shard(
            kv_groups=(0, spec.num_kv_heads),
            ffn=(0, spec.intermediate_size),
            layers=split_range(spec.num_layers, world, rank),
            has_embedding=rank == 0,
            has_head=rank == world - 1,
        )

    def q_heads(self, spec: LlamaSpec) -> tuple[int, int]:
        g = spec.heads_per_group
        return self.kv_groups[0] * g, self.kv_groups[1] * g


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


@dataclass
class KVCache:
    """Preallocated keys and values for the layers (and KV heads) one shard holds.

    Shapes are ``[batch, local_kv_heads, max_len, head_dim]`` per layer; ``length`` is the number of positions
    filled. Growing by slicing a preallocated buffer keeps decode free of reallocation (``torch.cat`` per step
    would copy the whole cache every token).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @staticmethod
    def allocate(
        spec: LlamaSpec,
        shard: Shard,
        batch: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        kv = shard.kv_groups[1] - shard.kv_groups[0]
        n = shard.layers[1] - shard.layers[0]
        shape = (batch, kv, max_len, spec.head_dim)
        return KVCache(
            [torch.empty(shape, dtype=dtype, device=device) for _ in range(n)],
            [torch.empty(shape, dtype=dtype, device=device) for _ in range(n)],
        )

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class Attention(nn.Module):
    """Grouped-query attention over this shard's KV groups; returns the partial output before the all-reduce."""

    def __init__(self, spec: LlamaSpec, shard: Shard) -> None:
        super().__init__()
        q0, q1 = shard.q_heads(spec)
        k0, k1 = shard.kv_groups
        self.head_dim = spec.head_dim
        self.local_heads = q1 - q0
        self.local_kv = k1 - k0
        d = spec.head_dim
        # Column-parallel: each rank owns the output rows of its heads; no communication on the way in.
        self.q_proj = nn.Linear(spec.hidden_size, self.local_heads * d, bias=False)
        self.k_proj = nn.Linear(spec.hidden_size, self.local_kv * d, bias=False)
        self.v_proj = nn.Linear(spec.hidden_size, self.local_kv * d, bias=False)
        # Row-parallel: each rank owns the input columns of its heads; the caller all-reduces the partial sums.
        self.o_proj = nn.Linear(self.local_heads * d, spec.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor] | None,
        start: int,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(b, t, self.local_heads, d).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.local_kv, d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.local_kv, d).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if cache is not None:
            ck, cv = cache
            ck[:, :, start : start + t] = k
            cv[:, :, start : start + t] = v
            k, v = ck[:, :, : start + t], cv[:, :, : start + t]
        mask = None
        causal = False
        if t > 1:
            if start == 0:
                causal = True
            else:  # a chunk after a cached prefix: position i sees keys 0..start+i
                q_pos = torch.arange(start, start + t, device=x.device)[:, None]
                mask = torch.arange(start + t, device=x.device)[None, :] <= q_pos
        rep = self.local_heads // self.local_kv
        if rep > 1:  # expand KV heads to their query heads (what enable_gqa does, spelled out for portability)
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        out = nnf.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=1.0 / math.sqrt(d))
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.local_heads * d))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class MLP(nn.Module):
    """SwiGLU MLP over this shard's intermediate columns (gate/up column-parallel, down row-parallel)."""

    def __init__(self, spec: LlamaSpec, shard: Shard) -> None:
        super().__init__()
        width = shard.ffn[1] - shard.ffn[0]
        self.gate_proj = nn.Linear(spec.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nnf.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, spec: LlamaSpec, shard: Shard) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, shard)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec, shard)

    def forward(self, x, cos, sin, cache, start, reduce: Reduce) -> torch.Tensor:
        # One all-reduce after each row-parallel projection (Megatron's "g"); the identity when not split.
        x = x + reduce(self.self_attn(self.input_layernorm(x), cos, sin, cache, start))
        return x + reduce(self.mlp(self.post_attention_layernorm(x)))


class _Body(nn.Module):
    """Holds ``embed_tokens``/``layers``/``norm`` under the names ``transformers`` uses (``model.*``)."""

    def __init__(self, spec: LlamaSpec, shard: Shard) -> None:
        super().__init__()
        if shard.has_embedding:
            self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, shard) for _ in range(shard.layers[1] - shard.layers[0]))
        if shard.has_head:
            self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class LlamaShard(nn.Module):
    """One shard of a Llama causal LM: the whole model, a tensor-parallel rank, or a pipeline stage.

    ``forward`` takes token ids when the shard holds the embedding (else hidden states from the previous stage)
    and returns logits when it holds the head (else hidden states for the next stage).

    Args:
        spec: the architecture.
        shard: which part this process holds (``Shard.full(spec)`` for the whole model).
        reduce: the all-reduce applied to every row-parallel output (tensor parallelism); identity otherwise.
    """

    def __init__(self, spec: LlamaSpec, shard: Shard | None = None, reduce: Reduce | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.shard = shard or Shard.full(spec)
        self.reduce = reduce or _identity
        self.model = _Body(spec, self.shard)
        if self.shard.has_head:
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
            if spec.tie_word_embeddings and self.shard.has_embedding:
                self.lm_head.weight = self.model.embed_tokens.weight
        d = spec.head_dim
        inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rotary(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(start, start + length, device=self.inv_freq.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, x: torch.Tensor, start: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        """Run this shard over positions ``start .. start + x.shape[1]``.

        Args:
            x: token ids ``[batch, t]`` (first shard) or hidden states ``[batch, t, hidden]``.
            start: position of the first input token (the cache's length when decoding).
            cache: this shard's KV cache, or ``None`` to recompute without one (``start`` must then be 0).

        Returns:
            logits ``[batch, t, vocab]`` (last shard) or hidden states ``[batch, t, hidden]``.
        """
        h = self.model.embed_tokens(x) if self.shard.has_embedding else x
        t = h.shape[1]
        if cache is None and start:
            raise ValueError("start > 0 needs a KV cache")
        if cache is not None and start + t > cache.max_len:
            raise ValueError(f"cache holds {cache.max_len} positions, asked for {start + t}")
        cos, sin = self.rotary(start, t, h.dtype)
        for i, layer in enumerate(self.model.layers):
            kv = (cache.keys[i], cache.values[i]) if cache is not None else None
            h = layer(h, cos, sin, kv, start, self.reduce)
        if cache is not None:
            cache.length = start + t
        if not self.shard.has_head:
            return h
        return self.lm_head(self.model.norm(h))

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = next(self.parameters())
        return KVCache.allocate(self.spec, self.shard, batch, max_len, p.dtype, p.device)

    def parameter_bytes(self) -> int:
        """Bytes of the parameters this shard holds (a tied head counted once)."""
        seen: set[int] = set()
        total = 0
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        return total


# ---- loading weights shard by shard -------------------------------------------------------------------------


@dataclass
class WeightSource:
    """Reads a tensor, or a slice of one along a dimension, from a checkpoint without loading the rest.

    ``get(name, dim, start, stop)`` returns ``tensor[..., start:stop, ...]`` (slice on ``dim``) or the whole
    tensor when ``dim`` is ``None``. :meth:`from_state_dict` wraps an in-memory dict; :meth:`from_safetensors`
    reads only the requested slices from a ``.safetensors`` file, so a rank's memory holds only its shard.
    """

    get: Callable[[str, int | None, int, int], torch.Tensor]
    names: set[str] = field(default_factory=set)

    @staticmethod
    def from_state_dict(sd: dict[str, torch.Tensor]) -> WeightSource:
        def get(name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
            t = sd[name]
            return t if dim is None else t.narrow(dim, start, stop - start)

        return WeightSource(get, set(sd))

    @staticmethod
    def from_safetensors(path: str) -> WeightSource:
        from safetensors import safe_open  # transformers' dependency; imported lazily to keep this module torch-only

        handle = safe_open(path, framework="pt")

        def get(name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
            if dim is None:
                return handle.get_tensor(name)
            sl = handle.get_slice(name)
            index = [slice(None)] * len(sl.get_shape())
            index[dim] = slice(start, stop)
            return sl[tuple(index)]

        return WeightSource(get, set(handle.keys()))


def _shard_slices(spec: LlamaSpec, shard: Shard) -> Iterator[tuple[str, str, int | None, int, int]]:
    """(local name, checkpoint name, dim, start, stop) for every parameter of the shard."""
    d = spec.head_dim
    q0, q1 = shard.q_heads(spec)
    k0, k1 = shard.kv_groups
    f0, f1 = shard.ffn
    if shard.has_embedding:
        yield "model.embed_tokens.weight", "model.embed_tokens.weight", None, 0, 0
    for local, layer in enumerate(range(*shard.layers)):
        src, dst = f"model.layers.{layer}.", f"model.layers.{local}."
        yield dst + "input_layernorm.weight", src + "input_layernorm.weight", None, 0, 0
        yield dst + "post_attention_layernorm.weight", src + "post_attention_layernorm.weight", None, 0, 0
        yield dst + "self_attn.q_proj.weight", src + "self_attn.q_proj.weight", 0, q0 * d, q1 * d
        yield dst + "self_attn.k_proj.weight", src + "self_attn.k_proj.weight", 0, k0 * d, k1 * d
        yield dst + "self_attn.v_proj.weight", src + "self_attn.v_proj.weight", 0, k0 * d, k1 * d
        yield dst + "self_attn.o_proj.weight", src + "self_attn.o_proj.weight", 1, q0 * d, q1 * d
        yield dst + "mlp.gate_proj.weight", src + "mlp.gate_proj.weight", 0, f0, f1
        yield dst + "mlp.up_proj.weight", src + "mlp.up_proj.weight", 0, f0, f1
        yield dst + "mlp.down_proj.weight", src + "mlp.down_proj.weight", 1, f0, f1
    if shard.has_head:
        yield "model.norm.weight", "model.norm.weight", None, 0, 0
        if not (spec.tie_word_embeddings and shard.has_embedding):
            # A last pipeline stage of a tied model holds its own copy of the embedding matrix as the head.
            yield "lm_head.weight", "lm_head.weight", None, 0, 0


def load_shard(
    spec: LlamaSpec,
    shard: Shard,
    source: WeightSource,
    reduce: Reduce | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> LlamaShard:
    """Build a :class:`LlamaShard` and fill it with its slices of a ``transformers``-named checkpoint.

    The module is created on the ``meta`` device first, so no memory is spent on a full random initialisation.
    """
    with torch.device("meta"):
        module = LlamaShard(spec, shard, reduce)
    module = module.to_empty(device=device)
    params = dict(module.named_parameters())
    for local, name, dim, start, stop in _shard_slices(spec, shard):
        if name == "lm_head.weight" and name not in source.names:
            name = "model.embed_tokens.weight"  # tied checkpoints may omit the head
        with torch.no_grad():
            params[local].copy_(source.get(name, dim, start, stop).to(dtype))
    if shard.has_head and spec.tie_word_embeddings and shard.has_embedding:
        module.lm_head.weight = module.model.embed_tokens.weight
    d = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    module.inv_freq = inv_freq.to(device)
    return module.to(dtype).eval()


def random_state_dict(spec: LlamaSpec, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """A ``transformers``-named FP32 checkpoint with normal(0, std) weights and unit norms (HF's Llama init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        skeleton = LlamaShard(spec)
    sd: dict[str, torch.Tensor] = {}
    for name, p in skeleton.named_parameters(remove_duplicate=True):
        if name.endswith("norm.weight"):
            sd[name] = torch.ones(p.shape)
        else:
            sd[name] = torch.randn(p.shape, generator=gen) * std
    return sd


@torch.no_grad()
def greedy_generate(model: LlamaShard, ids: torch.Tensor, new_tokens: int, use_cache: bool = True) -> torch.Tensor:
    """Greedy decoding on one unsplit model; returns the ``[batch, new_tokens]`` generated ids."""
    out = []
    if use_cache:
        cache = model.new_cache(ids.shape[0], ids.shape[1] + new_tokens)
        logits = model(ids, 0, cache)
        for _ in range(new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            if len(out) == new_tokens:
                break
            logits = model(nxt, cache.length, cache)
    else:
        seq = ids
        for _ in range(new_tokens):
            nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            seq = torch.cat([seq, nxt], dim=1)
    return torch.cat(out, dim=1)
