"""Tensor and pipeline parallelism: the split model gives the unsplit model's logits and greedy tokens.

The reference is ``transformers``' own ``LlamaForCausalLM`` holding the same random weights. Two small models of
SmolLM2's structure run on 2 gloo processes: one whose heads and MLP split evenly (4 query heads / 2 KV heads) and
one that splits unevenly as SmolLM2-135M does on 2 ranks (3 KV groups -> 2 + 1, an odd MLP width). Tolerance:
TP adds partial sums in a different order and PP runs micro-batches of other shapes, so logits may move by float32
rounding (~1e-6 here); we allow 1e-4 absolute on logits of magnitude ~5 and require identical greedy tokens.
"""

from __future__ import annotations

import itertools

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from service.parallel.checks import ParityCase, parity_worker
from service.parallel.dist import DistributedError, gloo_available, run_distributed
from service.parallel.llama import (
    LlamaSpec,
    Shard,
    WeightSource,
    greedy_generate,
    load_shard,
    random_state_dict,
    split_range,
)

LOGIT_ATOL = 1e-4
NEW_TOKENS = 6

EVEN = LlamaSpec.tiny(num_layers=4)
UNEVEN = LlamaSpec(
    vocab_size=200,
    hidden_size=48,
    intermediate_size=101,
    num_layers=3,
    num_heads=6,
    num_kv_heads=3,
    head_dim=8,
    rope_theta=100000.0,
)


def _hf_model(spec: LlamaSpec, sd: dict[str, torch.Tensor]):
    cfg = transformers.LlamaConfig(**spec.hf_config_kwargs())
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.load_state_dict(sd, strict=False)  # lm_head is tied to the embedding
    model.tie_weights()
    return model


@torch.no_grad()
def _hf_greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding by argmax over transformers' full forward (no cache, no stopping rule)."""
    seq = ids
    for _ in range(n):
        nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq[:, ids.shape[1] :]


def _case(name: str, spec: LlamaSpec, seed: int, micro: tuple[int, ...]):
    sd = random_state_dict(spec, seed=seed, std=0.2)
    ids = torch.randint(0, spec.vocab_size, (4, 9), generator=torch.Generator().manual_seed(seed + 1))
    hf = _hf_model(spec, sd)
    with torch.no_grad():
        logits = hf(ids).logits
    return ParityCase(name, spec, sd, ids, NEW_TOKENS, micro), logits, _hf_greedy(hf, ids, NEW_TOKENS)


@pytest.fixture(scope="module")
def cases():
    return {
        "even": _case("even", EVEN, 0, (1, 2)),
        "uneven": _case("uneven", UNEVEN, 3, (1, 3)),
    }


@pytest.fixture(scope="module")
def ranks(cases):
    """One 2-process gloo run that does every TP and PP check (one spawn keeps the suite fast)."""
    try:
        return run_distributed(parity_worker, 2, args=([c[0] for c in cases.values()],), timeout_seconds=120)
    except DistributedError:
        ok, reason = gloo_available()
        if not ok:
            pytest.skip(f"gloo cannot start here: {reason}")
        raise


# ---- without processes -------------------------------------------------------------------------------------


def test_split_range_covers_evenly():
    for n, parts in [(3, 2), (1536, 2), (30, 4), (101, 3), (7, 7)]:
        ranges = [split_range(n, parts, i) for i in range(parts)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        sizes = [b - a for a, b in ranges]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        split_range(2, 3, 0)


def test_smollm2_shards_on_two_ranks():
    spec = LlamaSpec.smollm2_135m()
    tp = [Shard.tensor_parallel(spec, r, 2) for r in range(2)]
    assert [s.kv_groups for s in tp] == [(0, 2), (2, 3)]  # whole GQA groups: 6 + 3 query heads
    assert [s.q_heads(spec) for s in tp] == [(0, 6), (6, 9)]
    assert [s.ffn for s in tp] == [(0, 768), (768, 1536)]
    pp = [Shard.pipeline_stage(spec, r, 2) for r in range(2)]
    assert [s.layers for s in pp] == [(0, 15), (15, 30)]
    assert (pp[0].has_embedding, pp[0].has_head, pp[1].has_embedding, pp[1].has_head) == (True, False, False, True)


def test_unsplit_model_matches_transformers(cases):
    for case, ref_logits, ref_tokens in cases.values():
        model = load_shard(case.spec, Shard.full(case.spec), WeightSource.from_state_dict(case.weights))
        with torch.no_grad():
            torch.testing.assert_close(model(case.ids), ref_logits, atol=LOGIT_ATOL, rtol=0)
        assert greedy_generate(model, case.ids, NEW_TOKENS).equal(ref_tokens)
        assert greedy_generate(model, case.ids, NEW_TOKENS, use_cache=False).equal(ref_tokens)


def test_cache_continues_a_chunked_prefill(cases):
    """Prefill in two chunks through the cache gives the one-shot logits (the masked path of attention)."""
    case, ref_logits, _ = cases["uneven"]
    model = load_shard(case.spec, Shard.full(case.spec), WeightSource.from_state_dict(case.weights))
    cache = model.new_cache(case.ids.shape[0], case.ids.shape[1])
    with torch.no_grad():
        first = model(case.ids[:, :5], 0, cache)
        second = model(case.ids[:, 5:], 5, cache)
    torch.testing.assert_close(torch.cat([first, second], dim=1), ref_logits, atol=LOGIT_ATOL, rtol=0)


# ---- 2 processes, gloo -------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("name", ["even", "uneven"])
def test_tensor_parallel_matches_unsplit(ranks, cases, name):
    case, ref_logits, ref_tokens = cases[name]
    r0, r1 = ranks[0][name]["tp"], ranks[1][name]["tp"]
    torch.testing.assert_close(r0["logits"], ref_logits, atol=LOGIT_ATOL, rtol=0)
    for r in (r0, r1):
        assert r["tokens"].equal(ref_tokens)
        assert r["tokens_no_cache"].equal(ref_tokens)
    # Each rank holds its slice of every layer: together they cover the heads and MLP columns exactly once.
    spec = case.spec
    assert (
        r0["kv_groups"][0] == 0 and r0["kv_groups"][1] == r1["kv_groups"][0] and r1["kv_groups"][1] == spec.num_kv_heads
    )
    assert r0["ffn"][0] == 0 and r0["ffn"][1] == r1["ffn"][0] and r1["ffn"][1] == spec.intermediate_size
    full = load_shard(spec, Shard.full(spec), WeightSource.from_state_dict(case.weights)).parameter_bytes()
    replicated = 4 * (spec.vocab_size * spec.hidden_size + spec.hidden_size * (2 * spec.num_layers + 1))
    assert r0["param_bytes"] + r1["param_bytes"] == full + replicated  # embedding/head and norms on both ranks
    assert max(r0["param_bytes"], r1["param_bytes"]) < full


@pytest.mark.integration
@pytest.mark.parametrize("name", ["even", "uneven"])
def test_pipeline_parallel_matches_unsplit(ranks, cases, name):
    case, ref_logits, ref_tokens = cases[name]
    for m in case.micro_batches:
        first, last = ranks[0][name][f"pp_m{m}"], ranks[1][name][f"pp_m{m}"]
        assert first["logits"] is None and first["tokens"] is None  # outputs exist on the last stage only
        torch.testing.assert_close(last["logits"], ref_logits, atol=LOGIT_ATOL, rtol=0)
        assert last["tokens"].equal(ref_tokens), f"micro-batches={m}"
        assert first["layers"][0] == 0 and first["layers"][1] == last["layers"][0]
        assert last["layers"][1] == case.spec.num_layers
