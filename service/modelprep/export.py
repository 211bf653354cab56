"""ONNX export of the merged classifier with dynamic batch and sequence axes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from .config import ExportConfig, config_to_dict
from .errors import PrepError

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"


def load_merged(merged_dir: Path):
    """The merged model (eager attention: a plain graph that ONNX Runtime's quantizer understands) and tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    merged_dir = Path(merged_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(merged_dir / "model"), local_files_only=True, attn_implementation="eager"
    )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir / "tokenizer"), local_files_only=True)
    return model, tokenizer


def ort_session(path: Path, threads: int | None = None):
    """A CPU ONNX Runtime session with full graph optimizations."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # No busy-waiting between runs, as served (the Triton model's allow_spinning=0): an idle session's spinning
    # threads would otherwise steal cores from the next one measured.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def onnx_logits(session, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> np.ndarray:
    """Logits of an ONNX classifier on texts, batched by length, in the original order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[np.ndarray | None] = [None] * len(texts)
    for s in range(0, len(order), batch_size):
        ids = order[s : s + batch_size]
        enc = tokenizer(
            [texts[i] for i in ids], padding=True, truncation=True, max_length=max_length, return_tensors="np"
        )
        feeds = {
            "input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64),
        }
        logits = session.run([OUTPUT_NAME], feeds)[0]
        for k, i in enumerate(ids):
            out[i] = logits[k]
    return np.stack(out).astype(np.float32)


def export_onnx(cfg: ExportConfig, merged_dir: Path, output_path: Path, parity_texts: list[str]) -> Path:
    """Export the merged model to ONNX FP32 and check ONNX Runtime against torch on ``parity_texts``.

    Returns:
        ``output_path`` (a ``.onnx`` file); ``<output_path>.json`` holds the export provenance and parity.

    Raises:
        PrepError: the exported model disagrees with torch beyond ``cfg.parity_tolerance``.
    """
    import torch

    merged_dir, output_path = Path(merged_dir), Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_merged(merged_dir)
    meta = json.loads((merged_dir / "merge.json").read_text())
    max_length = int(meta["max_length"])
    sample = tokenizer(["what is an example question ?", "a"], padding=True, return_tensors="pt")
    args = (sample["input_ids"], sample["attention_mask"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        kwargs = dict(
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            opset_version=cfg.opset,
            do_constant_folding=True,
        )
        if cfg.dynamo:
            batch = torch.export.Dim("batch", min=1, max=1024)
            seq = torch.export.Dim("sequence", min=1, max=512)
            torch.onnx.export(
                model,
                args,
                str(output_path),
                dynamo=True,
                dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
                **kwargs,
            )
        else:
            torch.onnx.export(
                model,
                args,
                str(output_path),
                dynamo=False,
                dynamic_axes={
                    "input_ids": {0: "batch", 1: "sequence"},
                    "attention_mask": {0: "batch", 1: "sequence"},
                    OUTPUT_NAME: {0: "batch"},
                },
                **kwargs,
            )
    with torch.no_grad():
        ref = []
        for s in range(0, len(parity_texts), 64):
            enc = tokenizer(
                parity_texts[s : s + 64], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            ref.append(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.numpy())
    ref_logits = np.concatenate(ref) if ref else np.zeros((0,))
    got = onnx_logits(ort_session(output_path), tokenizer, parity_texts, max_length)
    diff = float(np.abs(got - ref_logits).max()) if len(parity_texts) else 0.0
    if diff > cfg.parity_tolerance:
        raise PrepError(f"ONNX export disagrees with torch: max |logit diff| {diff:.3g} > {cfg.parity_tolerance}")
    output_path.with_suffix(".json").write_text(
        json.dumps(
            {
                "config": config_to_dict(cfg),
                "source": str(merged_dir),
                "parity_max_abs_logit_diff_vs_torch": diff,
                "parity_texts": len(parity_texts),
                "labels": meta["labels"],
                "max_length": max_length,
                "data_hash": meta.get("data_hash"),
            },
            indent=2,
        )
    )
    return output_path
