"""GPU check of the generator's engine: decode speed with and without the KV cache, and FP16 vs FP32 agreement.

Runs on a single-GPU machine with only PyTorch installed and no network, in well under 5 minutes, bringing no
model files: the model is SmolLM2-135M-Instruct's exact architecture (30 layers, hidden 576, 9 query heads over
3 KV heads, 49,152-token tied embedding; ``LlamaSpec.smollm2_135m()``) with random weights (std 0.02, unit norms,
the ``transformers`` Llama initialisation), built by ``service/parallel/llama.py`` (torch only). Why random
weights: the real checkpoint is 98 MB as Q4_1 GGUF and 270 MB in FP16, over the 64 MiB a check may carry, and
reading the GGUF needs ``transformers`` + ``gguf``. Speed depends on the shapes, not on the values, so the
tokens/s are those of the real model; the FP16/FP32 agreement on random weights is a check of the numerics
(norms, rotary tables, attention in half precision), not of the trained model's sensitivity.

For each dtype (FP16, FP32) and batch (1, 4, 16, 64) it times greedy generation of ``--new-tokens`` tokens after
a ``--prompt-tokens`` prompt, with the cache (prefill once, then one token per step) and without it (the whole
sequence recomputed every step), and checks that both give the same tokens. Then it compares FP16 with FP32:
logits on the prompt (max |diff|, relative to the logits' spread; top-1 agreement) and greedy tokens.

Usage: ``bench/gpu/generator_check.sh`` (or ``python bench/gpu/generator_check.py [--device cuda]``);
``--dry-run`` uses a tiny model on CPU in seconds (that is what the test suite runs).
Writes JSON to ``--out`` (default ``$OUT/generator_check.json`` when ``$OUT`` is set, else
``bench/gpu/results/generator_check.json``) and prints a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from service.parallel.llama import (
    LlamaShard,
    LlamaSpec,
    Shard,
    WeightSource,
    load_shard,
    random_state_dict,
)

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model: LlamaShard, ids: torch.Tensor, new_tokens: int, use_cache: bool) -> torch.Tensor:
    """Greedy ``[batch, new_tokens]``; with the cache one token per step, without it the full sequence each step."""
    out = []
    if use_cache:
        cache = model.new_cache(ids.shape[0], ids.shape[1] + new_tokens)
        logits = model(ids, 0, cache)
        while True:
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


def _time_generate(model, ids, new_tokens, use_cache, device, repeats) -> tuple[float, torch.Tensor]:
    generate(model, ids, min(2, new_tokens), use_cache)  # warm-up (kernels, allocator)
    best = float("inf")
    tokens = None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        tokens = generate(model, ids, new_tokens, use_cache)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, tokens


def describe_device(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            {
                "gpu": props.name,
                "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                "compute_capability": f"{props.major}.{props.minor}",
                "cuda": torch.version.cuda,
            }
        )
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def run(args: argparse.Namespace) -> dict[str, object]:
    device = torch.device(args.device)
    spec = LlamaSpec.tiny(num_layers=2) if args.dry_run else LlamaSpec.smollm2_135m()
    started = time.perf_counter()
    sd = random_state_dict(spec, seed=args.seed)
    source = WeightSource.from_state_dict(sd)
    models = {name: load_shard(spec, Shard.full(spec), source, dtype=dt, device=device) for name, dt in DTYPES.items()}
    del sd, source
    gen = torch.Generator().manual_seed(args.seed + 1)
    rows: list[dict[str, object]] = []
    skipped: list[str] = []
    for name, model in models.items():
        for batch in args.batches:
            ids = torch.randint(0, spec.vocab_size, (batch, args.prompt_tokens), generator=gen).to(device)
            row: dict[str, object] = {"dtype": name, "batch": batch}
            for use_cache in (True, False):
                label = "cache" if use_cache else "no_cache"
                if time.perf_counter() - started > args.budget_seconds:
                    skipped.append(f"{name} b{batch} {label}")
                    continue
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                seconds, tokens = _time_generate(model, ids, args.new_tokens, use_cache, device, args.repeats)
                row[f"{label}_tokens_per_second"] = round(batch * args.new_tokens / seconds, 1)
                row[f"{label}_seconds"] = round(seconds, 4)
                if device.type == "cuda":
                    row[f"{label}_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                row[f"{label}_tokens"] = tokens.cpu()
            if "cache_tokens" in row and "no_cache_tokens" in row:
                row["cache_speedup"] = round(row["no_cache_seconds"] / row["cache_seconds"], 2)
                same = (row["cache_tokens"] == row["no_cache_tokens"]).all(dim=1)
                row["cache_tokens_identical_fraction"] = round(float(same.float().mean()), 3)
            row.pop("cache_tokens", None)
            row.pop("no_cache_tokens", None)
            rows.append(row)

    agreement = _agreement(models, spec, args, device, gen)
    return {
        "check": "generator_gpu",
        "model": "SmolLM2-135M-Instruct architecture, random weights (std 0.02)" if not args.dry_run else "tiny",
        "spec": {k: getattr(spec, k) for k in spec.__dataclass_fields__},
        "parameters": sum(p.numel() for p in models["fp32"].parameters()),
        "settings": {
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "batches": list(args.batches),
            "repeats": args.repeats,
            "timing": "best of repeats, prefill included, greedy; tokens/s = batch * new_tokens / seconds",
        },
        "machine": describe_device(device),
        "rows": rows,
        "fp16_vs_fp32": agreement,
        "skipped_over_budget": skipped,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


@torch.no_grad()
def _agreement(models, spec, args, device, gen) -> dict[str, object]:
    batch = min(16, max(args.batches))
    ids = torch.randint(0, spec.vocab_size, (batch, args.prompt_tokens), generator=gen).to(device)
    l16 = models["fp16"](ids).float()
    l32 = models["fp32"](ids)
    diff = (l16 - l32).abs()
    t16 = generate(models["fp16"], ids, args.new_tokens, True)
    t32 = generate(models["fp32"], ids, args.new_tokens, True)
    same = t16 == t32
    # Length of the common prefix of each sequence: after the first differing token the continuations diverge.
    prefix = torch.where(same.all(dim=1), args.new_tokens, (~same).int().argmax(dim=1))
    return {
        "batch": batch,
        "max_abs_logit_diff": round(float(diff.max()), 5),
        "mean_abs_logit_diff": round(float(diff.mean()), 6),
        "logit_std_fp32": round(float(l32.std()), 5),
        "top1_agreement": round(float((l16.argmax(-1) == l32.argmax(-1)).float().mean()), 4),
        "greedy_sequences_identical_fraction": round(float(same.all(dim=1).float().mean()), 3),
        "greedy_mean_common_prefix_tokens": round(float(prefix.float().mean()), 2),
    }


def render(report: dict[str, object]) -> str:
    m = report["machine"]
    where = m.get("gpu") or m.get("cpu")
    s = report["settings"]
    lines = [
        (
            f"generator check on {where} (torch {m['torch']}), {report['model']}, "
            f"prompt {s['prompt_tokens']} + {s['new_tokens']} new tokens"
        ),
        f"{'dtype':<6}{'batch':>6}{'cache tok/s':>14}{'no-cache tok/s':>16}{'speed-up':>10}{'same tokens':>13}",
    ]
    for r in report["rows"]:
        lines.append(
            f"{r['dtype']:<6}{r['batch']:>6}{r.get('cache_tokens_per_second', '-')!s:>14}"
            f"{r.get('no_cache_tokens_per_second', '-')!s:>16}{r.get('cache_speedup', '-')!s:>10}"
            f"{r.get('cache_tokens_identical_fraction', '-')!s:>13}"
        )
    a = report["fp16_vs_fp32"]
    lines.append(
        f"FP16 vs FP32 (batch {a['batch']}): max |dlogit| {a['max_abs_logit_diff']} (logit std {a['logit_std_fp32']}),"
        f" top-1 agreement {a['top1_agreement']}, greedy sequences identical {a['greedy_sequences_identical_fraction']}"
        f" (mean common prefix {a['greedy_mean_common_prefix_tokens']} tokens)"
    )
    if report["skipped_over_budget"]:
        lines.append(f"skipped (time budget): {', '.join(report['skipped_over_budget'])}")
    lines.append(f"wall {report['wall_seconds']} s")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dry-run", action="store_true", help="tiny model on CPU, tiny sizes: seconds")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 4 16 64 (dry run: 1 2)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="default 32 (dry run: 6)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 64 (dry run: 4)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per point, best kept; default 3 (dry: 1)")
    p.add_argument("--budget-seconds", type=float, default=200.0, help="skip remaining timings after this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    dry = args.dry_run
    if dry:
        args.device = "cpu"
    args.batches = tuple(args.batches or ((1, 2) if dry else (1, 4, 16, 64)))
    args.prompt_tokens = args.prompt_tokens or (6 if dry else 32)
    args.new_tokens = args.new_tokens or (4 if dry else 64)
    args.repeats = args.repeats or (1 if dry else 3)
    if args.out is None:
        out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "gpu" / "results"
        args.out = out_dir / ("generator_check_dry_run.json" if dry else "generator_check.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
