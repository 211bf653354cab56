"""The model pipeline on a tiny but real build: trainable parameters, merge parity, ONNX parity, variants, report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.modelprep.config import (
    BuildConfig,
    EvalConfig,
    ExportConfig,
    QuantizeConfig,
    TrainConfig,
)
from service.modelprep.errors import ConfigError

pytestmark = pytest.mark.slow

TEXTS = [
    "What is the capital of Peru ?",
    "Who wrote Hamlet ?",
    "How many miles is it from London to Paris , and how long does the train take ?",
    "Why is the sky blue ?",
    "What does NASA stand for ?",
    "a",
]


def _base_classifier(method: str, **kw):
    from service.modelprep.finetune import prepare_model
    from service.modelprep.modeling import default_base_model, load_classifier

    cfg = TrainConfig(method=method, **kw)
    return prepare_model(cfg, load_classifier(default_base_model(), ["a", "b", "c", "d", "e", "f"]))


def test_lora_trains_about_one_percent_of_the_parameters():
    from service.modelprep.modeling import count_parameters

    model = _base_classifier("lora")
    trainable, total = count_parameters(model)
    # 6 layers x 3 projections x (A: 384x16 + B: 16x384) + classifier head 384x6 + 6 + pooler 384x384 + 384
    adapters = 6 * 3 * (384 * 16 + 16 * 384)
    assert trainable == adapters + 384 * 6 + 6 + 384 * 384 + 384
    assert 0.01 < trainable / total < 0.02
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "classifier" in n or "pooler" in n for n in names)
    frozen_pooler = _base_classifier("lora", train_pooler=False)
    t2, _ = count_parameters(frozen_pooler)
    assert t2 == adapters + 384 * 6 + 6  # the reference recipe alone: ~0.97% of the weights
    assert 0.005 < t2 / total < 0.015


def test_layered_freezing_trains_only_upper_attention_and_head():
    from service.modelprep.modeling import count_parameters

    model = _base_classifier("layered", freeze_layers=4)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names, "something must be trainable"
    for n in names:
        if n.startswith("classifier") or ".pooler." in n:
            continue
        assert ".attention." in n and (".layer.4." in n or ".layer.5." in n), n
    trainable, total = count_parameters(model)
    assert 0.03 < trainable / total < 0.15


def test_lora_combined_with_freezing_adapts_only_upper_layers():
    model = _base_classifier("lora", freeze_layers=4)
    lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora and all(".layer.4." in n or ".layer.5." in n for n in lora)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: TrainConfig(method="qlora"), "method"),
        (lambda: TrainConfig(lora_r=0), "lora_r"),
        (lambda: TrainConfig(lora_dropout=1.0), "lora_dropout"),
        (lambda: TrainConfig(method="layered"), "freeze_layers"),
        (lambda: TrainConfig(max_length=4), "max_length"),
        (lambda: TrainConfig(max_length="longest"), "max_length"),
        (lambda: TrainConfig(truncation="middle"), "truncation"),
        (lambda: TrainConfig(patience=0), "patience"),
        (lambda: TrainConfig(selection_metric="f2"), "selection_metric"),
        (lambda: TrainConfig(class_weights="inverse"), "class_weights"),
        (lambda: QuantizeConfig(mode="weird"), "mode"),
        (lambda: ExportConfig(opset=9), "opset"),
        (lambda: EvalConfig(batch_sizes=(0,)), "batch_sizes"),
        (lambda: BuildConfig(served_variants=("int4",)), "served variant"),
    ],
)
def test_config_validation_names_the_field(make, field):
    with pytest.raises(ConfigError, match=field):
        make()


def test_freezing_every_layer_is_rejected():
    from service.modelprep.errors import PrepError

    with pytest.raises(PrepError, match="freeze_layers"):
        _base_classifier("layered", freeze_layers=6)


def test_merged_model_matches_the_adapter_model(tiny_build):
    from service.modelprep.merge import load_trained
    from service.modelprep.modeling import load_merged, predict_logits

    adapter_model, tok, _, max_length, _trunc = load_trained(tiny_build.workdir / "train")
    assert hasattr(adapter_model, "merge_and_unload"), "the LoRA build must save an adapter, not a full model"
    merged, _ = load_merged(tiny_build.workdir / "merged")
    a = predict_logits(adapter_model, tok, TEXTS, max_length)
    b = predict_logits(merged, tok, TEXTS, max_length)
    assert np.abs(a - b).max() < 1e-4
    meta = json.loads((tiny_build.workdir / "merged" / "merge.json").read_text())
    assert meta["merged"] is True and meta["max_abs_logit_diff_vs_adapter"] < 1e-4


def test_onnx_matches_torch_with_dynamic_batch_and_length(tiny_build):
    from service.modelprep.modeling import load_merged, predict_logits
    from service.modelprep.onnxrt import onnx_logits, ort_session

    merged, tok = load_merged(tiny_build.workdir / "merged")
    sess = ort_session(tiny_build.workdir / "onnx" / "fp32.onnx")
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    assert set(shapes) == {"input_ids", "attention_mask"}
    assert all(isinstance(d, str) for d in shapes["input_ids"]), "batch and sequence axes must be dynamic"
    for batch in (1, 4):
        ref = predict_logits(merged, tok, TEXTS[:batch], 32)
        got = onnx_logits(sess, tok, TEXTS[:batch], 32)
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() < 1e-4


def test_variants_stay_within_tolerance_of_fp32(tiny_build):
    from transformers import AutoTokenizer

    from service.modelprep.onnxrt import onnx_logits, ort_session

    tok = AutoTokenizer.from_pretrained(str(tiny_build.workdir / "merged" / "tokenizer"))
    ref = onnx_logits(ort_session(tiny_build.workdir / "onnx" / "fp32.onnx"), tok, TEXTS, 32)
    fp16 = onnx_logits(ort_session(tiny_build.workdir / "fp16" / "fp16.onnx"), tok, TEXTS, 32)
    int8_path = next((tiny_build.workdir / "int8").glob("*/model.onnx"))
    int8 = onnx_logits(ort_session(int8_path), tok, TEXTS, 32)
    assert np.abs(fp16 - ref).max() < 0.02
    assert np.abs(int8 - ref).max() < 0.25
    assert np.abs(int8 - ref).max() > 0, "an INT8 model identical to FP32 was not quantized"
    sizes = {
        p: p.stat().st_size
        for p in (tiny_build.workdir / "onnx" / "fp32.onnx", tiny_build.workdir / "fp16" / "fp16.onnx", int8_path)
    }
    fp32_size, fp16_size, int8_size = sizes.values()
    assert fp16_size < 0.6 * fp32_size
    assert int8_size < 0.5 * fp32_size


def test_throughput_is_measured_in_interleaved_rounds(tiny_build):
    from transformers import AutoTokenizer

    from service.modelprep.config import EvalConfig
    from service.modelprep.evaluate import measure_throughput_interleaved
    from service.modelprep.onnxrt import ort_session

    tok = AutoTokenizer.from_pretrained(str(tiny_build.workdir / "merged" / "tokenizer"))
    int8_path = next((tiny_build.workdir / "int8").glob("*/model.onnx"))
    order: list[str] = []

    class Recording:
        """A real ORT session that notes when it is timed."""

        def __init__(self, name, path):
            self.name, self.session = name, ort_session(path, threads=1)

        def run(self, outputs, feed):
            if not order or order[-1] != self.name:
                order.append(self.name)
            return self.session.run(outputs, feed)

    sessions = {
        "fp32": Recording("fp32", tiny_build.workdir / "onnx" / "fp32.onnx"),
        "int8": Recording("int8", int8_path),
    }
    cfg = EvalConfig(batch_sizes=(1, 4), repeats=3, seconds_per_repeat=0.05, threads=1)
    ticks = []
    progress = type("P", (), {"update": lambda self, n: ticks.append(n)})()
    out = measure_throughput_interleaved(sessions, tok, TEXTS * 4, 32, cfg, progress)
    assert set(out) == {"fp32", "int8"} and len(ticks) == 3 * 2 * 2
    for medians, runs in out.values():
        assert set(medians) == {"1", "4"} and all(len(r) == 3 for r in runs.values())
        assert all(v > 0 for v in medians.values())
    # After the warm-up, the two variants alternate within every round: never all of one, then all of the other.
    timed = order[2:]
    assert timed[:4] == ["fp32", "int8", "fp32", "int8"] and len(timed) == 3 * 2 * 2


def test_static_int8_with_calibration(tiny_build, tmp_path):
    import onnx
    from transformers import AutoTokenizer

    from service.modelprep.onnxrt import onnx_logits, ort_session
    from service.modelprep.quantize import quantize_int8

    tok = AutoTokenizer.from_pretrained(str(tiny_build.workdir / "merged" / "tokenizer"))
    fp32 = tiny_build.workdir / "onnx" / "fp32.onnx"
    cfg = QuantizeConfig(mode="static", per_channel=True, calibration_samples=16)
    out = quantize_int8(cfg, fp32, tmp_path / "static.onnx", tokenizer=tok, calibration_texts=TEXTS * 3, max_length=32)
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["kept_fp32_nodes"], "attention MatMuls must stay in FP32 by default"
    ref = onnx_logits(ort_session(fp32), tok, TEXTS, 32)
    got = onnx_logits(ort_session(out), tok, TEXTS, 32)
    assert np.abs(got - ref).max() < 0.5


def test_published_repository_follows_the_contract(tiny_build, tiny_repository):
    for variant in ("int8", "fp16"):
        vdir = tiny_repository / f"classifier_{variant}" / "1"
        for f in ("model.onnx", "model.py", "tokenizer.json", "labels.json", "provenance.json"):
            assert (vdir / f).is_file(), f
        assert (tiny_repository / f"classifier_{variant}" / "config.pbtxt").is_file()
        labels = json.loads((vdir / "labels.json").read_text())
        assert labels["labels"] == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
        assert labels["variant"] == variant and labels["max_length"] == 32
        prov = json.loads((vdir / "provenance.json").read_text())
        assert prov["data_hash"] and prov["config"]["train"]["method"] == "lora"
        assert prov["metrics"]["name"] == variant


def test_report_is_written_with_every_variant(tiny_build):
    rep = json.loads(tiny_build.report_path.read_text())
    assert [r["name"] for r in rep["variants"]] == ["fp32", "fp16", "int8"]
    for r in rep["variants"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["size_bytes"] > 1_000_000
    assert rep["machine"]["cores"] >= 1
    md = tiny_build.report_path.with_suffix(".md").read_text()
    assert "| int8 |" in md and "Targets" in md
    png = tiny_build.report_path.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_rebuild_reuses_every_stage(tiny_build):
    from service.modelprep.pipeline import build

    cfg = BuildConfig.tiny(workdir=tiny_build.workdir, repository=Path(tiny_build.published["int8"]).parents[1])
    again = build(cfg, progress=False)
    for stage in ("train", "merged", "onnx", "fp16", "eval", "publish/int8", "publish/fp16"):
        assert stage in again.reused, (stage, again.reused)


def test_compression_target_takes_the_fastest_compressed_variant_within_the_accuracy_budget():
    from service.modelprep.pipeline import check_targets

    def row(name, acc, b32):
        return {"name": name, "accuracy": acc, "throughput": {"32": b32}}

    report = {
        "evaluate": {"throughput": True, "batch_sizes": [1, 32]},
        "compression": {"pruned": {}, "distilled": {}, "distilled-pruned": {}},
        "variants": [
            row("fp32", 0.940, 500.0),
            row("int8", 0.942, 1000.0),
            row("int8-dyn-pt-sym", 0.939, 5000.0),  # fast, but a quantization recipe, not a compressed model
            row("pruned", 0.938, 800.0),
            row("pruned-int8", 0.937, 2100.0),
            row("distilled-int8", 0.930, 2500.0),  # 1.0 point lost: allowed
            row("distilled-pruned-int8", 0.920, 4000.0),  # 2.0 points lost: over budget however fast
        ],
    }
    (target,) = [t for t in check_targets(report) if "compressed variant" in t["what"]]
    assert target["ok"] and target["detail"].startswith("distilled-int8: 2.50x")
    report["variants"][-2]["accuracy"] = 0.920
    (target,) = [t for t in check_targets(report) if "compressed variant" in t["what"]]
    assert target["ok"] and target["detail"].startswith("pruned-int8: 2.10x")
    report["variants"][4]["throughput"]["32"] = 1500.0
    (target,) = [t for t in check_targets(report) if "compressed variant" in t["what"]]
    assert not target["ok"] and target["detail"].startswith("pruned-int8: 1.50x")
