"""The KV-cache forward pass, its ONNX export, and the continuous-batching engine, on a tiny random Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.generator.base import tiny_model
from service.generator.export import export_onnx, np_rows, ort_session, ort_step
from service.generator.kvmodel import KVCacheLM, check_against_hf, greedy_decode, torch_step
from service.generator.triton_model import Engine, Event, RequestError

VOCAB = 512


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model(VOCAB, seed=3, hidden_size=64, layers=2)
    return model, KVCacheLM(model).eval()


@pytest.fixture(scope="module")
def tiny_onnx(tiny, tmp_path_factory):
    _, module = tiny
    return export_onnx(module, tmp_path_factory.mktemp("kv") / "model.onnx")


def test_logits_equal_hugging_face(tiny):
    model, _ = tiny
    full = KVCacheLM(model, last_logits_only=False).eval()
    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(0))
    assert check_against_hf(model, full, ids) < 1e-5


def test_left_padding_does_not_change_a_row(tiny):
    _, module = tiny
    long, short = list(range(5, 17)), list(range(30, 37))
    pad = len(long) - len(short)
    ids = torch.tensor([long, [0] * pad + short])
    mask = torch.tensor([[1] * len(long), [0] * pad + [1] * len(short)])
    pos = torch.tensor([list(range(len(long))), [0] * pad + list(range(len(short)))])
    with torch.no_grad():
        batched = module(ids, mask, pos, *module.empty_past(2))[0][1]
        alone = module(
            torch.tensor([short]),
            torch.ones(1, len(short), dtype=torch.int64),
            torch.arange(len(short)).unsqueeze(0),
            *module.empty_past(1),
        )[0][0]
    assert torch.allclose(batched, alone, atol=1e-5)


def test_greedy_identical_with_and_without_cache_in_torch_and_onnx(tiny, tiny_onnx):
    _, module = tiny
    prompt = [3, 14, 15, 92, 65]
    step = torch_step(module)
    reference = greedy_decode(step, module.empty_past, prompt, 20)
    assert greedy_decode(step, module.empty_past, prompt, 20, use_cache=False) == reference
    onnx_step, empty = ort_step(ort_session(tiny_onnx), module.num_layers)
    assert greedy_decode(onnx_step, empty, prompt, 20, as_array=np_rows) == reference
    assert greedy_decode(onnx_step, empty, prompt, 20, as_array=np_rows, use_cache=False) == reference


def make_engine(tiny, tiny_onnx, **kw) -> Engine:
    _, module = tiny
    return Engine(
        ort_session(tiny_onnx),
        num_layers=module.num_layers,
        kv_heads=module.num_kv_heads,
        head_dim=module.head_dim,
        **kw,
    )


def test_engine_batches_a_newcomer_into_the_running_decode(tiny, tiny_onnx):
    _, module = tiny
    engine = make_engine(tiny, tiny_onnx)
    a_events: list[Event] = []
    b_events: list[Event] = []
    engine.submit([3, 14, 15, 92, 65], max_new_tokens=6, emit=a_events.append)
    engine.iterate()  # a: prefill
    engine.iterate()  # a: decode alone
    engine.submit([7, 7, 8], max_new_tokens=3, emit=b_events.append)
    engine.iterate()  # b: prefill; a: decode (batch 1)
    engine.iterate()  # a and b: one decode batch of 2
    assert [e.batch_size for e in a_events] == [1, 1, 1, 2]
    assert [e.batch_size for e in b_events] == [1, 2]
    assert a_events[-1].step == b_events[-1].step
    while not (a_events[-1].final and b_events[-1].final):
        engine.iterate()
    assert [e.finish_reason for e in b_events] == ["", "", "length"]
    assert len(a_events) == 6 and a_events[-1].finish_reason == "length"
    assert [e.batch_size for e in a_events[4:]] == [2, 1]  # b left after its third token, a went on alone
    # Batched tokens are the tokens each sequence gets alone.
    step, empty = ort_step(ort_session(tiny_onnx), module.num_layers)
    assert [e.token_id for e in a_events] == greedy_decode(step, empty, [3, 14, 15, 92, 65], 6, as_array=np_rows)
    assert [e.token_id for e in b_events] == greedy_decode(step, empty, [7, 7, 8], 3, as_array=np_rows)
    assert engine.stats()["kv_cache_bytes"] == 0 and engine.stats()["active_sequences"] == 0


def test_engine_budget_refuses_then_admits_after_release(tiny, tiny_onnx):
    engine = make_engine(tiny, tiny_onnx)
    per_token = engine.bytes_per_token
    engine.max_kv_cache_bytes = per_token * 20
    events: list[Event] = []
    engine.submit([1, 2, 3, 4], max_new_tokens=12, emit=events.append)  # reserves 16 tokens
    with pytest.raises(RequestError, match="overloaded"):
        engine.submit([1, 2, 3, 4], max_new_tokens=4, emit=events.append)  # 8 more do not fit
    while not (events and events[-1].final):
        engine.iterate()
    engine.submit([1, 2, 3, 4], max_new_tokens=4, emit=events.append)  # fits again
    assert engine.stats()["refused_total"] == 1


def test_engine_cancellation_frees_the_cache_at_the_next_iteration(tiny, tiny_onnx):
    engine = make_engine(tiny, tiny_onnx)
    cancelled = {"flag": False}
    events: list[Event] = []
    engine.submit([5, 6, 7], max_new_tokens=50, emit=events.append, is_cancelled=lambda: cancelled["flag"])
    for _ in range(4):
        engine.iterate()
    assert engine.stats()["kv_cache_bytes"] == (3 + 3) * engine.bytes_per_token
    cancelled["flag"] = True
    engine.iterate()
    stats = engine.stats()
    assert stats["kv_cache_bytes"] == 0 and stats["kv_cache_reserved_bytes"] == 0 and stats["evictions_total"] == 1
    assert events[-1].error and events[-1].error.startswith("cancelled:")


@pytest.mark.parametrize(
    ("prompt", "kw", "needle"),
    [
        ([], {"max_new_tokens": 4}, "empty prompt"),
        ([1], {"max_new_tokens": 0}, "max_new_tokens"),
        ([1] * 2040, {"max_new_tokens": 16}, "context"),
        ([1], {"max_new_tokens": 4, "temperature": float("inf")}, "temperature"),
        ([1], {"max_new_tokens": 4, "top_p": 1.5}, "top_p"),
    ],
)
def test_engine_validation(tiny, tiny_onnx, prompt, kw, needle):
    engine = make_engine(tiny, tiny_onnx)
    with pytest.raises(RequestError, match=needle) as info:
        engine.submit(prompt, emit=lambda e: None, **kw)
    assert info.value.code == "invalid_input"


def test_engine_isolates_a_prompt_the_graph_rejects(tiny, tiny_onnx):
    engine = make_engine(tiny, tiny_onnx)
    good: list[Event] = []
    bad: list[Event] = []
    engine.submit([1, 2, 3], max_new_tokens=2, emit=good.append)
    engine.submit([VOCAB + 100], max_new_tokens=2, emit=bad.append)  # out of the embedding table
    while not (good and good[-1].final):
        engine.iterate()
    assert bad and bad[-1].error and bad[-1].error.startswith("invalid_input:")
    assert len(good) == 2 and engine.stats()["active_sequences"] == 0


def test_cache_bytes_per_token_of_smollm2_geometry():
    from service.generator.kvmodel import CacheShape

    # 30 layers x 3 KV heads x 64 dims x (key + value) x 4 bytes.
    assert CacheShape(30, 3, 64).bytes_per_token == 46_080
    assert np.isclose(CacheShape(30, 3, 64, 2).bytes_per_token, 23_040)
