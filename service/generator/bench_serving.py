"""Serving benchmark of a published generator through the real tritonserver: tokens/s and time to first token at
1..N concurrent streams (continuous batching), in interleaved rounds, written as JSON with the machine named.

    python -m service.generator.bench_serving --repository model_repository --model generator_fp32 \
        --streams 1,4,8 --new-tokens 64 --rounds 2 --json artifacts/generator/serving.json

Each stream sends the same kind of prompt (a chat question of ~40 tokens) with ``ignore_eos`` so every stream
generates exactly ``--new-tokens`` tokens; the figure per level is the best round (the machine is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from service.gateway.backend.generator import GenerateParams, GeneratorClient

PROMPT_IDS = [
    1,
    9690,
    198,
    2683,
    359,
    253,
    5356,
    5646,
    11173,
    3365,
    3511,
    308,
    34519,
    28,
    7018,
    411,
    407,
    19712,
    8182,
    2,
    198,
    1,
    4093,
    198,
    1780,
    314,
    260,
    3575,
    282,
    4649,
    47,
    2,
    198,
    1,
    520,
    9531,
    198,
]


async def _one(client: GeneratorClient, model: str, n: int, prompt: list[int]) -> tuple[float, float, int]:
    started = time.perf_counter()
    first = 0.0
    count = 0
    async for _ in client.stream(model, prompt, GenerateParams(max_new_tokens=n, ignore_eos=True)):
        if count == 0:
            first = time.perf_counter() - started
        count += 1
    return first, time.perf_counter() - started, count


async def measure(url: str, model: str, levels: list[int], new_tokens: int, rounds: int) -> list[dict[str, Any]]:
    """Best-of-``rounds`` figures per concurrency level (levels interleaved within each round)."""
    client = GeneratorClient(url)
    await client.start([model], timeout_seconds=60)
    results: dict[int, list[dict[str, float]]] = {n: [] for n in levels}
    try:
        await _one(client, model, 4, PROMPT_IDS)  # warm-up
        for _ in range(rounds):
            for streams in levels:
                started = time.perf_counter()
                runs = await asyncio.gather(
                    *(_one(client, model, new_tokens, PROMPT_IDS[: len(PROMPT_IDS) - i]) for i in range(streams))
                )
                wall = time.perf_counter() - started
                tokens = sum(r[2] for r in runs)
                results[streams].append(
                    {
                        "tokens_per_second": tokens / wall,
                        "ttft_median_seconds": statistics.median(r[0] for r in runs),
                        "ttft_max_seconds": max(r[0] for r in runs),
                    }
                )
    finally:
        await client.aclose()
    rows = []
    base = max(r["tokens_per_second"] for r in results[levels[0]])
    for streams in levels:
        best = max(results[streams], key=lambda r: r["tokens_per_second"])
        rows.append(
            {
                "streams": streams,
                "tokens_per_second": round(best["tokens_per_second"], 1),
                "speedup_vs_first_level": round(best["tokens_per_second"] / base, 2),
                "ttft_median_seconds": round(best["ttft_median_seconds"], 3),
                "ttft_max_seconds": round(best["ttft_max_seconds"], 3),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Start tritonserver on the repository (only ``--model``), measure, print and save the table."""
    parser = argparse.ArgumentParser(prog="python -m service.generator.bench_serving", description=__doc__)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default="generator_fp32")
    parser.add_argument("--streams", default="1,4,8", help="concurrency levels, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    from service.machine import describe_machine
    from service.triton.launcher import TritonLaunchConfig, TritonServer

    levels = [int(x) for x in args.streams.split(",") if x.strip()]
    with TritonServer(TritonLaunchConfig(model_repository=args.repository, models=(args.model,))) as server:
        rows = asyncio.run(measure(server.grpc_url, args.model, levels, args.new_tokens, args.rounds))
    result = {
        "model": args.model,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "machine": describe_machine(),
        "rows": rows,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
