"""Ray Serve peer: the same INT8 ONNX model behind ``@serve.batch`` (Ray's own dynamic batching).

Started by bench/compare.py as a child process; it starts a local single-node Ray (2 CPUs, no dashboard, bound to
127.0.0.1), deploys one replica, serves ``POST /v1/classify {"text": ...}`` on the given port, and shuts Ray down on
SIGTERM so no Ray process outlives it.

Usage:
    python bench/peers/ray_serve_peer.py --version-dir model_repository/classifier_int8/1 --port 8123
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version-dir", type=Path, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.005)
    p.add_argument("--max-ongoing-requests", type=int, default=128)
    args = p.parse_args(argv)

    import numpy as np
    import ray
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    vdir = args.version_dir.resolve()

    @serve.deployment(num_replicas=1, max_ongoing_requests=args.max_ongoing_requests, ray_actor_options={"num_cpus": 1})
    class Classifier:
        def __init__(self) -> None:
            import onnxruntime as ort
            from tokenizers import Tokenizer

            meta = json.loads((vdir / "labels.json").read_text())
            self.labels = meta["labels"]
            self.tok = Tokenizer.from_file(str(vdir / "tokenizer.json"))
            self.tok.enable_truncation(meta["max_length"])
            self.tok.enable_padding()  # pad each batch to its longest text, like the gateway
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 2
            self.sess = ort.InferenceSession(str(vdir / "model.onnx"), opts, providers=["CPUExecutionProvider"])

        @serve.batch(max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s)
        async def classify(self, texts: list[str]) -> list[dict]:
            encs = self.tok.encode_batch(texts)
            ids = np.asarray([e.ids for e in encs], dtype=np.int64)
            mask = np.asarray([e.attention_mask for e in encs], dtype=np.int64)
            (logits,) = self.sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})
            z = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs = z / z.sum(axis=1, keepdims=True)
            return [{"label": self.labels[int(r.argmax())], "score": float(r.max())} for r in probs]

        async def __call__(self, request: Request) -> JSONResponse:
            if request.url.path.rstrip("/") == "/healthz":
                return JSONResponse({"status": "alive"})
            body = await request.json()
            return JSONResponse(await self.classify(body["text"]))

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ray.init(
        num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(Classifier.bind(), route_prefix="/", blocking=False)
        print(f"ray serve peer ready at http://127.0.0.1:{args.port}", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
