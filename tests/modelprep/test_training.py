"""Training options on tiny real runs: early stopping keeps the best epoch, auto length, class weights, progress lines;
the one stage cache; the long-document data set."""

from __future__ import annotations

import io
import json
from collections import Counter

import pytest

from service.modelprep.config import DataConfig, TrainConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def threads():
    from service.modelprep.data import load_dataset

    # few messages held out: small validation/test thread sets keep each epoch's scoring short
    return load_dataset(
        DataConfig(dataset="sms_threads", max_train_samples=48, validation_fraction=0.05, test_fraction=0.05)
    )


def test_sms_threads_are_long_imbalanced_and_never_share_a_message_across_splits():
    from service.modelprep.data import load_dataset

    ds = load_dataset(DataConfig(dataset="sms_threads"))
    assert ds.label_names == ["ham", "spam"]
    share = Counter(ds.train.labels)[1] / len(ds.train)
    assert 0.12 < share < 0.18
    words = sorted(len(t.split()) for t in ds.train.texts)
    assert 60 < words[len(words) // 2] < 130  # documents of ~100 words
    messages = {split: {m for t in getattr(ds, split).texts for m in t.split("\n")} for split in ("train", "test")}
    assert not messages["train"] & messages["test"]
    again = load_dataset(DataConfig(dataset="sms_threads"))
    assert again.data_hash == ds.data_hash


def test_early_stopping_stops_and_keeps_the_best_epoch(tmp_path):
    from service.modelprep.data import load_dataset
    from service.modelprep.finetune import train
    from service.modelprep.progress import Progress

    data = load_dataset(DataConfig(max_train_samples=48, validation_fraction=0.05, test_fraction=0.05))
    out = io.StringIO()
    # a learning rate too small to change anything: the validation score cannot improve after epoch 1
    cfg = TrainConfig(
        epochs=5, patience=1, selection_ties=0, batch_size=16, learning_rate=1e-12, max_length="auto", seed=3
    )
    res = train(cfg, data, tmp_path / "t", progress=Progress(bars=False, stream=out))
    assert res.stopped_early and res.best_epoch == 1 and len(res.history) == 2
    meta = json.loads((tmp_path / "t" / "train.json").read_text())
    assert meta["best_epoch"] == 1 and meta["stopped_early"] is True
    # TREC is imbalanced (ABBR ~1.6%), but its rare class has too few validation examples for macro-F1
    assert meta["selection_metric"] == "accuracy" and "validation examples" in meta["selection_reason"]
    lengths = meta["token_lengths"]
    assert lengths["chosen"].startswith("auto") and meta["config"]["max_length"] == lengths["max_length"]
    assert lengths["max_length"] % 16 == 0 and lengths["truncated_share"] <= 0.05
    lines = out.getvalue().splitlines()
    epoch_lines = [x for x in lines if "train epoch" in x]
    assert len(epoch_lines) == 2 and "stopping early" in epoch_lines[-1] and "ETA" in epoch_lines[0]
    assert any("s/step measured; ETA" in x for x in lines)
    assert "\r" not in out.getvalue(), "no progress bars when bars are off"


def test_a_tie_keeps_the_later_epoch_and_does_not_reset_patience(tmp_path):
    from service.modelprep.data import load_dataset
    from service.modelprep.finetune import train
    from service.modelprep.progress import Progress

    data = load_dataset(DataConfig(max_train_samples=48, validation_fraction=0.05, test_fraction=0.05))
    out = io.StringIO()
    # the same frozen model: every epoch scores the same, a tie with epoch 1, never a gain
    cfg = TrainConfig(epochs=5, patience=2, batch_size=16, learning_rate=1e-12, max_length="auto", seed=3)
    res = train(cfg, data, tmp_path / "t", progress=Progress(bars=False, stream=out))
    assert res.stopped_early and len(res.history) == 3, "ties are no gain: patience 2 stops after epoch 3"
    assert res.best_epoch == 3, "a tie goes to the later epoch"
    scores = [h["validation_accuracy"] for h in res.history]
    assert scores[0] == scores[1] == scores[2]
    epoch_lines = [x for x in out.getvalue().splitlines() if "train epoch" in x]
    assert "a tie with the best" in epoch_lines[1] and "keeping epoch 3" in epoch_lines[2]


def test_class_weighted_loss_and_head_tail_truncation_train(threads, tmp_path):
    from service.modelprep.finetune import train

    cfg = TrainConfig(
        epochs=1, max_steps=2, batch_size=8, max_length=32, truncation="head_tail", class_weights="balanced"
    )
    train(cfg, threads, tmp_path / "t", progress=False)
    meta = json.loads((tmp_path / "t" / "train.json").read_text())
    ham, spam = meta["class_weights"]
    assert spam > 1 > ham
    assert meta["config"]["truncation"] == "head_tail" and meta["token_lengths"]["truncated_share"] > 0.5


def test_stage_cache_reuses_by_key_and_rebuilds_a_missing_outside_product(tmp_path):
    from service.modelprep.cache import StageCache
    from service.modelprep.progress import Progress

    out = io.StringIO()
    cache = StageCache(tmp_path / "w", progress=Progress(bars=False, stream=out))
    calls = []
    product = tmp_path / "outside.txt"

    def make(d):
        calls.append(d.name)
        product.write_text("x")

    cache.run("s", "k1", make, eta=(3.0, "a guess"), valid=product.is_file)
    cache.run("s", "k1", make, valid=product.is_file)
    assert calls == ["s"] and cache.reused == ["s"]
    product.unlink()
    cache.run("s", "k1", make, valid=product.is_file)  # stamp matches, product gone: rebuilt
    cache.run("s", "k2", make)  # new key: rebuilt
    assert calls == ["s", "s", "s"]
    text = out.getvalue()
    assert "ETA ~3 s (a guess)" in text and "up to date, reused" in text
    assert "as long as its last build here" in text  # the second build's ETA is the first one's time
    assert json.loads((tmp_path / "w" / "timings.json").read_text())["s"] >= 0


def test_tiny_build_report_shows_lengths_per_class_and_selection(tiny_build):
    rep = json.loads(tiny_build.report_path.read_text())
    assert rep["train"]["selection_metric"] in ("accuracy", "macro_f1")
    assert rep["token_lengths"]["train"]["truncated_share"] >= 0 and rep["token_lengths"]["test"]["texts"] > 0
    int8 = next(r for r in rep["variants"] if r["name"] == "int8")
    assert set(int8["per_class"]) == set(rep["dataset"]["labels"])
    md = tiny_build.report_path.with_suffix(".md").read_text()
    assert "truncated share" in md and "Per-class precision / recall" in md and "selected on validation" in md


def test_head_tail_is_recorded_in_labels_json(tiny_build, tmp_path):
    from service.modelprep.publish import publish_variant

    work = tiny_build.workdir
    vdir = publish_variant(
        "int8",
        next((work / "int8").glob("*/model.onnx")),
        work / "merged" / "tokenizer",
        ["a", "b"],
        32,
        tmp_path / "repo",
        1,
        {},
        truncation="head_tail",
    )
    meta = json.loads((vdir / "labels.json").read_text())
    assert meta["truncation"] == "head_tail" and meta["head_tokens"] == 1 + 8  # [CLS] + a quarter of 32 - 2
    default = json.loads((tiny_build.published["int8"] / "labels.json").read_text())
    assert default.get("truncation", "head") == "head"
