"""ONNX Runtime helpers shared by export, quantization, evaluation and compression: sessions and logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .tokens import encode, length_sorted_chunks

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"


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


def onnx_logits(
    session, tokenizer, texts: list[str], max_length: int, batch_size: int = 64, truncation: str = "head"
) -> np.ndarray:
    """Logits of an ONNX classifier on texts, batched by length, in the original order."""
    out: list[np.ndarray | None] = [None] * len(texts)
    for ids in length_sorted_chunks(texts, batch_size):
        feeds = encode(tokenizer, [texts[i] for i in ids], max_length, truncation, tensors="np")
        logits = session.run([OUTPUT_NAME], feeds)[0]
        for k, i in enumerate(ids):
            out[i] = logits[k]
    return np.stack(out).astype(np.float32)
