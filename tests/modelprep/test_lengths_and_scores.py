"""Token lengths (auto max length, truncation share, head+tail) and the scores that select a model (no training)."""

from __future__ import annotations

import numpy as np
import pytest

from service.modelprep import scoring
from service.modelprep.errors import ConfigError
from service.modelprep.tokens import auto_max_length, encode, length_summary, token_lengths


@pytest.fixture(scope="module")
def tokenizer():
    from service.modelprep.modeling import default_base_model, load_tokenizer

    return load_tokenizer(default_base_model())


def test_auto_max_length_covers_the_requested_share_in_multiples_of_16():
    lengths = list(range(1, 101))  # 1..100 tokens
    assert auto_max_length(lengths, coverage=0.95) == 96  # p95 = 95 -> next multiple of 16
    assert auto_max_length(lengths, coverage=1.0) == 112
    assert auto_max_length([5, 6, 7]) == 16  # never below the floor
    assert auto_max_length([600, 700], model_max=512) == 512  # never above the model's positions
    summary = length_summary(lengths, 96)
    assert summary["truncated_share"] == pytest.approx(0.04)
    assert summary["p50"] == 51 and summary["max"] == 100 and summary["texts"] == 100
    with pytest.raises(ConfigError, match="max_length_coverage"):
        auto_max_length(lengths, coverage=0.2)


def test_token_lengths_count_the_special_tokens(tokenizer):
    (n,) = token_lengths(tokenizer, ["who wrote hamlet ?"])
    assert n == len(tokenizer("who wrote hamlet ?")["input_ids"])


def test_head_tail_keeps_the_start_and_the_end(tokenizer):
    words = " ".join(f"w{i}" for i in range(200))
    budget = 34  # 32 text tokens + [CLS] + [SEP]
    head = encode(tokenizer, [words], budget, "head", tensors="np")["input_ids"][0]
    both = encode(tokenizer, [words], budget, "head_tail", tensors="np")["input_ids"][0]
    full = tokenizer(words, add_special_tokens=False)["input_ids"]
    assert len(head) == len(both) == budget
    assert both[0] == tokenizer.cls_token_id and both[-1] == tokenizer.sep_token_id
    body = list(both[1:-1])
    assert body[:8] == full[:8] and body[8:] == full[-24:]  # a quarter from the head, the rest from the tail
    assert list(head[1:-1]) == full[:32]


def test_head_tail_leaves_short_texts_alone_and_pads_like_head(tokenizer):
    texts = ["who wrote hamlet ?", "a", "how far is the moon from the earth in miles ?"]
    a = encode(tokenizer, texts, 64, "head", tensors="np")
    b = encode(tokenizer, texts, 64, "head_tail", tensors="np")
    assert (a["input_ids"] == b["input_ids"]).all() and (a["attention_mask"] == b["attention_mask"]).all()
    with pytest.raises(ConfigError, match="truncation"):
        encode(tokenizer, texts, 64, "middle")


