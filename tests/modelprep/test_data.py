"""Data loading and splitting: built-in sets, user files, and clear errors for bad input."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from service.modelprep.config import DataConfig
from service.modelprep.data import load_dataset, read_labeled_file, stratified_split
from service.modelprep.errors import ConfigError, DataError


def test_trec_is_loaded_from_the_package_and_deduplicated():
    ds = load_dataset(DataConfig(dataset="trec"))
    assert ds.label_names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    total = len(ds.train) + len(ds.validation) + len(ds.test)
    assert 5300 < total < 5500  # the shipped file repeats nested subsets; ~5.4k distinct questions remain
    all_texts = ds.train.texts + ds.validation.texts + ds.test.texts
    assert len(set(all_texts)) == total
    # the splits are disjoint
    assert not set(ds.train.texts) & set(ds.test.texts)
    assert not set(ds.validation.texts) & set(ds.test.texts)


def test_split_is_stratified_and_seeded():
    cfg = DataConfig(dataset="trec", test_fraction=0.2, validation_fraction=0.1, seed=5)
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert a.test.texts == b.test.texts and a.data_hash == b.data_hash
    c = load_dataset(DataConfig(dataset="trec", seed=6))
    assert c.test.texts != a.test.texts and c.data_hash != a.data_hash
    total = Counter(a.train.labels + a.validation.labels + a.test.labels)
    test = Counter(a.test.labels)
    for label, n in total.items():
        assert abs(test[label] / n - 0.2) < 0.03, (label, test[label], n)


def test_sms_spam_has_two_classes():
    ds = load_dataset(DataConfig(dataset="sms_spam"))
    assert ds.label_names == ["ham", "spam"]
    assert len(ds.test) > 500


def test_stratified_split_keeps_rare_classes_in_every_part():
    rows = [(f"a{i}", "a") for i in range(100)] + [(f"b{i}", "b") for i in range(3)]
    test, val, train = stratified_split(rows, (0.2, 0.1), seed=0)
    for part in (test, val, train):
        assert {label for _, label in part} == {"a", "b"}
    assert len(test) + len(val) + len(train) == 103


def _write_csv(path: Path, rows: list[tuple[str, str]], header=("text", "label")) -> Path:
    import csv

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_user_csv_and_jsonl(tmp_path):
    rows = [(f"good text number {i}", "pos") for i in range(30)] + [(f"bad text {i}", "neg") for i in range(30)]
    csv_path = _write_csv(tmp_path / "d.csv", rows)
    ds = load_dataset(DataConfig(dataset="file", train_path=csv_path))
    assert ds.label_names == ["neg", "pos"]
    assert len(ds.train) + len(ds.validation) + len(ds.test) == 60
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"body": t, "tag": y}) for t, y in rows))
    ds2 = load_dataset(DataConfig(dataset="file", train_path=jl, text_column="body", label_column="tag"))
    assert ds2.data_hash == ds.data_hash


def test_user_separate_test_file(tmp_path):
    train = _write_csv(tmp_path / "train.csv", [(f"t{i}", "x" if i % 2 else "y") for i in range(40)])
    test = _write_csv(tmp_path / "test.csv", [("q1", "x"), ("q2", "y")])
    ds = load_dataset(DataConfig(dataset="file", train_path=train, test_path=test))
    assert ds.test.texts == ["q1", "q2"]
    assert len(ds.train) + len(ds.validation) == 40


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_column", "missing column"),
        ("one_class", "only one class"),
        ("empty_text", "empty text"),
        ("unknown_test_label", "never occur in the training data"),
        ("not_utf8", "not UTF-8"),
        ("missing_file", "not found"),
        ("bad_suffix", "unsupported file type"),
        ("bad_json", "not valid JSON"),
    ],
)
def test_bad_input_gives_a_clear_error(tmp_path, case, expected):
    train = tmp_path / "train.csv"
    kw = {}
    if case == "missing_column":
        _write_csv(train, [("a", "x"), ("b", "y")], header=("sentence", "label"))
    elif case == "one_class":
        _write_csv(train, [(f"t{i}", "x") for i in range(20)])
    elif case == "empty_text":
        _write_csv(train, [("a", "x"), ("  ", "y"), ("c", "y")])
    elif case == "unknown_test_label":
        _write_csv(train, [(f"t{i}", "x" if i % 2 else "y") for i in range(20)])
        kw["test_path"] = _write_csv(tmp_path / "test.csv", [("q", "x"), ("r", "zzz")])
    elif case == "not_utf8":
        train.write_bytes(b"text,label\n\xff\xfe bad,x\nok,y\n")
    elif case == "missing_file":
        train = tmp_path / "nope.csv"
    elif case == "bad_suffix":
        train = tmp_path / "data.xlsx"
        train.write_bytes(b"PK\x03\x04")
    elif case == "bad_json":
        train = tmp_path / "d.jsonl"
        train.write_text('{"text": "a", "label": "x"}\n{oops\n')
    with pytest.raises(DataError, match=expected):
        load_dataset(DataConfig(dataset="file", train_path=train, **kw))


def test_cli_reports_bad_input_without_traceback(tmp_path):
    train = _write_csv(tmp_path / "train.csv", [(f"t{i}", "only") for i in range(10)])
    proc = subprocess.run(
        [sys.executable, "-m", "service.modelprep", "data", "--dataset", "file", "--train-path", str(train)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "only one class" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"dataset": "imdb"}, "dataset"),
        ({"dataset": "file"}, "train_path"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"validation_fraction": 0.5, "test_fraction": 0.5}, "validation_fraction"),
        ({"max_train_samples": 1}, "max_train_samples"),
    ],
)
def test_data_config_validation(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        DataConfig(**kwargs)


def test_read_labeled_file_strips_and_keeps_order(tmp_path):
    p = _write_csv(tmp_path / "x.csv", [("  hello ", " a "), ("world", "b")])
    assert read_labeled_file(p) == [("hello", "a"), ("world", "b")]


@pytest.mark.parametrize("command", ["build", "train", "search"])
def test_cli_help_states_each_default_once_and_never_none(command):
    from service.modelprep.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(sub.choices[command].format_help().split())  # unwrap the columns
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: trec) (default" not in text and text.count("(default: trec)") == 1
    if command == "build":
        assert "cache of every stage (default: artifacts/default)" in text
