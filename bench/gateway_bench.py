"""Building blocks of the peer benchmark: contender servers, closed-loop load, senders (a library and a CLI).

The command is ``python bench/compare.py`` (docs/benchmarks.md). This module never imports compare.py (no import
cycle); run directly it only serves one child peer (``--serve naive|transformers``), which compare.py starts.

Contenders, each started as its own process on 127.0.0.1 and measured alone:
  gateway-int8  python -m service.gateway -> Triton (classifier_int8), dynamic batching in the gateway
  gateway-fp16  the same with the FP16 variant (classifier_fp16; on CPU FP16 brings no speed, see design §4)
  gateway-grpc  the INT8 gateway driven over its v2 gRPC endpoint (tritonclient.grpc.aio, texts as BYTES)
  triton        Triton direct over async gRPC; the client tokenizes, Triton's ragged dynamic batcher batches
  naive         FastAPI running the same INT8 model.onnx in process with ONNX Runtime, one request at a time
  transformers  FastAPI + a transformers text-classification pipeline (torch FP32), one request at a time
  ray-serve     Ray Serve, the same INT8 model.onnx with ONNX Runtime behind ``@serve.batch`` (bench/peers/)

Load: at each concurrency level that many clients loop "send one question, wait for the answer" for a fixed time
(after a warm-up that is not counted). The questions are loadtest/data/questions.txt, the TREC sample the locust
load test uses, in a fixed order, so every contender gets the same texts. The load generator shares the machine
with the servers, as a sidecar client would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from service.triton import repository as contract

INT8_MODEL = contract.model_name("int8")
FP16_MODEL = contract.model_name("fp16")

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

CORPUS = REPO_ROOT / "loadtest" / "data" / "questions.txt"
LABEL_NAMES_FALLBACK = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


def load_questions(path: Path = CORPUS) -> list[str]:
    """The benchmark's texts: one question per line, ``#`` comments and blank lines skipped.

    Args:
        path: The corpus file (default: the committed TREC sample shared with the locust load test).

    Returns:
        The questions in file order.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    return [q.strip() for q in lines if q.strip() and not q.lstrip().startswith("#")]


QUESTIONS = load_questions()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict:
    """The machine the figures come from (service.machine), plus what a benchmark also needs: usable cores and load."""
    from service.machine import describe_machine

    m = describe_machine()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": m["cpu"],
        "cpu_cores": m["cores"],
        "usable_cores": usable,
        "memory_gib": m["memory_gib"],
        "cpu_flags": m["cpu_flags"],
        "platform": platform.platform(),
        "python": m["python"],
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


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
    for q in QUESTIONS[:16]:  # the first runs pay for ONNX Runtime's lazy allocations; keep them out of the load
        ids = np.asarray([tok.encode(q).ids], dtype=np.int64)
        sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
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
    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), num_labels=args.num_labels, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    clf = pipeline("text-classification", model=model, tokenizer=tokenizer, device=-1, top_k=None)
    # The first calls of a fresh torch process take hundreds of milliseconds each (lazy kernel set-up, measured
    # 0.1-0.5 s here); warm up before answering, as any production server would, so the load measures steady state.
    for q in QUESTIONS[:16]:
        clf(q, truncation=True, max_length=args.max_length)
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
        self.p = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT
        )

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
            except Exception:  # noqa: BLE001 - any failure here is reported, never fatal
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

    return {
        "concurrency": concurrency,
        "requests": len(lat),
        "errors": errors,
        "rps": round(len(lat) / duration_seconds, 1),
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "mean_ms": round(statistics.fmean(lat) * 1000, 1) if lat else None,
    }


def many(texts_per_request: int):
    """``texts(question)``: the question alone, or it and the next questions of the corpus (``texts_per_request``)."""
    index = {q: i for i, q in enumerate(QUESTIONS)}

    def texts(q: str) -> list[str]:
        i = index.get(q, 0)
        return [QUESTIONS[(i + j) % len(QUESTIONS)] for j in range(texts_per_request)]

    return texts