def test_per_class_precision_recall_and_macro_f1():
    gold = np.array([0, 0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 2])
    rows = scoring.class_report(pred, gold, ["a", "b", "c"])
    assert rows["a"] == {"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4}
    assert rows["b"]["precision"] == 0.5 and rows["b"]["recall"] == 0.5
    assert rows["c"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert scoring.macro_f1(pred, gold, 3) == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert scoring.accuracy(pred, gold) == pytest.approx(5 / 7)


def test_selection_metric_auto_picks_macro_f1_for_imbalanced_labels():
    balanced = [0, 1] * 50
    imbalanced = [0] * 90 + [1] * 10  # the rare class has 10% < 0.5 x 1/2
    assert scoring.resolve_selection_metric("auto", balanced, 2)[0] == "accuracy"
    assert scoring.resolve_selection_metric("auto", imbalanced, 2) == ("macro_f1", "auto: classes imbalanced")
    assert scoring.resolve_selection_metric("accuracy", imbalanced, 2)[0] == "accuracy"
    # too few validation examples of the rare class: its F1 would pick the epoch by noise
    metric, why = scoring.resolve_selection_metric("auto", imbalanced, 2, [0] * 50 + [1] * 9)
    assert metric == "accuracy" and "9 validation examples" in why
    assert scoring.resolve_selection_metric("auto", imbalanced, 2, [0] * 50 + [1] * 20)[0] == "macro_f1"
    weights = scoring.balanced_class_weights(imbalanced, 2)
    assert weights == pytest.approx([100 / (2 * 90), 100 / (2 * 10)])


def _length_report(path, max_length, truncated, acc, f1, epochs_run, epoch_seconds):
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    variant = {"accuracy": acc, "macro_f1": f1, "per_class": {"spam": {"precision": 0.5, "recall": f1}}}
    path.write_text(
        json.dumps(
            {
                "variants": [{"name": "fp32", **variant}, {"name": "int8", **variant}],
                "token_lengths": {
                    "train": {"max_length": max_length, "truncated_share": truncated},
                    "test": {"max_length": max_length, "truncated_share": truncated},
                },
                "train": {
                    "max_epochs": 8,
                    "epochs_run": epochs_run,
                    "best_epoch": epochs_run - 2,
                    "stopped_early": epochs_run < 8,
                    "selection_metric": "macro_f1",
                    "epoch_seconds": epoch_seconds,
                    "train_seconds": sum(epoch_seconds),
                    "seconds_to_best": sum(epoch_seconds[:-2]),
                },
            }
        )
    )
    return path


def test_length_summary_compares_auto_with_the_best_hand_picked_length(tmp_path):
    from service.modelprep.report import render_length_runs, summarize_length_runs

    reports = {
        "64": _length_report(tmp_path / "a.json", 64, 0.9, 0.85, 0.62, 6, [10.0] * 6),
        "auto": _length_report(tmp_path / "b.json", 240, 0.05, 0.96, 0.93, 5, [30.0, 40.0, 50.0, 60.0, 70.0]),
        "256": _length_report(tmp_path / "c.json", 256, 0.04, 0.97, 0.94, 8, [50.0] * 8),
    }
    s = summarize_length_runs(reports, positive="spam")
    assert s["best_setting"] == "256" and s["best_hand_picked"] == "256"
    assert s["auto_minus_best_hand_picked_points"] == {"int8_macro_f1": -1.0, "int8_accuracy": -1.0}
    rows = {r["setting"]: r for r in s["rows"]}
    assert rows["auto"]["seconds_saved_by_early_stopping"] == 3 * 50.0  # 3 epochs skipped x median epoch
    assert rows["256"]["seconds_saved_by_early_stopping"] == 0.0
    assert rows["64"]["int8_spam_recall"] == 0.62
    md = render_length_runs(s, positive="spam").splitlines()
    assert [line.split("|")[1].strip() for line in md[2:]] == ["64", "auto", "256"]  # ordered by tokens
    assert "90.0% / 90.0%" in md[2] and "5 / 8 (3)" in md[3]


def _seed_report(path, max_length, f1, seed, split_seed=13):
    import json

    _length_report(path, max_length, 0.05, f1, f1, 6, [10.0] * 6)
    r = json.loads(path.read_text())
    r["config"] = {"data": {"dataset": "sms_threads", "seed": split_seed}, "train": {"seed": seed}}
    path.write_text(json.dumps(r))
    return path


def test_length_seed_summary_compares_means_and_pairs_seeds(tmp_path):
    from service.modelprep.report import render_length_seed_runs, summarize_length_seed_runs

    f1 = {"auto": (0.93, 0.96, 0.95), "256": (0.96, 0.95, 0.95), "128": (0.84, 0.85, 0.86)}
    reports = {
        setting: {
            seed: _seed_report(tmp_path / f"{setting}-{seed}.json", 240 if setting == "auto" else int(setting), v, seed)
            for seed, v in zip((13, 14, 15), vals, strict=True)
        }
        for setting, vals in f1.items()
    }
    s = summarize_length_seed_runs(reports, positive="spam")
    by = {x["setting"]: x for x in s["settings"]}
    assert by["auto"]["int8_macro_f1"]["mean"] == pytest.approx(0.9466667)
    assert by["auto"]["int8_macro_f1"]["sd"] == pytest.approx(0.0152753, rel=1e-4)
    assert by["auto"]["int8_macro_f1"]["min"] == 0.93 and by["auto"]["int8_macro_f1"]["max"] == 0.96
    assert by["auto"]["seeds"] == [13, 14, 15] and by["auto"]["max_length"] == [240]
    assert s["best_setting"] == "256" and s["best_hand_picked"] == "256"
    assert s["auto_minus_best_hand_picked_points"]["int8_macro_f1"] == pytest.approx(-0.67)
    assert s["auto_minus_best_hand_picked_points_per_seed"] == {"13": -3.0, "14": 1.0, "15": 0.0}
    assert s["auto_within_1_point_of_best_hand_picked"] is True
    assert len(s["rows"]) == 9 and {r["train_seed"] for r in s["rows"]} == {13, 14, 15}
    md = render_length_seed_runs(s).splitlines()
    assert [line.split("|")[1].strip() for line in md[2:]] == ["128", "auto", "256"]  # ordered by tokens
    assert "0.9467 ± 0.0153 (0.9300-0.9600)" in md[3] and "13, 14, 15" in md[3]


def test_length_seed_summary_refuses_mixed_splits_and_misfiled_seeds(tmp_path):
    from service.modelprep.report import summarize_length_seed_runs

    a = _seed_report(tmp_path / "a.json", 240, 0.9, 13)
    with pytest.raises(ValueError, match="filed under seed 14"):
        summarize_length_seed_runs({"auto": {14: a}})
    b = _seed_report(tmp_path / "b.json", 256, 0.9, 13, split_seed=99)
    with pytest.raises(ValueError, match="different data configs"):
        summarize_length_seed_runs({"auto": {13: a}, "256": {13: b}})
