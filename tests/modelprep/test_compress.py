"""Compression mechanics on the tiny build: shapes shrink, parity where expected, sparsity, search."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.modelprep.config import DataConfig
from service.modelprep.errors import ConfigError

pytestmark = pytest.mark.slow

TEXTS = ["What is the capital of Peru ?", "Who wrote Hamlet ?", "How far is the moon ?", "What does NASA mean ?"]


@pytest.fixture(scope="module")
def small_data():
    from service.modelprep.data import load_dataset

    return load_dataset(DataConfig(max_train_samples=96))


def test_ffn_pruning_keeping_everything_is_exact(tiny_build, small_data):
    from service.modelprep.compress import ffn_neuron_scores, prune_ffn
    from service.modelprep.modeling import load_merged, predict_logits

    model, tok = load_merged(tiny_build.workdir / "merged")
    ref = predict_logits(model, tok, TEXTS, 32)
    scores = ffn_neuron_scores(model, tok, small_data.train.texts, 32, batches=2)
    assert len(scores) == model.config.num_hidden_layers and scores[0].shape == (1536,)
    prune_ffn(model, 1536, scores)  # keeping every neuron only reorders nothing: identical outputs
    assert np.abs(predict_logits(model, tok, TEXTS, 32) - ref).max() < 1e-5


def test_structured_pruning_shrinks_and_exports(tiny_build, small_data, tmp_path):
    from service.modelprep.compress import PruneConfig, structured_prune
    from service.modelprep.config import ExportConfig
    from service.modelprep.export import export_onnx
    from service.modelprep.modeling import load_merged

    out = structured_prune(
        PruneConfig(ffn_keep_fraction=0.25, score_batches=2, recovery_epochs=0),
        tiny_build.workdir / "merged",
        small_data,
        tmp_path / "pruned",
        progress=False,
    )
    model, _ = load_merged(out)
    assert model.config.intermediate_size == 384
    assert model.base_model.encoder.layer[0].intermediate.dense.weight.shape == (384, 384)
    meta = json.loads((out / "merge.json").read_text())
    assert 0.2 < meta["removed_fraction"] < 0.4
    onnx_path = export_onnx(ExportConfig(), out, tmp_path / "pruned.onnx", TEXTS)
    full = (tiny_build.workdir / "onnx" / "fp32.onnx").stat().st_size
    assert onnx_path.stat().st_size < 0.8 * full


def test_distilled_student_keeps_chosen_layers(tiny_build, small_data, tmp_path):
    from service.modelprep.compress import DistillConfig, distill
    from service.modelprep.modeling import load_merged

    out = distill(
        DistillConfig(student_layers=(0, 3), epochs=1, max_steps=3),
        tiny_build.workdir / "merged",
        small_data,
        tmp_path / "student",
        progress=False,
    )
    student, _ = load_merged(out)
    teacher, _ = load_merged(tiny_build.workdir / "merged")
    assert student.config.num_hidden_layers == 2 and len(student.base_model.encoder.layer) == 2
    meta = json.loads((out / "merge.json").read_text())
    assert meta["parameters"][1] < meta["parameters"][0]
    assert meta["history"] and "validation_accuracy" in meta["history"][0]
    # embeddings are taken from the teacher (then fine-tuned), not re-initialized: still strongly correlated
    a = teacher.base_model.embeddings.word_embeddings.weight.detach().numpy().ravel()
    b = student.base_model.embeddings.word_embeddings.weight.detach().numpy().ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.99


def test_layer_map_matches_relative_depth():
    from service.modelprep.compress import layer_map

    assert layer_map(3, 6) == [(0, 0), (1, 2), (2, 4), (3, 6)]
    assert layer_map(6, 6) == [(i, i) for i in range(7)]
    assert layer_map(4, 6)[-1] == (4, 6)  # the last layers always meet


def test_perturbed_copies_are_seeded_and_made_of_training_words():
    import random

    from service.modelprep.compress import perturb

    vocab = ["alpha", "beta", "gamma"]
    text = "What is the capital of Peru ?"
    a = [perturb(text, vocab, random.Random(1)) for _ in range(3)]
    b = [perturb(text, vocab, random.Random(1)) for _ in range(3)]
    assert a == b
    copies = [perturb(text, vocab, random.Random(i)) for i in range(50)]
    assert any(c != text for c in copies) and all(c for c in copies)
    assert all(set(c.split()) <= set(text.split()) | set(vocab) for c in copies)
    assert perturb("one", vocab, random.Random(0), drop=1.0, replace=0.0) == "one"  # never empty


def test_hidden_state_loss_is_zero_for_a_full_copy_and_positive_for_a_student(tiny_build, small_data):
    from service.modelprep.compress import _hidden_loss, layer_map, make_student
    from service.modelprep.modeling import load_merged
    from service.modelprep.tokens import encode

    teacher, tok = load_merged(tiny_build.workdir / "merged")
    enc = encode(tok, TEXTS, 32)

    def hidden(model):
        return model(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True
        ).hidden_states

    t = hidden(teacher)
    same = make_student(teacher, tuple(range(teacher.config.num_hidden_layers)))
    assert float(_hidden_loss(hidden(same), t, enc["attention_mask"], layer_map(6, 6))) < 1e-10
    small = make_student(teacher, (0, 2, 4))
    assert float(_hidden_loss(hidden(small), t, enc["attention_mask"], layer_map(3, 6))) > 1e-3


def test_distillation_with_hidden_states_and_perturbed_copies_trains(tiny_build, small_data, tmp_path):
    from service.modelprep.compress import DistillConfig, distill

    cfg = DistillConfig(student_layers=(0, 5), epochs=1, hidden_weight=1.0, augment_copies=1, batch_size=32)
    out = distill(cfg, tiny_build.workdir / "merged", small_data, tmp_path / "student", progress=False)
    meta = json.loads((out / "merge.json").read_text())
    assert meta["config"]["hidden_weight"] == 1.0 and meta["config"]["augment_copies"] == 1
    assert len(meta["history"]) == 1 and 0.0 <= meta["history"][0]["validation_accuracy"] <= 1.0


def test_magnitude_pruning_reaches_the_target_sparsity(tiny_build, small_data, tmp_path):
    from service.modelprep.compress import MagnitudePruneConfig, magnitude_prune, sparsity_of
    from service.modelprep.modeling import load_merged

    out = magnitude_prune(
        MagnitudePruneConfig(target_sparsity=0.4, steps=2, recovery_steps_per_round=2),
        tiny_build.workdir / "merged",
        small_data,
        tmp_path / "sparse",
        progress=False,
    )
    model, _ = load_merged(out)
    assert sparsity_of(model) == pytest.approx(0.4, abs=0.01)
    meta = json.loads((out / "merge.json").read_text())
    assert [r["round"] for r in meta["rounds"]] == [1, 2]
    assert meta["rounds"][0]["target"] < meta["rounds"][1]["target"]


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda c: c.PruneConfig(ffn_keep_fraction=0.0), "ffn_keep_fraction"),
        (lambda c: c.DistillConfig(student_layers=(2, 1)), "student_layers"),
        (lambda c: c.DistillConfig(alpha=2.0), "alpha"),
        (lambda c: c.DistillConfig(hidden_weight=-1.0), "hidden_weight"),
        (lambda c: c.DistillConfig(augment_copies=-1), "augment_copies"),
        (lambda c: c.PruneConfig(hidden_weight=-0.5), "hidden_weight"),
        (lambda c: c.PruneConfig(augment_copies=-2), "augment_copies"),
        (lambda c: c.MagnitudePruneConfig(target_sparsity=1.0), "target_sparsity"),
    ],
)
def test_compression_config_validation(make, field):
    from service.modelprep import compress

    with pytest.raises(ConfigError, match=field):
        make(compress)


def test_recipe_search_returns_a_valid_recipe(small_data, tmp_path):
    from service.modelprep.config import TrainConfig
    from service.modelprep.search import SearchConfig, search_recipes

    cands = (
        TrainConfig.lora(lora_r=4, max_steps=2, batch_size=8, max_length=16),
        TrainConfig.layered(freeze_layers=4, max_steps=2, batch_size=8, max_length=16),
    )
    res = search_recipes(
        SearchConfig(budget_seconds=60, candidates=cands), small_data, tmp_path / "s.json", progress=False
    )
    assert len(res["candidates"]) == 2
    best = res["best"]
    assert best["recipe"] in {
        "lora r=4 on the attention projections +pooler",
        "layered: freeze 4, tune upper attention",
    }
    assert best["validation_accuracy"] == max(c["validation_accuracy"] for c in res["candidates"])
    TrainConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in best["config"].items()})  # round-trips
    assert json.loads((tmp_path / "s.json").read_text())["best"]["recipe"] == best["recipe"]


def test_build_with_compression_adds_report_rows_and_publishes(tiny_build, tmp_path):
    import shutil

    from service.modelprep.config import (
        BuildConfig,
        CompressConfig,
        DistillConfig,
        MagnitudePruneConfig,
        PruneConfig,
    )
    from service.modelprep.pipeline import build

    work = tmp_path / "work"
    shutil.copytree(tiny_build.workdir, work)  # reuse the trained/merged/exported stages of the tiny build
    cc = CompressConfig(
        prune=PruneConfig(ffn_keep_fraction=0.5, score_batches=1, recovery_epochs=0),
        distill=DistillConfig(student_layers=(0, 5), epochs=1, max_steps=2),
        prune_student=PruneConfig(ffn_keep_fraction=0.5, score_batches=1, recovery_epochs=0),
        magnitude=MagnitudePruneConfig(target_sparsity=0.3, steps=1, recovery_steps_per_round=1),
        publish=True,
    )
    res = build(BuildConfig.tiny(work, tmp_path / "repo", compress=cc), progress=False)
    assert {"train", "merged", "onnx"} <= set(res.reused)
    names = [r["name"] for r in res.report["variants"]]
    for n in (
        "pruned",
        "pruned-int8",
        "distilled",
        "distilled-int8",
        "distilled-pruned",
        "distilled-pruned-int8",
        "sparse",
    ):
        assert n in names, names
    sizes = {r["name"]: r["size_bytes"] for r in res.report["variants"]}
    assert sizes["distilled-pruned-int8"] < sizes["distilled-int8"] < sizes["distilled"] < sizes["fp32"]
    assert sizes["pruned-int8"] < sizes["pruned"] < sizes["fp32"]
    assert res.report["compression"]["sparse"]["sparsity"] == pytest.approx(0.3, abs=0.01)
    small = res.published["small_int8"]
    assert (small / "model.onnx").is_file()
    cfg_text = (small.parent / "config.pbtxt").read_text()
    assert 'name: "classifier_small_int8"' in cfg_text
    from service.triton.model_config import load_model_config

    load_model_config(small.parent / "config.pbtxt")
