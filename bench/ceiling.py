"""The in-process model ceiling with and without the fused graph (issue 16 item 6), side by side, interleaved.

For one built workdir (``python -m service.modelprep build --workdir ...``): INT8 quantized from the unfused export
vs INT8 quantized from the graph fused by ONNX Runtime's transformer optimizer (service/modelprep/fusion.py), and
FP32 both ways. Whatever the build did not make itself (it makes one INT8 of the two) is made here, into
``<workdir>/ceiling/``, with the build's own INT8 recipe.

Measured like ``bench/compare.py``'s ``model_ceiling``: the benchmark's TREC questions, tokenized beforehand with the
served tokenizer (truncation at the build's max length, padding to each batch's longest), length-sorted (the best
order, which the gateway's length buckets aim at; ``--corpus-order`` adds the file order), two intra-op threads,
ONNX Runtime's default session options. Each round times every (batch size, variant) for ``--seconds``, variants in
a rotated order, so a slow spell of the shared machine hits all of them alike; medians over ``--rounds``.

Writes ``bench/results/ceiling-<UTC timestamp>.json`` (every round, the machine, the load average before and after,
and the build's test accuracies when its report exists) and prints a table. A benchmark, not a test: no assertion.

Usage:
    python bench/ceiling.py --workdir artifacts/default
    python bench/ceiling.py --workdir artifacts/default --batch-sizes 1,8,32,64 --rounds 5 --seconds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

VARIANTS = ("int8", "int8-fused", "fp32", "fp32-fused")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def prepare_models(workdir: Path, variants: list[str]) -> tuple[dict[str, Path], dict]:
    """Paths of the variants to measure, made under ``<workdir>/ceiling/`` when the build lacks them.

    Returns:
        (variant -> ONNX path, where each came from and the fusion record).
    """
    from service.modelprep.config import QuantizeConfig
    from service.modelprep.fusion import fuse_graph
    from service.modelprep.quantize import quantize_int8

    fp32 = workdir / "onnx" / "fp32.onnx"
    if not fp32.is_file():
        raise SystemExit(f"{fp32} not found: build the workdir first (python -m service.modelprep build)")
    scratch = workdir / "ceiling"
    scratch.mkdir(exist_ok=True)
    origin: dict = {}
    fused = workdir / "onnx-fused" / "fp32-fused.onnx"
    if fused.is_file():
        origin["fp32-fused"] = "built by the pipeline"
        fusion = _json(fused.with_suffix(".json")).get("graph_optimization", {})
    else:
        fused = scratch / "fp32-fused.onnx"
        fusion = _json(fused.with_suffix(".json")).get("graph_optimization", {})
        if not fused.is_file():
            fusion = fuse_graph(fp32, fused, workdir / "merged")
        origin["fp32-fused"] = "fused here (fusion.fuse_graph)"
        if not fusion.get("applied"):
            raise SystemExit(f"the optimizer did not fuse this model: {fusion.get('reason')}")
    report = _json(workdir / "report" / "report.json")
    recipe = report.get("config", {}).get("int8")
    q = QuantizeConfig(**recipe) if recipe else QuantizeConfig()
    # the build's INT8 files by the graph they were quantized from (a fused build has both)
    built = {}
    for stage in ("int8", "int8-unfused"):
        f = workdir / stage / q.tag / "model.onnx"
        if f.is_file():
            built[Path(_json(f.with_suffix(".json")).get("source", "")).name] = f
    paths = {"fp32": fp32, "fp32-fused": fused}
    for name, source in (("int8", fp32), ("int8-fused", fused)):
        if name not in variants:
            continue
        if source.name in built:
            paths[name] = built[source.name]
            origin[name] = f"built by the pipeline ({q.tag}, {built[source.name].parent.parent.name}/)"
            continue
        out = scratch / f"{name}-{q.tag}.onnx"
        if not out.is_file():
            print(f"quantizing {source.name} -> {out} ({q.tag})", flush=True)
            quantize_int8(q, source, out)
        paths[name] = out
        origin[name] = f"quantized here from {source.name} ({q.tag})"
    origin["fp32"] = "built by the pipeline"
    return {v: paths[v] for v in variants}, {"origin": origin, "graph_optimization": fusion, "int8_recipe": q.tag}


def make_feeds(workdir: Path, questions: list[str], batch_sizes: list[int], orders: list[str]) -> dict:
    """{(order, batch size): [feeds]} tokenized as served (as bench/compare.py's model_ceiling does)."""
    import numpy as np
    from tokenizers import Tokenizer

    merge = _json(workdir / "merged" / "merge.json")
    tok = Tokenizer.from_file(str(workdir / "merged" / "tokenizer" / "tokenizer.json"))
    tok.enable_truncation(int(merge.get("max_length", 64)))
    tok.enable_padding()
    texts = {
        "corpus order": questions,
        "length-sorted": sorted(questions, key=lambda q: len(tok.encode(q).ids)),
    }
    out = {}
    for order in orders:
        for b in batch_sizes:
            feeds = []
            for i in range(0, len(texts[order]) - b + 1, b):
                encs = tok.encode_batch(texts[order][i : i + b])
                feeds.append(
                    {
                        "input_ids": np.asarray([e.ids for e in encs], dtype=np.int64),
                        "attention_mask": np.asarray([e.attention_mask for e in encs], dtype=np.int64),
                    }
                )
            out[(order, b)] = feeds
    return out


def session(path: Path, threads: int):
    """The ceiling's session: ``threads`` intra-op threads, ONNX Runtime's defaults otherwise (as model_ceiling)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def measure(paths: dict[str, Path], feeds: dict, rounds: int, seconds: float, threads: int) -> list[dict]:
    """Interleaved rounds: each round times every (order, batch size, variant) once, variants in rotated order."""
    sessions = {v: session(p, threads) for v, p in paths.items()}
    for fs in feeds.values():
        for s in sessions.values():
            for f in fs[:2]:  # first runs pay for ONNX Runtime's lazy allocations
                s.run(["logits"], f)
    names = list(sessions)
    runs: dict[tuple, list[float]] = {(o, b, v): [] for (o, b) in feeds for v in names}
    for r in range(rounds):
        for (order, b), fs in feeds.items():
            k = r % len(names)
            for v in names[k:] + names[:k]:
                s = sessions[v]
                n, i, t0 = 0, 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    s.run(["logits"], fs[i % len(fs)])
                    n += b
                    i += 1
                runs[(order, b, v)].append(round(n / (time.perf_counter() - t0), 1))
        print(f"  round {r + 1}/{rounds} done; load average {os.getloadavg()[0]:.2f}", flush=True)
    return [
        {
            "order": o,
            "batch_size": b,
            "variant": v,
            "sequences_per_second": statistics.median(rs),
            "rounds": rs,
        }
        for (o, b, v), rs in runs.items()
    ]


def accuracies(workdir: Path) -> dict:
    """The build's test accuracies (its report), by variant name."""
    report = _json(workdir / "report" / "report.json")
    return {
        r["name"]: {
            "accuracy": r["accuracy"],
            "macro_f1": r["macro_f1"],
            "agreement_with_fp32": r.get("agreement_with_fp32"),
            "max_abs_logit_diff_vs_fp32": r.get("max_abs_logit_diff_vs_fp32"),
        }
        for r in report.get("variants", [])
    }


def render_table(rows: list[dict]) -> str:
    """Markdown: one line per (order, batch size), a column per variant, fused / unfused ratios."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    cell = {(r["order"], r["batch_size"], r["variant"]): r for r in rows}
    head = ["order", "batch"] + [f"{v} seq/s (rounds)" for v in variants]
    ratios = [(f"{v}-fused", v) for v in ("int8", "fp32") if v in variants and f"{v}-fused" in variants]
    head += [f"{a} / {b}" for a, b in ratios]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for order, b in dict.fromkeys((r["order"], r["batch_size"]) for r in rows):
        cells = [order, str(b)]
        for v in variants:
            c = cell[(order, b, v)]
            cells.append(f"{c['sequences_per_second']:.0f} ({', '.join(f'{x:.0f}' for x in c['rounds'])})")
        for a, bb in ratios:
            cells.append(
                f"{cell[(order, b, a)]['sequences_per_second'] / cell[(order, b, bb)]['sequences_per_second']:.2f}×"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=REPO_ROOT / "artifacts" / "default", help="a built workdir")
    p.add_argument("--batch-sizes", default="8,32,64", help="comma-separated batch sizes (default 8,32,64)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    p.add_argument("--seconds", type=float, default=2.0, help="timed loop per variant and batch size (default 2)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2, as served)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--corpus-order", action="store_true", help="also time batches in corpus (file) order")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results", help="where the JSON goes")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import gateway_bench as gb

    from service.machine import describe_machine, machine_line

    a = parse_args(argv)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    batch_sizes = [int(x) for x in a.batch_sizes.split(",") if x.strip()]
    orders = ["length-sorted"] + (["corpus order"] if a.corpus_order else [])
    machine = describe_machine()
    load_before = os.getloadavg()
    print(f"machine: {machine_line(machine)}; load average {load_before[0]:.2f} {load_before[1]:.2f}", flush=True)
    paths, provenance = prepare_models(a.workdir, variants)
    feeds = make_feeds(a.workdir, gb.QUESTIONS, batch_sizes, orders)
    n = len(feeds) * len(paths) * a.rounds
    print(f"{n} timed runs of {a.seconds:g} s: about {n * a.seconds / 60:.1f} min", flush=True)
    t0 = time.time()
    rows = measure(paths, feeds, a.rounds, a.seconds, a.threads)
    load_after = os.getloadavg()
    table = render_table(rows)
    print(table)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    a.out.mkdir(parents=True, exist_ok=True)
    out = a.out / f"ceiling-{stamp}.json"
    import onnxruntime

    data = {
        "what": "in-process ONNX Runtime ceiling, unfused vs fused graph (issue 16 item 6)",
        "measured_at": stamp,
        "wall_seconds": round(time.time() - t0, 1),
        "machine": {
            **machine,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after],
            "shared": "the 2 cores are shared with other jobs (builds, tests) unless the run was made quiet",
        },
        "onnxruntime": onnxruntime.__version__,
        "workdir": str(a.workdir),
        "models": {v: str(p) for v, p in paths.items()},
        "sizes_bytes": {v: p.stat().st_size for v, p in paths.items()},
        **provenance,
        "settings": {
            "batch_sizes": batch_sizes,
            "orders": orders,
            "rounds": a.rounds,
            "seconds": a.seconds,
            "threads": a.threads,
            "questions": len(gb.QUESTIONS),
            "tokenization": "excluded (done before timing)",
        },
        "results": rows,
        "build_accuracies": accuracies(a.workdir),
        "table_markdown": table,
    }
    out.write_text(json.dumps(data, indent=2))
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
