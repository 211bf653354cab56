"""GPU check of the classifier: the merged model in FP32 and FP16 on the GPU, and the served ONNX files where the
installed ONNX Runtime can use it.

Two steps, on two machines:

``bundle`` (here, in the project's environment) packs what the GPU machine needs into one folder of at most
64 MiB: the merged model's weights in FP16 (``bundle.pt``: a plain ``torch.save`` of tensors, read with
``weights_only=True``), the build's test set as token ids with its labels, and the served ONNX files that fit. The
word-embedding table is cut to the tokens the test set uses (ids remapped, the kept rows unchanged, so the logits
are the same): MiniLM's 30,522 x 384 table alone is 22 MiB in FP16, and without the cut the FP16 weights and the
INT8 file would not fit together. The same cut is applied to the ONNX files' embedding initializer where the graph
allows it (a ``Gather`` of ``input_ids`` from an initializer, directly or through a per-tensor
``DequantizeLinear``, or the fused graph's ``EmbedLayerNormalization`` / ``QEmbedLayerNormalization``); a file that cannot be cut travels whole if it fits, with the original ids beside it.

``run`` (the GPU machine: only ``torch``, and ``onnxruntime`` for the ONNX part; no network, no ``transformers``)
rebuilds the BERT encoder + pooler + classification head in plain PyTorch (``TorchBert``, checked against
``transformers`` in the tests) and measures, within a time budget (default 240 s, so the whole script stays under
5 minutes):

- test-set accuracy of FP32 and FP16, and FP16 vs FP32 agreement (top-1, max and mean |logit difference|);
- sequences/s at batch 1-256 for each (test texts cycled, padded to the batch's longest, best of ``--repeats``
  timed loops of ``--seconds``), with the peak GPU memory;
- the same for every bundled ONNX file with ONNX Runtime's CUDA provider when ``onnxruntime`` has it (the providers the
  session kept are recorded); otherwise the reason it was skipped. INT8 dynamic quantization (MatMulInteger/DynamicQuantizeLinear) is a CPU format: ONNX Runtime runs
  most of it on the CPU even with the CUDA provider, which is why the GPU chart serves FP16.

Usage::

    .venv/bin/python bench/gpu/classifier_check.py bundle --workdir artifacts/default --out bench/gpu/bundle
    # copy bench/gpu/ (script + bundle) to the GPU machine, then
    bash bench/gpu/classifier_check.sh --bundle bench/gpu/bundle

``run --device cpu`` is the CPU dry run the test suite does (tests/modelprep/test_gpu_classifier_check.py). JSON goes
to ``--out`` (default ``$OUT/classifier_check.json`` when ``$OUT`` is set, else ``bench/gpu/results/``).
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
from torch import nn
from torch.nn import functional

ROOT = Path(__file__).resolve().parents[2]
BUNDLE_LIMIT_BYTES = 64 * 2**20
BUNDLE_FORMAT = 1
DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ONNX_FILES = ("fp16", "int8")  # what a bundle tries to bring along, in this order of preference


# ------------------------------------------------------------------------------------------------ the model


class TorchBert(nn.Module):
    """BERT encoder, pooler and classification head (``BertForSequenceClassification``'s inference path).

    Post-LayerNorm blocks, absolute position embeddings, token type 0, GELU (erf), attention over the right-padded
    mask; dropout is absent (inference only). Names follow ``transformers`` after the ``bert.`` prefix, so a
    merged checkpoint loads with ``load_hf_state_dict``.
    """

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        h, self.heads = cfg["hidden_size"], cfg["num_attention_heads"]
        self.eps = cfg.get("layer_norm_eps", 1e-12)
        self.word = nn.Embedding(cfg["vocab_size"], h)
        self.position = nn.Embedding(cfg["max_position_embeddings"], h)
        self.token_type = nn.Embedding(cfg.get("type_vocab_size", 2), h)
        self.embed_norm = nn.LayerNorm(h, eps=self.eps)
        self.layers = nn.ModuleList(
            _Layer(h, cfg["intermediate_size"], self.eps) for _ in range(cfg["num_hidden_layers"])
        )
        self.pooler = nn.Linear(h, h)
        self.classifier = nn.Linear(h, cfg["num_labels"])

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word(ids) + self.position(positions)[None] + self.token_type.weight[0]
        x = self.embed_norm(x)
        # Additive mask: 0 where attended, the dtype's lowest where padded (as transformers does).
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, bias, self.heads)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


class _Layer(nn.Module):
    def __init__(self, hidden: int, intermediate: int, eps: float) -> None:
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.inter = nn.Linear(hidden, intermediate)
        self.out = nn.Linear(intermediate, hidden)
        self.out_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, heads: int) -> torch.Tensor:
        b, s, h = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, heads, h // heads).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        att = functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = self.attn_norm(x + self.attn_out(att.transpose(1, 2).reshape(b, s, h)))
        return self.out_norm(x + self.out(functional.gelu(self.inter(x))))


_HF_LAYER_NAMES = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "inter",
    "output.dense": "out",
    "output.LayerNorm": "out_norm",
}
_HF_TOP_NAMES = {
    "bert.embeddings.word_embeddings": "word",
    "bert.embeddings.position_embeddings": "position",
    "bert.embeddings.token_type_embeddings": "token_type",
    "bert.embeddings.LayerNorm": "embed_norm",
    "bert.pooler.dense": "pooler",
    "classifier": "classifier",
}


def hf_to_torch_bert_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``BertForSequenceClassification`` state-dict names -> ``TorchBert`` names (unused buffers dropped)."""
    out = {}
    for name, tensor in state.items():
        stem, _, leaf = name.rpartition(".")
        if stem in _HF_TOP_NAMES:
            out[f"{_HF_TOP_NAMES[stem]}.{leaf}"] = tensor
        elif stem.startswith("bert.encoder.layer."):
            index, _, rest = stem.removeprefix("bert.encoder.layer.").partition(".")
            out[f"layers.{index}.{_HF_LAYER_NAMES[rest]}.{leaf}"] = tensor
    return out


# ------------------------------------------------------------------------------------------------ bundle


def make_bundle(workdir: Path, out: Path, report_path: Path | None = None) -> dict:
    """Pack a build's merged model, test set and served ONNX files into ``out`` (<= 64 MiB). Needs the prep extra."""
    import numpy as np
    from safetensors.torch import load_file

    from service.modelprep.config import DataConfig
    from service.modelprep.data import load_dataset
    from service.modelprep.modeling import load_tokenizer
    from service.modelprep.tokens import encode

    workdir = Path(workdir)
    merged = workdir / "merged"
    hf_cfg = json.loads((merged / "model" / "config.json").read_text())
    if hf_cfg.get("model_type") != "bert":
        raise SystemExit(f"bundle: only BERT-family classifiers are supported, not {hf_cfg.get('model_type')!r}")
    meta = json.loads((merged / "merge.json").read_text())
    report_path = report_path or workdir / "report" / "report.json"
    data_cfg = DataConfig(**json.loads(report_path.read_text())["config"]["data"])
    dataset = load_dataset(data_cfg)
    labels = meta["labels"]
    if list(dataset.label_names) != list(labels):
        raise SystemExit(f"bundle: the data's labels {dataset.label_names} differ from the model's {labels}")
    if meta.get("data_hash") and meta["data_hash"] != dataset.data_hash:
        raise SystemExit("bundle: the data reloaded from the report's config is not the data the model was trained on")
    tokenizer = load_tokenizer(merged / "tokenizer")
    enc = encode(tokenizer, dataset.test.texts, int(meta["max_length"]), meta.get("truncation", "head"), tensors="np")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    rows = ids
    special = set(tokenizer.all_special_ids)
    kept = np.array(sorted(set(np.unique(ids).tolist()) | special | {0}), dtype=np.int64)
    remap = np.full(int(hf_cfg["vocab_size"]), -1, dtype=np.int64)
    remap[kept] = np.arange(len(kept))

    state = hf_to_torch_bert_names(load_file(str(merged / "model" / "model.safetensors")))
    state["word.weight"] = state["word.weight"][torch.from_numpy(kept)]
    cfg = {
        k: hf_cfg[k]
        for k in (
            "hidden_size",
            "num_attention_heads",
            "num_hidden_layers",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
            "layer_norm_eps",
        )
    }
    cfg.update(vocab_size=len(kept), num_labels=len(labels), original_vocab_size=int(hf_cfg["vocab_size"]))
    test_labels = np.asarray(dataset.test.labels, dtype=np.int64)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.onnx"):
        stale.unlink()
    payload = {
        "format": BUNDLE_FORMAT,
        "config": cfg,
        "labels": labels,
        "state_dict_fp16": {k: v.half().contiguous() for k, v in state.items()},
        "test_ids": torch.from_numpy(remap[ids]).to(torch.int32),
        "test_ids_original": torch.from_numpy(ids).to(torch.int32),
        "test_mask": torch.from_numpy(mask).to(torch.uint8),
        "test_labels": torch.from_numpy(test_labels),
    }
    torch.save(payload, out / "bundle.pt")
    used = (out / "bundle.pt").stat().st_size
    files, left_out = {}, {}
    for variant in ONNX_FILES:
        source = _served_onnx(workdir, variant)
        if source is None:
            left_out[variant] = "not built"
            continue
        target = out / f"model_{variant}.onnx"
        vocab = _write_onnx_cut(source, target, kept, int(hf_cfg["vocab_size"]))
        size = target.stat().st_size
        if used + size > BUNDLE_LIMIT_BYTES:
            target.unlink()
            left_out[variant] = f"{size / 2**20:.1f} MiB would take the bundle over 64 MiB"
            continue
        used += size
        files[variant] = {"file": target.name, "vocab": vocab, "source": str(source), "mib": round(size / 2**20, 1)}
    manifest = {
        "format": BUNDLE_FORMAT,
        "workdir": str(workdir),
        "dataset": dataset.name,
        "test_texts": len(rows),
        "max_length": int(meta["max_length"]),
        "kept_vocabulary": len(kept),
        "onnx": files,
        "left_out": left_out,
        "bundle_mib": round(used / 2**20, 1),
        "reported_test_accuracy": _reported_accuracy(report_path),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _served_onnx(workdir: Path, variant: str) -> Path | None:
    if variant == "fp16":
        path = workdir / "fp16" / "fp16.onnx"
        return path if path.is_file() else None
    served = sorted((workdir / "int8").glob("*/model.onnx"))
    return served[0] if len(served) == 1 else None


def _reported_accuracy(report_path: Path) -> dict[str, float]:
    """Test accuracy per variant as the build's own evaluation reported it (the check must reproduce FP32's)."""
    variants = json.loads(report_path.read_text()).get("variants") or []
    return {v["name"]: float(v["accuracy"]) for v in variants if isinstance(v.get("accuracy"), (int, float))}


def _write_onnx_cut(source: Path, target: Path, kept, vocab_size: int) -> str:
    """Copy an ONNX file with its word-embedding rows cut to ``kept``; ``"cut"``, or ``"full"`` when not possible."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}

    def is_input_ids(name: str) -> bool:  # the graph input, perhaps through Casts (the fused graph takes INT32)
        while name in producers and producers[name].op_type == "Cast":
            name = producers[name].input[0]
        return name == "input_ids"

    for node in graph.node:
        if node.op_type == "Gather" and is_input_ids(node.input[1]):
            data = node.input[0]
        elif node.op_type in ("EmbedLayerNormalization", "QEmbedLayerNormalization") and is_input_ids(node.input[0]):
            data = node.input[2]  # the fused graph's embedding node (the quantized one has per-tensor scales)
        else:
            continue
        if data in producers and producers[data].op_type == "DequantizeLinear":
            dq = producers[data]
            scale = inits.get(dq.input[1])
            if scale is None or int(np.prod(scale.dims)) != 1:
                break  # per-row scales would need cutting too: leave the file whole
            data = dq.input[0]
        table = inits.get(data)
        if table is None or not table.dims or table.dims[0] != vocab_size:
            break
        array = numpy_helper.to_array(table)[kept]
        table.CopyFrom(numpy_helper.from_array(array, table.name))
        onnx.save(model, str(target))
        return "cut"
    onnx.save(model, str(target))
    return "full"


# ------------------------------------------------------------------------------------------------ run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe_device(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
        )
    else:
        info.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        info["onnxruntime"] = None
    return info


def _batches(ids: torch.Tensor, mask: torch.Tensor, size: int):
    """Consecutive test rows ``size`` at a time, trimmed to the batch's longest (as the gateway pads)."""
    for start in range(0, ids.shape[0], size):
        m = mask[start : start + size]
        width = int(m.sum(1).max())
        yield ids[start : start + size, :width], m[:, :width]


def _timing_feeds(ids: torch.Tensor, mask: torch.Tensor, batch: int, count: int = 8):
    """Up to ``count`` batches of exactly ``batch`` rows, test rows cycled."""
    n = ids.shape[0]
    feeds = []
    for k in range(count):
        rows = torch.arange(k * batch, (k + 1) * batch) % n
        m = mask[rows]
        width = int(m.sum(1).max())
        feeds.append((ids[rows, :width], m[:, :width]))
    return feeds


def _time_loop(step, feeds, seconds: float, repeats: int, sync) -> float:
    step(*feeds[0])  # warm-up: kernels, allocator, cudnn/cublas plans
    sync()
    best = 0.0
    for _ in range(repeats):
        n, i = 0, 0
        sync()
        t0 = time.perf_counter()
        while True:
            ids, _ = feeds[i % len(feeds)]
            step(*feeds[i % len(feeds)])
            n += ids.shape[0]
            i += 1
            if i % len(feeds) == 0 or time.perf_counter() - t0 >= seconds:
                sync()
                if time.perf_counter() - t0 >= seconds:
                    break
        best = max(best, n / (time.perf_counter() - t0))
    return best


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return round(float((logits.argmax(1) == labels).float().mean()), 4)


def _agreement(a: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    diff = (a.float() - reference.float()).abs()
    return {
        "top1_agreement": round(float((a.argmax(1) == reference.argmax(1)).float().mean()), 4),
        "max_abs_logit_diff": round(float(diff.max()), 5),
        "mean_abs_logit_diff": round(float(diff.mean()), 6),
    }


def run(args: argparse.Namespace) -> dict[str, object]:
    started = time.perf_counter()
    device = torch.device(args.device)
    bundle = torch.load(args.bundle / "bundle.pt", map_location="cpu", weights_only=True)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    if bundle["format"] != BUNDLE_FORMAT:
        raise SystemExit(f"bundle format {bundle['format']} is not {BUNDLE_FORMAT}: rebuild it with this script")
    ids = bundle["test_ids"].long()
    mask = bundle["test_mask"].long()
    labels = bundle["test_labels"]
    if args.limit:
        ids, mask, labels = ids[: args.limit], mask[: args.limit], labels[: args.limit]
    models = {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        model = TorchBert(bundle["config"])
        model.load_state_dict({k: v.float() for k, v in bundle["state_dict_fp16"].items()})
        models[name] = model.to(device=device, dtype=dtype).eval()

    def over_budget() -> bool:
        return time.perf_counter() - started > args.budget_seconds

    rows, skipped, logits = [], [], {}

    def sync() -> None:
        _sync(device)

    with torch.inference_mode():
        for name, model in models.items():
            out = [model(i.to(device), m.to(device)).float().cpu() for i, m in _batches(ids, mask, 64)]
            logits[name] = torch.cat(out)
        for name, model in models.items():
            for batch in args.batches:
                if over_budget():
                    skipped.append(f"torch {name} batch {batch}")
                    continue
                feeds = [(i.to(device), m.to(device)) for i, m in _timing_feeds(ids, mask, batch)]
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                rate = _time_loop(lambda i, m, model=model: model(i, m), feeds, args.seconds, args.repeats, sync)
                row = {"engine": "torch", "dtype": name, "batch": batch, "sequences_per_second": round(rate, 1)}
                if device.type == "cuda":
                    row["peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                rows.append(row)
    quality = {
        name: {"accuracy": _accuracy(value, labels), **({} if name == "fp32" else _agreement(value, logits["fp32"]))}
        for name, value in logits.items()
    }
    onnx_results = _run_onnx(args, manifest, bundle, ids, mask, labels, logits["fp32"], rows, skipped, over_budget)
    return {
        "check": "classifier_gpu",
        "bundle": {k: manifest[k] for k in ("dataset", "test_texts", "max_length", "kept_vocabulary", "bundle_mib")},
        "bundle_left_out": manifest.get("left_out", {}),
        "reported_test_accuracy": manifest.get("reported_test_accuracy", {}),
        "parameters": sum(p.numel() for p in models["fp32"].parameters()),
        "settings": {
            "batches": list(args.batches),
            "seconds": args.seconds,
            "repeats": args.repeats,
            "test_texts_used": int(ids.shape[0]),
            "timing": "best of repeats; test texts cycled, each batch padded to its longest; tokenization not timed",
        },
        "machine": describe_device(device),
        "quality": quality,
        "onnx": onnx_results,
        "rows": rows,
        "skipped_over_budget": skipped,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def _run_onnx(args, manifest, bundle, ids, mask, labels, reference, rows, skipped, over_budget) -> dict:
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError:
        return {"skipped": "onnxruntime is not installed"}
    available = ort.get_available_providers()
    if args.device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            return {"skipped": f"the installed onnxruntime has no CUDA provider (it has {available})"}
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    original = bundle["test_ids_original"].long()[: ids.shape[0]]
    results = {}
    for variant, info in manifest["onnx"].items():
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(args.bundle / info["file"]), opts, providers=providers)
        source = ids if info["vocab"] == "cut" else original

        def step(i, m, sess=sess):
            return sess.run(["logits"], {"input_ids": i.numpy(), "attention_mask": m.numpy()})[0]

        out = np.concatenate([step(i, m) for i, m in _batches(source, mask, 64)])
        got = torch.from_numpy(out).float()
        results[variant] = {
            "providers": sess.get_providers(),
            "vocab": info["vocab"],
            "accuracy": _accuracy(got, labels),
            **{f"vs_torch_fp32_{k}": v for k, v in _agreement(got, reference).items()},
        }
        for batch in args.batches:
            if over_budget():
                skipped.append(f"onnx {variant} batch {batch}")
                continue
            rate = _time_loop(step, _timing_feeds(source, mask, batch), args.seconds, args.repeats, lambda: None)
            rows.append(
                {"engine": "onnxruntime", "dtype": variant, "batch": batch, "sequences_per_second": round(rate, 1)}
            )
    for variant, why in manifest.get("left_out", {}).items():
        results.setdefault(variant, {"skipped": f"not in the bundle: {why}"})
    return results


def render(report: dict) -> str:
    m = report["machine"]
    lines = [
        (
            f"classifier check on {m.get('gpu') or m.get('cpu')} (torch {m['torch']}, "
            f"onnxruntime {m.get('onnxruntime')}), {report['parameters']:,} parameters, "
            f"{report['settings']['test_texts_used']} test texts"
        ),
        f"{'engine':<12}{'dtype':<6}" + "".join(f"{'b' + str(b):>9}" for b in report["settings"]["batches"]),
    ]
    series: dict[tuple[str, str], dict[int, float]] = {}
    for r in report["rows"]:
        series.setdefault((r["engine"], r["dtype"]), {})[r["batch"]] = r["sequences_per_second"]
    for (engine, dtype), values in series.items():
        cells = "".join(f"{values.get(b, '-')!s:>9}" for b in report["settings"]["batches"])
        lines.append(f"{engine:<12}{dtype:<6}{cells}")
    lines.append("sequences/s; quality on the test set:")
    for name, q in report["quality"].items():
        lines.append(f"  torch {name}: " + ", ".join(f"{k} {v}" for k, v in q.items()))
    for name, q in report["onnx"].items():
        lines.append(f"  onnx {name}: " + ", ".join(f"{k} {v}" for k, v in q.items()))
    if report["skipped_over_budget"]:
        lines.append(f"skipped (time budget): {', '.join(report['skipped_over_budget'])}")
    lines.append(f"wall {report['wall_seconds']} s")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bundle", help="pack a build for the GPU machine (here, with the prep extra installed)")
    b.add_argument("--workdir", type=Path, default=ROOT / "artifacts" / "default", help="a build's work directory")
    b.add_argument("--report", type=Path, default=None, help="its report.json (default: <workdir>/report/report.json)")
    b.add_argument("--out", type=Path, default=ROOT / "bench" / "gpu" / "bundle")
    r = sub.add_parser("run", help="measure (on the GPU machine; --device cpu is the dry run)")
    r.add_argument("--bundle", type=Path, default=ROOT / "bench" / "gpu" / "bundle")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--batches", type=int, nargs="+", default=list(DEFAULT_BATCHES))
    r.add_argument("--seconds", type=float, default=1.0, help="timed loop per batch size and repeat")
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--limit", type=int, default=0, help="use only the first N test texts (0: all)")
    r.add_argument("--budget-seconds", type=float, default=240.0, help="skip the remaining timings after this long")
    r.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.command == "run" and args.out is None:
        out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "gpu" / "results"
        args.out = out_dir / (
            "classifier_check.json" if args.device.startswith("cuda") else "classifier_check_cpu.json"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "bundle":
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        manifest = make_bundle(args.workdir, args.out, args.report)
        print(json.dumps(manifest, indent=2))
        return 0
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