def http_sender(url: str, concurrency: int, extra: dict | None = None, texts_per_request: int = 1):
    """An async ``send(question) -> ok`` posting ``{"text": question, **extra}`` to ``url``/v1/classify.

    With ``texts_per_request`` > 1 the body is ``{"texts": [question and the next ones], **extra}``.

    aiohttp is used when installed (the ``bench`` extra): the load generator shares the 2 cores with the servers,
    and httpx's client costs several times more CPU per request, which starves the server it is measuring.
    """
    try:
        import aiohttp
    except ImportError:
        aiohttp = None
    texts = many(texts_per_request)

    def body(q: str) -> dict:
        return {"texts": texts(q), **(extra or {})} if texts_per_request > 1 else {"text": q, **(extra or {})}

    if aiohttp is not None:
        state: dict = {}

        async def send(q: str) -> bool:
            session = state.get("s")
            if session is None:  # created inside the running loop
                session = state["s"] = aiohttp.ClientSession(
                    base_url=url,
                    connector=aiohttp.TCPConnector(limit=concurrency),
                    timeout=aiohttp.ClientTimeout(total=60),
                )
            async with session.post("/v1/classify", json=body(q)) as r:
                await r.read()
                return r.status == 200

        async def close() -> None:
            if "s" in state:
                await state["s"].close()

        return send, close
    import httpx

    client = httpx.AsyncClient(
        base_url=url,
        timeout=60.0,
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
    )

    async def send(q: str) -> bool:
        r = await client.post("/v1/classify", json=body(q))
        return r.status_code == 200

    return send, client.aclose


def triton_sender(grpc_url: str, version_dir: Path, texts_per_request: int = 1):
    import numpy as np
    import tritonclient.grpc.aio as grpcaio
    from tokenizers import Tokenizer

    meta = json.loads((version_dir / "labels.json").read_text())
    tok = Tokenizer.from_file(str(version_dir / "tokenizer.json"))
    tok.enable_truncation(meta["max_length"])
    tok.no_padding()
    client = grpcaio.InferenceServerClient(grpc_url)
    texts = many(texts_per_request)

    async def send(q: str) -> bool:
        if texts_per_request > 1:  # one padded [n, longest] request, as a client batching for itself would send
            encs = [e.ids for e in tok.encode_batch(texts(q))]
            longest = max(len(e) for e in encs)
            ids = np.zeros((len(encs), longest), dtype=np.int64)
            mask = np.zeros_like(ids)
            for r, e in enumerate(encs):
                ids[r, : len(e)], mask[r, : len(e)] = e, 1
        else:
            ids = np.asarray([tok.encode(q).ids], dtype=np.int64)
            mask = np.ones_like(ids)
        inputs = [
            grpcaio.InferInput("input_ids", list(ids.shape), "INT64"),
            grpcaio.InferInput("attention_mask", list(ids.shape), "INT64"),
        ]
        inputs[0].set_data_from_numpy(ids)
        inputs[1].set_data_from_numpy(mask)
        res = await client.infer(
            INT8_MODEL, inputs, outputs=[grpcaio.InferRequestedOutput("logits")], client_timeout=60
        )
        return res.as_numpy("logits") is not None

    return send, client.close


def gateway_grpc_sender(grpc_url: str, texts_per_request: int = 1):
    import numpy as np
    import tritonclient.grpc.aio as grpcaio

    client = grpcaio.InferenceServerClient(grpc_url)
    texts = many(texts_per_request)

    async def send(q: str) -> bool:
        batch = texts(q) if texts_per_request > 1 else [q]
        tensor = grpcaio.InferInput("text", [len(batch)], "BYTES")
        tensor.set_data_from_numpy(np.array([t.encode() for t in batch], dtype=object))
        res = await client.infer(INT8_MODEL, [tensor], client_timeout=60)
        return res.as_numpy("labels") is not None

    return send, client.close


def gateway_batch_counts(url: str, variant: str = "int8") -> tuple[float, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    count = total = 0.0
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in fam.samples:
            if s.labels.get("variant") == variant and s.name == "gateway_batch_size_count":
                count = s.value
            if s.labels.get("variant") == variant and s.name == "gateway_batch_size_sum":
                total = s.value
    return count, total


def triton_batch_counts(grpc_url: str, model: str = INT8_MODEL) -> tuple[float, float]:
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(grpc_url)
    try:
        stats = c.get_inference_statistics(model_name=model, as_json=True)["model_stats"][0]
    finally:
        c.close()
    return float(stats.get("execution_count", 0)), float(stats.get("inference_count", 0))


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    """Serve one child peer (``--serve naive|transformers``); compare.py starts it. The comparison is compare.py."""
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        description="Serve one peer of the benchmark (started by bench/compare.py; run that for the comparison)."
    )
    p.add_argument("--serve", choices=["naive", "transformers"], required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--version-dir", required=True)
    p.add_argument("--hf-model-dir")
    p.add_argument("--num-labels", type=int, default=6)
    p.add_argument("--max-length", type=int, default=128)
    args = p.parse_args(argv)
    (serve_naive if args.serve == "naive" else serve_transformers)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
