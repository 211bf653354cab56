"""ONNX Runtime's transformer optimizer on the FP32 export: fused attention, LayerNorm and GELU before INT8.

ONNX Runtime documents this order for quantized transformers: optimize the FP32 graph (``onnxruntime.transformers
.optimizer``), then quantize it, so that the whole attention block becomes one ``QAttention`` kernel and the
embedding lookup one ``QEmbedLayerNormalization`` instead of ~40 small ops per layer. ONNX Runtime's own session
optimizations cannot do this after quantization: they no longer recognize the attention pattern once its MatMuls
are ``MatMulInteger``.

Two choices keep the served contract: the fused ``Attention`` takes the raw 2-D ``attention_mask`` (the optimizer's
default, a per-row token count, silently assumes right padding and gives wrong logits for any other mask), and the
optimizer runs at ``opt_level=0`` (its Python fusions only): levels 1/2/99 gave the same fusions on MiniLM but level
2+ bakes CPU-specific ops into the file, and the session applies ONNX Runtime's own optimizations at load anyway.

Whatever the optimizer does, the fused graph is kept only if its inputs keep their dynamic batch and sequence axes
and its logits match the unfused export within ``FUSED_PARITY_TOLERANCE`` on real texts and on probe shapes
(batch 1 / length 1, odd lengths, right and left padding). Otherwise the build warns and goes on unfused.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np

from .onnxrt import INPUT_NAMES, OUTPUT_NAME, ort_session

log = logging.getLogger(__name__)

#: max |logit difference| between the fused and the unfused FP32 graph (measured: ~1e-6 on MiniLM)
FUSED_PARITY_TOLERANCE = 1e-4
#: the optimizer's level: Python fusions only (portable; see the module docstring)
OPT_LEVEL = 0
#: bump when the fusion recipe changes, so cached fused graphs are rebuilt
FUSION_VERSION = 1
#: the fused operators worth naming in the report
FUSED_OPS = (
    "EmbedLayerNormalization",
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "BiasGelu",
    "Gelu",
    "FastGelu",
    "SkipSimplifiedLayerNormalization",
)
#: (batch, sequence, padding) probe shapes checked beside the real parity texts
PROBE_SHAPES = ((1, 1, "right"), (1, 9, "right"), (3, 17, "right"), (5, 31, "left"), (16, 64, "right"))


def model_dimensions(model_dir: Path) -> dict:
    """``model_type``, ``num_heads``, ``hidden_size``, ``vocab_size`` from a Hugging Face ``config.json`` (in
    ``model_dir`` or, for the merge stage's layout, ``model_dir/model``)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        path = Path(model_dir) / "model" / "config.json"
    cfg = json.loads(path.read_text())
    return {
        "model_type": cfg.get("model_type", "bert"),
        "num_heads": int(cfg.get("num_attention_heads", 0)),
        "hidden_size": int(cfg.get("hidden_size", 0)),
        "vocab_size": int(cfg.get("vocab_size", 1000)),
    }


def graph_ops(path: Path) -> Counter:
    """Node count per op type of an ONNX file."""
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def probe_feeds(vocab_size: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Random token ids at ``PROBE_SHAPES``, padded (id 0, mask 0) on the right or the left to random lengths."""
    rng = np.random.default_rng(seed)
    feeds = []
    for batch, seq, side in PROBE_SHAPES:
        ids = rng.integers(1000, max(1001, vocab_size - 1), size=(batch, seq)).astype(np.int64)
        mask = np.ones((batch, seq), np.int64)
        lengths = rng.integers(1, seq + 1, size=batch)
        lengths[0] = seq  # the batch's longest fills the row, as the gateway pads
        for i, n in enumerate(lengths):
            mask[i, n:] = 0
            ids[i, n:] = 0
        if side == "left":
            ids, mask = ids[:, ::-1].copy(), mask[:, ::-1].copy()
        feeds.append({"input_ids": ids, "attention_mask": mask})
    return feeds


def _dynamic_axes_kept(model) -> str | None:
    """None if every input keeps symbolic [batch, sequence] axes and the output a symbolic batch; else why not."""
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name not in (*INPUT_NAMES, OUTPUT_NAME):
            continue
        dims = value.type.tensor_type.shape.dim
        wanted = 2 if value.name in INPUT_NAMES else 1
        fixed = [d.dim_value for d in dims[:wanted] if not d.dim_param]
        if fixed:
            return f"{value.name} has fixed dimensions {fixed}"
    return None


def max_logit_diff(a: Path, b: Path, feeds: list[dict[str, np.ndarray]], threads: int | None = None) -> float:
    """max |logit difference| of two ONNX classifiers over the feeds."""
    sa, sb = ort_session(a, threads), ort_session(b, threads)
    diff = 0.0
    for f in feeds:
        la = sa.run([OUTPUT_NAME], f)[0]
        lb = sb.run([OUTPUT_NAME], f)[0]
        diff = max(diff, float(np.abs(la - lb).max()))
    return diff


def fuse_graph(
    fp32_path: Path,
    output_path: Path,
    model_dir: Path,
    parity_feeds: list[dict[str, np.ndarray]] = (),
    *,
    tolerance: float = FUSED_PARITY_TOLERANCE,
) -> dict:
    """Run ONNX Runtime's transformer optimizer on the FP32 export and keep the result only if it is faithful.

    Args:
        fp32_path: the unfused FP32 export.
        output_path: where the fused graph goes (written only when it is kept).
        model_dir: the Hugging Face model directory the export came from (``config.json``: heads, hidden size).
        parity_feeds: real tokenized batches (right-padded, as served) checked beside the probe shapes.
        tolerance: max |logit difference| accepted against the unfused graph.

    Returns:
        What happened, for the report: ``applied`` (bool), ``reason`` (why not, when not), ``fused_operators``
        (fused op counts), ``nodes_before``/``nodes_after``, ``parity_max_abs_logit_diff_vs_unfused``,
        ``parity_batches``, ``opt_level``, ``attention_mask_format``, ``seconds``. A ``.json`` of it is written
        next to ``output_path`` (under ``graph_optimization``, beside the source export's provenance).
    """
    fp32_path, output_path = Path(fp32_path), Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    dims = model_dimensions(model_dir)
    meta: dict = {
        "applied": False,
        "reason": "",
        "optimizer": "onnxruntime.transformers.optimizer.optimize_model",
        "optimizer_model_type": "bert",
        "base_model_type": dims["model_type"],
        "num_heads": dims["num_heads"],
        "hidden_size": dims["hidden_size"],
        "opt_level": OPT_LEVEL,
        "attention_mask_format": "2-D attention mask (any padding)",
        "fusion_version": FUSION_VERSION,
        "tolerance": tolerance,
        "fused_operators": {},
        "nodes_before": sum(graph_ops(fp32_path).values()),
        "nodes_after": None,
        "parity_max_abs_logit_diff_vs_unfused": None,
        "parity_batches": 0,
    }
    t0 = time.perf_counter()
    try:
        meta.update(_fuse(fp32_path, output_path, dims, list(parity_feeds), tolerance))
    except Exception as e:  # noqa: BLE001 - the optimizer is an optimization: any failure means serve unfused
        meta["reason"] = f"optimizer failed: {type(e).__name__}: {e}"
    if not meta["applied"]:
        output_path.unlink(missing_ok=True)
        log.warning("graph optimization not applied (%s); the unfused export is used", meta["reason"])
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    # the fused graph's .json carries its source's provenance (labels, lengths, export config) like every variant's,
    # so what is derived from it (INT8) keeps it too; the fusion record sits under "graph_optimization"
    src_meta = fp32_path.with_suffix(".json")
    base = json.loads(src_meta.read_text()) if src_meta.is_file() else {}
    output_path.with_suffix(".json").write_text(
        json.dumps({**base, "fused_from": str(fp32_path), "graph_optimization": meta}, indent=2)
    )
    return meta


def _fuse(fp32_path: Path, output_path: Path, dims: dict, parity_feeds: list, tolerance: float) -> dict:
    from onnxruntime.transformers.fusion_options import AttentionMaskFormat, FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.attention_mask_format = AttentionMaskFormat.AttentionMask
    # The optimizer logs every fusion at INFO and some misses at WARNING: keep the build's output readable.
    tlog = logging.getLogger("onnxruntime.transformers")
    level = tlog.level
    tlog.setLevel(logging.ERROR)
    try:
        opt = optimize_model(
            str(fp32_path),
            model_type="bert",
            num_heads=dims["num_heads"],
            hidden_size=dims["hidden_size"],
            optimization_options=options,
            opt_level=OPT_LEVEL,
        )
        stats = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v and k in FUSED_OPS}
    finally:
        tlog.setLevel(level)
    out = {"fused_operators": stats, "nodes_after": len(opt.model.graph.node)}
    # LayerNormalization is exported as one op at opset 17: only the fusions the optimizer adds count
    if not stats:
        return {**out, "reason": "the optimizer fused nothing in this graph"}
    baked = _dynamic_axes_kept(opt.model)
    if baked:
        return {**out, "reason": f"fused graph lost its dynamic axes: {baked}"}
    opt.save_model_to_file(str(output_path))
    feeds = list(parity_feeds) + probe_feeds(dims["vocab_size"])
    diff = max_logit_diff(fp32_path, output_path, feeds)
    out.update({"parity_max_abs_logit_diff_vs_unfused": diff, "parity_batches": len(feeds)})
    if not diff <= tolerance:
        return {**out, "reason": f"fused logits differ from the unfused graph by {diff:.3g} > {tolerance}"}
    return {**out, "applied": True}


def fused_op_types(path: Path) -> set[str]:
    """The fused transformer ops present in an ONNX graph (what the INT8 quantizer must be told to quantize)."""
    return set(graph_ops(path)) & set(FUSED_OPS)


def graph_optimization_lines(report: dict) -> list[str]:
    """Markdown lines of the report's graph-optimization section ([] when the report has none)."""
    g = report.get("graph_optimization")
    if not g:
        return []
    lines = ["", "## Graph optimization (ONNX Runtime transformer optimizer)", ""]
    if g.get("requested") == "none":
        return lines + ["Not requested (`--graph-optimization none`): INT8 was quantized from the unfused export."]
    if not g.get("applied"):
        return lines + [
            f"Requested but **not applied**: {g.get('reason')}. INT8 was quantized from the unfused export."
        ]
    ops = ", ".join(f"{k} ×{v}" for k, v in sorted(g["fused_operators"].items()))
    lines.append(
        f"Fused before INT8 quantization ({g['optimizer']}, model type {g['optimizer_model_type']}, "
        f"{g['num_heads']} heads, hidden {g['hidden_size']}, opt_level {g['opt_level']}, "
        f"{g['attention_mask_format']}): {ops}; {g['nodes_before']} → {g['nodes_after']} nodes. "
        f"Fused FP32 vs unfused FP32: max |Δlogit| {g['parity_max_abs_logit_diff_vs_unfused']:.3g} over "
        f"{g['parity_batches']} batches (real texts and probe shapes incl. left padding; tolerance "
        f"{g['tolerance']:g}). The `fp32-fused` row above is that graph on the test split; `int8` is quantized "
        "from it, `int8-unfused` (same recipe, not served) from the plain export; FP16 converts the plain export."
    )
    q = g.get("int8_quantized_fused_ops")
    if q:
        lines.append(
            f"INT8 quantized the fused ops too ({', '.join(sorted(q))} → ONNX Runtime's QAttention / "
            "QEmbedLayerNormalization integer kernels; QAttention keeps 7-bit weights, per channel)."
        )
    return lines
