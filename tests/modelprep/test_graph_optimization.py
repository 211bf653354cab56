"""The fused graph (ONNX Runtime's transformer optimizer before INT8) on the tiny build: fused ops, logits equal to
the unfused export at several batch sizes and lengths (right and left padding), INT8 from it, and the fallback."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import onnx
import pytest

from service.modelprep.config import BuildConfig, ExportConfig, QuantizeConfig
from service.modelprep.errors import ConfigError

pytestmark = pytest.mark.slow

TEXTS = [
    "What is the capital of Peru ?",
    "Who wrote Hamlet ?",
    "How many miles is it from London to Paris , and how long does the train take ?",
    "Why is the sky blue ?",
    "What does NASA stand for ?",
    "a",
    "When did the first man walk on the moon , and who was he ?",
    "Name a flying mammal .",
]


@pytest.fixture(scope="module")
def fused(tiny_build, tmp_path_factory):
    """(unfused FP32 path, fused FP32 path, fusion record) of the tiny build's export."""
    from service.modelprep.fusion import fuse_graph

    fp32 = tiny_build.workdir / "onnx" / "fp32.onnx"
    out = tmp_path_factory.mktemp("fused") / "fp32-fused.onnx"
    meta = fuse_graph(fp32, out, tiny_build.workdir / "merged")
    return fp32, out, meta


@pytest.fixture(scope="module")
def tokenizer(tiny_build):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_build.workdir / "merged" / "tokenizer"), local_files_only=True)


def test_fused_graph_has_the_fused_transformer_ops_and_dynamic_axes(fused):
    from service.modelprep.fusion import graph_ops

    _, path, meta = fused
    assert meta["applied"], meta["reason"]
    # MiniLM-L6: one embedding block, 6 layers x (attention, 2 residual LayerNorms, bias+GELU)
    assert meta["fused_operators"] == {
        "EmbedLayerNormalization": 1,
        "Attention": 6,
        "SkipLayerNormalization": 12,
        "BiasGelu": 6,
    }
    ops = graph_ops(path)
    assert ops["Attention"] == 6 and "Softmax" not in ops and "LayerNormalization" not in ops
    assert meta["nodes_after"] < meta["nodes_before"] / 3
    model = onnx.load(str(path), load_external_data=False)
    for value in model.graph.input:
        assert [d.dim_param for d in value.type.tensor_type.shape.dim] == ["batch", "sequence"], value.name
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert meta["parity_max_abs_logit_diff_vs_unfused"] <= 1e-4
    assert json.loads(path.with_suffix(".json").read_text())["labels"], "the fused graph keeps its provenance"


@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("max_length", [5, 12, 32])
def test_fused_logits_match_the_unfused_export(fused, tokenizer, batch_size, max_length):
    from service.modelprep.onnxrt import ort_session
    from service.modelprep.tokens import encode

    fp32, path, _ = fused
    ref, got = ort_session(fp32, 1), ort_session(path, 1)
    texts = TEXTS[:batch_size]
    feeds = encode(tokenizer, texts, max_length, "head", tensors="np")
    if batch_size > 1 and max_length > 8:
        assert feeds["attention_mask"].min() == 0, "the batch must include right padding"
    a = ref.run(["logits"], feeds)[0]
    b = got.run(["logits"], feeds)[0]
    assert a.shape == b.shape == (batch_size, a.shape[1])
    assert np.abs(a - b).max() < 1e-4
    # a left-padded batch too: the fused Attention takes the raw 2-D mask, not a right-padding-only token count
    left = {k: v[:, ::-1].copy() for k, v in feeds.items()}
    assert np.abs(ref.run(["logits"], left)[0] - got.run(["logits"], left)[0]).max() < 1e-4


def test_int8_from_the_fused_graph_uses_integer_attention_and_agrees(fused, tiny_build, tokenizer, tmp_path):
    from service.modelprep.fusion import graph_ops
    from service.modelprep.onnxrt import onnx_logits, ort_session
    from service.modelprep.quantize import quantize_int8

    fp32, path, _ = fused
    out = quantize_int8(QuantizeConfig(), path, tmp_path / "int8.onnx")
    ops = graph_ops(out)
    assert ops["QAttention"] == 6 and ops["QEmbedLayerNormalization"] == 1 and "Attention" not in ops
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["quantized_fused_ops"] == ["Attention", "EmbedLayerNormalization"]
    assert any("classifier" in n for n in meta["kept_fp32_nodes"]), "the classifier head stays FP32"
    assert meta["labels"] and meta["max_length"], "provenance survives fusion + quantization"
    texts = tiny_build_texts(tiny_build)
    ref = onnx_logits(ort_session(fp32), tokenizer, texts, 32)
    fused_int8 = onnx_logits(ort_session(out), tokenizer, texts, 32)
    unfused_int8 = onnx_logits(
        ort_session(next((tiny_build.workdir / "int8").glob("*/model.onnx"))), tokenizer, texts, 32
    )
    assert 0 < np.abs(fused_int8 - ref).max() < 0.25
    # no worse than the unfused INT8 by more than noise: mean |Δlogit| vs FP32 within 1.5x of the unfused one's
    assert np.abs(fused_int8 - ref).mean() < 1.5 * np.abs(unfused_int8 - ref).mean() + 1e-3
    agree = (fused_int8.argmax(1) == ref.argmax(1)).mean()
    assert agree >= 0.9, agree


