"""``python -m service.parallel {check,bench}``.

- ``check``: TP=2 and PP=2 parity on a small random Llama (GQA), printed as a table; seconds.
- ``bench``: one process vs TP=2 vs PP=2 on SmolLM2-135M-Instruct; writes bench/results/parallelism.{json,md,png}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def _check() -> int:
    from service.parallel.checks import ParityCase, parity_worker
    from service.parallel.dist import run_distributed
    from service.parallel.llama import LlamaSpec, Shard, WeightSource, greedy_generate, load_shard, random_state_dict

    spec = LlamaSpec.tiny()
    sd = random_state_dict(spec, seed=0, std=0.2)
    ids = torch.randint(0, spec.vocab_size, (4, 12), generator=torch.Generator().manual_seed(1))
    ref = load_shard(spec, Shard.full(spec), WeightSource.from_state_dict(sd))
    with torch.no_grad():
        ref_logits = ref(ids)
    ref_tokens = greedy_generate(ref, ids, 8)
    ranks = run_distributed(parity_worker, 2, args=([ParityCase("tiny", spec, sd, ids, 8)],))
    ok = True
    print("layout     max|dlogit|  greedy identical")
    for key, holder in (("tp", 0), ("pp_m1", 1), ("pp_m2", 1)):
        r = ranks[holder]["tiny"][key]
        diff = float((r["logits"] - ref_logits).abs().max())
        same = bool(r["tokens"].equal(ref_tokens))
        ok &= same and diff < 1e-4
        print(f"{key:<10} {diff:11.2e}  {same}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.parallel", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="TP/PP parity on a small random Llama (seconds)")
    b = sub.add_parser("bench", help="one process vs TP=2 vs PP=2 on SmolLM2-135M (minutes)")
    b.add_argument("--checkpoint", type=Path, default=None, help="cached FP32 base (artifacts/generator/base-fp32)")
    b.add_argument("--out", type=Path, default=None, help="result path prefix (bench/results/parallelism)")
    b.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke run of the harness")
    b.add_argument(
        "--layouts",
        nargs="+",
        default=None,
        help="subset of single-1t dp2 tp2 pp2 single-2t (the first is the parity reference); default all",
    )
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check()
    from service.parallel.bench import DEFAULT_CHECKPOINT, DEFAULT_OUT, LAYOUTS, BenchPlan, render_table, run_bench

    layouts = LAYOUTS
    if args.layouts:
        by_name = {layout.name: layout for layout in LAYOUTS}
        unknown = [n for n in args.layouts if n not in by_name]
        if unknown:
            parser.error(f"unknown layouts {unknown}; choose from {list(by_name)}")
        layouts = tuple(by_name[n] for n in args.layouts)

    plan = BenchPlan()
    if args.quick:
        plan = BenchPlan(
            prefill_batch=2,
            prefill_tokens=8,
            decode_batches=(1, 2),
            decode_prompt_tokens=4,
            decode_new_tokens=3,
            pp_prefill_micro_batches=(1, 2),
            min_seconds=0.0,
            max_repeats=1,
            parity_new_tokens=2,
        )
    report = run_bench(args.checkpoint or DEFAULT_CHECKPOINT, args.out or DEFAULT_OUT, plan, layouts)
    print(render_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
