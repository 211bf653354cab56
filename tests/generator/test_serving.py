"""The generator served by the real tritonserver: streaming, continuous batching, KV budget, cancellation, bad input."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest

from service.gateway.backend.generator import GenerateParams, GeneratorClient, TokenEvent
from service.gateway.errors import InvalidInput, Overloaded
from service.generator.export import np_rows, ort_session, ort_step
from service.generator.kvmodel import greedy_decode
from tests.generator.conftest import MODEL, SERVING_LIMITS

pytestmark = pytest.mark.integration

PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646]


async def collect(client: GeneratorClient, n: int, prompt=PROMPT, **kw) -> list[tuple[float, TokenEvent]]:
    started = time.perf_counter()
    events = []
    params = GenerateParams(max_new_tokens=n, ignore_eos=kw.pop("ignore_eos", True), **kw)
    async for event in client.stream(MODEL, list(prompt), params):
        events.append((time.perf_counter() - started, event))
    return events


async def with_client(triton, body):
    client = GeneratorClient(triton.grpc_url)
    try:
        await client.start([MODEL], timeout_seconds=30)
        return await body(client)
    finally:
        await client.aclose()


def test_streams_every_token_and_matches_offline_greedy(generator_triton, generator_repository):
    events = asyncio.run(with_client(generator_triton, lambda c: collect(c, 24)))
    tokens = [e.token_id for _, e in events]
    assert len(tokens) == 24
    assert [e.finish_reason for _, e in events] == [""] * 23 + ["length"]
    # The same graph decoded offline, with and without the cache: the served tokens are identical.
    meta = json.loads(next(Path(generator_repository).glob(f"{MODEL}/1/generation.json")).read_text())
    step, empty = ort_step(ort_session(generator_repository / MODEL / "1" / "model.onnx"), meta["num_layers"])
    assert greedy_decode(step, empty, PROMPT, 24, as_array=np_rows) == tokens
    assert greedy_decode(step, empty, PROMPT, 24, as_array=np_rows, use_cache=False) == tokens


def test_a_sequence_arriving_mid_decode_joins_the_running_batch(generator_triton):
    async def body(client):
        first = asyncio.ensure_future(collect(client, 80))
        # Wait until the first sequence is decoding (it has streamed a few tokens), then send the second.
        for _ in range(400):
            await asyncio.sleep(0.01)
            stats = await client.stats(MODEL)
            if stats["active_sequences"] == 1 and stats["tokens_total"] >= 3:
                break
        second = await collect(client, 8, prompt=PROMPT[:5])
        return await first, second

    first, second = asyncio.run(with_client(generator_triton, body))
    a = [e for _, e in first]
    b = [e for _, e in second]
    joined_at = b[0].step  # the iteration that ran b's prompt (prefill)
    # a was decoding alone before b arrived, and still running after b joined: no batch boundary was waited for.
    assert any(e.step < joined_at and e.batch_size == 1 for e in a)
    assert any(e.step > joined_at for e in a)
    # From the next iteration on, both sequences are in one decode batch, step for step.
    b_decode = b[1:]
    assert b_decode and all(e.batch_size >= 2 for e in b_decode)
    a_steps = {e.step: e.batch_size for e in a}
    assert all(a_steps.get(e.step) == e.batch_size for e in b_decode)
    # And once b finished, a went on alone.
    assert any(e.step > b[-1].step and e.batch_size == 1 for e in a)


def test_eight_streams_reach_three_times_one_streams_tokens_per_second(generator_triton):
    new_tokens = 48

    async def body(client):
        await collect(client, 8)  # warm-up
        single, eight = [], []
        for _ in range(2):  # interleaved rounds, best of each: the machine is shared
            started = time.perf_counter()
            await collect(client, new_tokens)
            single.append(new_tokens / (time.perf_counter() - started))
            started = time.perf_counter()
            runs = await asyncio.gather(*(collect(client, new_tokens, prompt=PROMPT[: 3 + i]) for i in range(8)))
            assert all(len(r) == new_tokens for r in runs)
            eight.append(8 * new_tokens / (time.perf_counter() - started))
            batch_sizes = [e.batch_size for r in runs for _, e in r[1:]]
            assert max(batch_sizes) == 8  # they really shared decode steps
        return max(single), max(eight)

    single, eight = asyncio.run(with_client(generator_triton, body))
    assert eight >= 3 * single, f"8 streams {eight:.0f} tok/s vs one stream {single:.0f} tok/s"


def test_cancelling_a_stream_frees_its_cache_at_once(generator_triton):
    async def body(client):
        before = await client.stats(MODEL)
        stream = client.stream(MODEL, PROMPT, GenerateParams(max_new_tokens=200, ignore_eos=True))
        seen = 0
        async for event in stream:
            seen += 1
            if seen == 5:
                during = event
                stream.cancel()
                break
        after = before
        for _ in range(200):  # the model notices at its next iteration
            after = await client.stats(MODEL)
            if after["kv_cache_reserved_bytes"] == before["kv_cache_reserved_bytes"]:
                break
            await asyncio.sleep(0.01)
        return before, during, after

    before, during, after = asyncio.run(with_client(generator_triton, body))
    assert during.kv_cache_bytes > before["kv_cache_bytes"]
    assert after["kv_cache_bytes"] == before["kv_cache_bytes"]
    assert after["kv_cache_reserved_bytes"] == before["kv_cache_reserved_bytes"]
    assert after["active_sequences"] == before["active_sequences"]
    assert after["evictions_total"] == before["evictions_total"] + 1


def test_full_kv_cache_refuses_with_overloaded_and_recovers(generator_triton):
    per_token = 2 * 4 * 2 * 96 * 4
    # Each of these reserves (8 + 200) tokens; the budget holds fewer than 24 of them but more than 12, so the
    # sequence limit (12) or the byte budget refuses the rest at once.
    fits = SERVING_LIMITS.max_kv_cache_bytes // ((len(PROMPT) + 200) * per_token)
    count = min(fits, SERVING_LIMITS.max_active_sequences) + 3

    async def body(client):
        streams = [
            client.stream(MODEL, PROMPT, GenerateParams(max_new_tokens=200, ignore_eos=True)) for _ in range(count)
        ]

        async def first(stream):
            try:
                async for _ in stream:
                    return "ok"
            except Overloaded as error:
                return error
            return "empty"

        outcomes = await asyncio.gather(*(first(s) for s in streams))
        for s in streams:
            s.cancel()
        await asyncio.sleep(0.2)
        # Room again once the others are gone.
        again = await collect(client, 4)
        return outcomes, again

    outcomes, again = asyncio.run(with_client(generator_triton, body))
    refused = [o for o in outcomes if isinstance(o, Overloaded)]
    assert outcomes.count("ok") == min(fits, SERVING_LIMITS.max_active_sequences)
    assert len(refused) == 3 and all(o.status == 429 and o.headers["Retry-After"] for o in refused)
    assert len(again) == 4


@pytest.mark.parametrize(
    ("prompt", "params", "needle"),
    [
        ([], GenerateParams(max_new_tokens=4), "empty prompt"),
        (PROMPT, GenerateParams(max_new_tokens=0), "max_new_tokens"),
        (PROMPT, GenerateParams(max_new_tokens=10_000), "max_new_tokens"),
        (list(range(1, 1020)), GenerateParams(max_new_tokens=10), "context"),
        ([49_152], GenerateParams(max_new_tokens=4), "token ids"),
        ([-3], GenerateParams(max_new_tokens=4), "token ids"),
        (PROMPT, GenerateParams(max_new_tokens=4, temperature=-1.0), "temperature"),
        (PROMPT, GenerateParams(max_new_tokens=4, temperature=float("nan")), "temperature"),
        (PROMPT, GenerateParams(max_new_tokens=4, temperature=1.0, top_p=0.0), "top_p"),
    ],
)
def test_bad_input_is_refused_alone_and_the_backend_keeps_serving(generator_triton, prompt, params, needle):
    async def body(client):
        with pytest.raises(InvalidInput, match=needle):
            async for _ in client.stream(MODEL, prompt, params):
                pass
        return await collect(client, 3)

    assert len(asyncio.run(with_client(generator_triton, body))) == 3
    assert generator_triton.is_alive()


def test_seeded_sampling_is_reproducible(generator_triton):
    async def body(client):
        runs = [await collect(client, 12, temperature=1.0, top_p=0.9, seed=7) for _ in range(2)]
        other = await collect(client, 12, temperature=1.0, top_p=0.9, seed=8)
        return [[e.token_id for _, e in r] for r in (*runs, other)]

    a, b, c = asyncio.run(with_client(generator_triton, body))
    assert a == b
    assert a != c


def test_nucleus_sampling_keeps_the_smallest_set_reaching_top_p():
    # Pure numbers, no server: the sampler's nucleus keeps the smallest set reaching top_p.
    from service.generator.triton_model import sample_token

    logits = np.log(np.asarray([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    draws = {sample_token(logits, 1.0, 0.7, rng) for _ in range(200)}
    assert draws == {0, 1}
    assert sample_token(logits, 0.0, 1.0, rng) == 0
