"""ONNX export of :class:`~service.generator.kvmodel.KVCacheLM` (one graph, dynamic past) and its variants.

* FP32: ``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``, opset 17): it needs no
  ``onnxscript`` and is several times faster to run than the dynamo exporter on this CPU (docs/gateway.md §3 of
  the design notes). Batch, new-token count and past length are dynamic axes, so one graph does prefill
  (past 0) and decode (1 new token).
* INT8: ONNX Runtime dynamic quantization of the MatMul weights, per channel (the setting that kept the
  classifier closest to FP32); activations are quantized per call.
* FP16: the module is cast to half and exported again; inputs stay int64, logits and cache are float16.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .kvmodel import INPUT_NAMES_BASE, OUTPUT_LOGITS, KVCacheLM, StepFn, past_names, present_names

OPSET = 17


def _dummy_inputs(module: KVCacheLM, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    batch, seq, past = 2, 3, 4
    ids = torch.randint(0, 100, (batch, seq), dtype=torch.int64)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq).unsqueeze(0).expand(batch, seq).contiguous()
    cache = [
        torch.randn(batch, module.num_kv_heads, past, module.head_dim).to(dtype) for _ in range(2 * module.num_layers)
    ]
    return (ids, mask, pos, *cache)


def export_onnx(module: KVCacheLM, path: Path, *, fp16: bool = False) -> Path:
    """Export the module to ``path`` (weights of large models go to ``<path>.data``).

    Args:
        module: The model (LoRA merged); it is not modified (FP16 exports a half copy).
        path: Target ``.onnx`` file.
        fp16: Export in half precision.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if fp16 else torch.float32
    target = module
    if fp16:
        import copy

        target = copy.deepcopy(module).half()
    target.eval()
    n = module.num_layers
    inputs = [*INPUT_NAMES_BASE, *past_names(n)]
    outputs = [OUTPUT_LOGITS, *present_names(n)]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "new_tokens"},
        "attention_mask": {0: "batch", 1: "total_tokens"},
        "position_ids": {0: "batch", 1: "new_tokens"},
        OUTPUT_LOGITS: {0: "batch", 1: "logit_positions"},
    }
    for name in past_names(n):
        axes[name] = {0: "batch", 2: "past_tokens"}
    for name in present_names(n):
        axes[name] = {0: "batch", 2: "total_tokens"}
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            target,
            _dummy_inputs(module, dtype),
            str(tmp),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    _finalize(tmp, path)
    return path


def _finalize(tmp: Path, path: Path) -> None:
    """Move an exported model into place; models over 1.8 GB keep their weights in one external data file."""
    import onnx

    model = onnx.load(str(tmp))
    for stale in (path, path.with_name(path.name + ".data")):
        if stale.exists():
            stale.unlink()
    big = model.ByteSize() > 1_800_000_000
    if big:
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save_model(model, str(path))
    for leftover in tmp.parent.glob(tmp.name + "*"):
        leftover.unlink()
    if tmp.exists():
        tmp.unlink()


def quantize_int8(source: Path, target: Path) -> Path:
    """Dynamic INT8 (per-channel, symmetric weights) of every MatMul weight of ``source``.

    Args:
        source: FP32 ONNX model.
        target: Output path.

    Returns:
        ``target``.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(
        str(source),
        str(target),
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        weight_type=QuantType.QInt8,
    )
    return target


def ort_session(path: Path, threads: int = 2) -> Any:
    """An ONNX Runtime CPU session without busy-waiting threads (the machine is shared)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def ort_step(session: Any, num_layers: int) -> tuple[StepFn, Callable[[], list[Any]]]:
    """A :data:`~service.generator.kvmodel.StepFn` over an ONNX Runtime session, and its empty-cache factory."""
    names = past_names(num_layers)
    meta = {i.name: i for i in session.get_inputs()}
    first = meta[names[0]]
    kv_heads, head_dim = int(first.shape[1]), int(first.shape[3])
    dtype = np.float16 if "float16" in first.type else np.float32

    def empty() -> list[Any]:
        return [np.zeros((1, kv_heads, 0, head_dim), dtype=dtype) for _ in names]

    def step(ids: Any, mask: Any, pos: Any, past: list[Any]) -> tuple[Any, list[Any]]:
        feed = {"input_ids": np.asarray(ids), "attention_mask": np.asarray(mask), "position_ids": np.asarray(pos)}
        feed.update(zip(names, past, strict=True))
        out = session.run(None, feed)
        return np.asarray(out[0][:, -1, :], dtype=np.float32), list(out[1:])

    return step, empty


def np_rows(rows: list[list[int]]) -> np.ndarray:
    """Nested int lists as an int64 array (the ``as_array`` of greedy decoding on ONNX Runtime)."""
    return np.asarray(rows, dtype=np.int64)


def file_size_bytes(path: Path) -> int:
    """Size of an ONNX model including its external data file, if any."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def copy_model(source: Path, target: Path) -> None:
    """Copy an ONNX model (and its external data file) to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)
    data = source.with_name(source.name + ".data")
    if data.exists():
        shutil.copy2(data, target.with_name(target.name + ".data"))
    os.utime(target)
