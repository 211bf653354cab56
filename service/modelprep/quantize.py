"""Precision variants of the exported FP32 model: FP16 and INT8 (dynamic or static/calibrated)."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from .config import Fp16Config, QuantizeConfig, config_to_dict
from .errors import PrepError
from .fusion import fused_op_types
from .tokens import encode

log = logging.getLogger(__name__)


def convert_fp16(cfg: Fp16Config, fp32_path: Path, output_path: Path) -> Path:
    """Convert weights and most ops to FP16, keeping numerically fragile ops (LayerNorm, Softmax...) in FP32.

    On a CPU ONNX Runtime casts FP16 back to FP32 for most kernels, so this variant is about GPU speed and half
    the file size, not CPU speed.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    output_path = Path(output_path)
    model = onnx.load(str(fp32_path))
    converted = convert_float_to_float16(
        model,
        keep_io_types=cfg.keep_io_types,
        op_block_list=list(cfg.op_block_list),
        disable_shape_infer=False,
    )
    onnx.save(converted, str(output_path))
    _write_meta(output_path, fp32_path, {"fp16": config_to_dict(cfg)})
    return output_path


def _write_meta(output_path: Path, source: Path, extra: dict) -> None:
    src_meta = Path(source).with_suffix(".json")
    base = json.loads(src_meta.read_text()) if src_meta.is_file() else {}
    meta = {
        "source": str(source),
        "labels": base.get("labels"),
        "max_length": base.get("max_length"),
        "truncation": base.get("truncation", "head"),
        "data_hash": base.get("data_hash"),
        "export": base.get("config"),
        **extra,
    }
    Path(output_path).with_suffix(".json").write_text(json.dumps(meta, indent=2))


def _nodes_to_exclude(model_path: Path, cfg: QuantizeConfig) -> list[str]:
    """Names of nodes kept in FP32: attention activation x activation MatMuls and/or the classifier head."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    # weights can also reach a MatMul through a Transpose/Identity of an initializer
    const_outputs = {
        o
        for n in model.graph.node
        if n.op_type in ("Constant",) or (n.input and all(i in inits for i in n.input))
        for o in n.output
    }
    weights = inits | const_outputs
    out: list[str] = []
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        if (
            cfg.exclude_attention_matmuls
            and n.op_type == "MatMul"
            and not any(i in weights for i in n.input)
            or cfg.exclude_classifier
            and ("classifier" in n.name or any("classifier" in i for i in n.input))
        ):
            out.append(n.name)
    return out


class _Calibration:
    """An ONNX Runtime CalibrationDataReader over tokenized training texts."""

    def __init__(self, tokenizer, texts: list[str], max_length: int, truncation: str, batch_size: int = 16) -> None:
        self._batches = [
            encode(tokenizer, texts[s : s + batch_size], max_length, truncation, tensors="np")
            for s in range(0, len(texts), batch_size)
        ]
        self._it = iter(self._batches)

    def get_next(self):
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._batches)


def quantize_int8(
    cfg: QuantizeConfig,
    fp32_path: Path,
    output_path: Path,
    *,
    tokenizer=None,
    calibration_texts: list[str] | None = None,
    max_length: int = 64,
    truncation: str = "head",
) -> Path:
    """Quantize the FP32 ONNX model to INT8 with ONNX Runtime.

    Dynamic mode stores INT8 weights (per channel or per tensor, symmetric or not) and quantizes activations per
    batch at run time (UINT8, asymmetric). Static mode calibrates activation ranges once on ``calibration_texts``
    and writes a QDQ graph.

    Returns:
        ``output_path``; ``<output_path>.json`` records the recipe and which nodes stayed in FP32.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, output_path = Path(fp32_path), Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            # symbolic shape inference + ORT's basic optimizations make cleaner, better-quantizing graphs
            quant_pre_process(str(fp32_path), str(pre), auto_merge=True, skip_symbolic_shape=False)
        except Exception as e:  # noqa: BLE001 - pre-processing is an optimization; quantize the raw export if it fails
            log.warning("quant_pre_process failed (%s); quantizing the raw export", e)
            shutil.copy(fp32_path, pre)
        exclude = _nodes_to_exclude(pre, cfg)
        op_types = ["MatMul", "Gemm"] + (["Gather"] if cfg.quantize_embeddings else [])
        # A graph fused by fusion.fuse_graph holds its attention projections inside Attention and its embedding
        # tables inside EmbedLayerNormalization: name them too, or they stay FP32 (QAttention /
        # QEmbedLayerNormalization are ONNX Runtime's integer kernels for them; dynamic mode only).
        fused = sorted(fused_op_types(pre) & {"Attention", "EmbedLayerNormalization"}) if cfg.mode == "dynamic" else []
        if not cfg.quantize_embeddings:
            fused = [op for op in fused if op != "EmbedLayerNormalization"]
        op_types += fused
        weight_type = QuantType.QInt8 if cfg.weight_symmetric else QuantType.QUInt8
        extra = {"WeightSymmetric": cfg.weight_symmetric}
        if cfg.mode == "dynamic":
            quantize_dynamic(
                str(pre),
                str(output_path),
                per_channel=cfg.per_channel,
                reduce_range=cfg.reduce_range,
                weight_type=weight_type,
                op_types_to_quantize=op_types,
                nodes_to_exclude=exclude,
                extra_options=extra,
            )
        else:
            if tokenizer is None or not calibration_texts:
                raise PrepError("static INT8 quantization needs calibration texts and the tokenizer")
            texts = calibration_texts[: cfg.calibration_samples]
            method = {
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }[cfg.calibration_method]
            extra["ActivationSymmetric"] = cfg.activation_symmetric
            quantize_static(
                str(pre),
                str(output_path),
                _Calibration(tokenizer, texts, max_length, truncation),
                quant_format=QuantFormat.QDQ,
                per_channel=cfg.per_channel,
                reduce_range=cfg.reduce_range,
                activation_type=QuantType.QInt8 if cfg.activation_symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8 if cfg.weight_symmetric else QuantType.QUInt8,
                op_types_to_quantize=op_types,
                nodes_to_exclude=exclude,
                calibrate_method=method,
                extra_options=extra,
            )
    _write_meta(
        output_path,
        fp32_path,
        {"int8": config_to_dict(cfg), "tag": cfg.tag, "kept_fp32_nodes": exclude, "quantized_fused_ops": fused},
    )
    return output_path
