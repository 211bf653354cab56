"""ONNX export of the merged classifier with dynamic batch and sequence axes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from .config import ExportConfig, config_to_dict
from .errors import PrepError
from .modeling import load_merged
from .onnxrt import INPUT_NAMES, OUTPUT_NAME, onnx_logits, ort_session
from .tokens import encode


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
    truncation = meta.get("truncation", "head")
    sample = tokenizer(["what is an example question ?", "a"], padding=True, return_tensors="pt")
    args = (sample["input_ids"], sample["attention_mask"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        kwargs = {
            "input_names": list(INPUT_NAMES),
            "output_names": [OUTPUT_NAME],
            "opset_version": cfg.opset,
            "do_constant_folding": True,
        }
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
            enc = encode(tokenizer, parity_texts[s : s + 64], max_length, truncation)
            ref.append(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.numpy())
    ref_logits = np.concatenate(ref) if ref else np.zeros((0,))
    got = onnx_logits(ort_session(output_path), tokenizer, parity_texts, max_length, truncation=truncation)
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
                "truncation": truncation,
                "data_hash": meta.get("data_hash"),
            },
            indent=2,
        )
    )
    return output_path