def tiny_build_texts(tiny_build) -> list[str]:
    """A slice of the test split (the tiny build's data), plus the short edge cases above."""
    from service.modelprep.data import load_dataset

    data = load_dataset(BuildConfig.tiny(workdir=tiny_build.workdir, repository=tiny_build.workdir).data)
    return data.test.texts[:160] + TEXTS


def test_fuse_graph_falls_back_when_the_optimizer_raises(tiny_build, tmp_path, monkeypatch, caplog):
    from onnxruntime.transformers import optimizer

    from service.modelprep.fusion import fuse_graph

    def broken(*a, **kw):
        raise RuntimeError("no attention pattern for this model")

    monkeypatch.setattr(optimizer, "optimize_model", broken)
    out = tmp_path / "fused.onnx"
    with caplog.at_level(logging.WARNING, logger="service.modelprep.fusion"):
        meta = fuse_graph(tiny_build.workdir / "onnx" / "fp32.onnx", out, tiny_build.workdir / "merged")
    assert not meta["applied"] and "no attention pattern" in meta["reason"]
    assert not out.exists(), "a failed fusion leaves no fused graph behind"
    assert "graph optimization not applied" in caplog.text
    assert json.loads(out.with_suffix(".json").read_text())["graph_optimization"]["applied"] is False


def test_fuse_graph_falls_back_when_nothing_fuses_or_logits_drift(tiny_build, tmp_path, monkeypatch):
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.onnx_model_bert import BertOnnxModel

    from service.modelprep import fusion

    fp32 = tiny_build.workdir / "onnx" / "fp32.onnx"
    # an "optimizer" that returns the graph untouched: nothing fused, so nothing is gained by keeping it
    monkeypatch.setattr(optimizer, "optimize_model", lambda *a, **kw: BertOnnxModel(onnx.load(str(fp32)), 12, 384))
    meta = fusion.fuse_graph(fp32, tmp_path / "a.onnx", tiny_build.workdir / "merged")
    assert not meta["applied"] and "fused nothing" in meta["reason"]
    monkeypatch.undo()
    # a fused graph whose logits differ beyond the tolerance is dropped too
    monkeypatch.setattr(fusion, "max_logit_diff", lambda *a, **kw: 0.5)
    meta = fusion.fuse_graph(fp32, tmp_path / "b.onnx", tiny_build.workdir / "merged")
    assert not meta["applied"] and "differ from the unfused graph" in meta["reason"]
    assert meta["fused_operators"]["Attention"] == 6 and not (tmp_path / "b.onnx").exists()


def test_pipeline_with_a_failing_optimizer_builds_unfused_and_says_so(tiny_build, tmp_path, monkeypatch):
    from onnxruntime.transformers import optimizer

    from service.modelprep.pipeline import build

    work = tmp_path / "work"
    for stage in ("train", "merged", "onnx", "int8", "fp16", "eval"):
        shutil.copytree(tiny_build.workdir / stage, work / stage)

    def broken(*a, **kw):
        raise ValueError("unsupported graph")

    monkeypatch.setattr(optimizer, "optimize_model", broken)
    cfg = BuildConfig.tiny(workdir=work, repository=tmp_path / "repo", export=ExportConfig(optimize="fused"))
    res = build(cfg, progress=False)
    # the fallback is the unfused build: its INT8 and evaluation stages are reused as they are
    assert {"train", "merged", "onnx", "fp16", "eval"} <= set(res.reused)
    assert any(s.startswith("int8/") for s in res.reused) and "onnx-fused" not in res.reused
    g = res.report["graph_optimization"]
    assert g["requested"] == "fused" and not g["applied"] and "unsupported graph" in g["reason"]
    assert [r["name"] for r in res.report["variants"]] == ["fp32", "fp16", "int8"]
    prov = json.loads((res.published["int8"] / "provenance.json").read_text())
    assert prov["graph_optimization"]["this_variant_fused"] is False
    assert "not applied" in (res.report_path.parent / "report.md").read_text()


def test_export_optimize_is_validated():
    with pytest.raises(ConfigError, match="optimize"):
        ExportConfig(optimize="fastest")
