"""The model-repository contract (service/triton/repository.py): names, versions, labels, provenance, configs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.triton import repository as contract

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_naming_rule_round_trips_and_refuses_bad_names():
    assert contract.model_name("int8") == "classifier_int8"
    assert contract.model_name("small_int8") == "classifier_small_int8"
    assert contract.variant_of("classifier_small_int8") == "small_int8"
    assert contract.variant_of("generator_int8") is None and contract.variant_of("classifier_") is None
    for bad in ("", "a b", "x/y", "_int8", "int8_"):
        with pytest.raises(ValueError):
            contract.model_name(bad)


def test_versions_pick_the_highest_or_the_pinned(tmp_path):
    model = tmp_path / "classifier_int8"
    for v in (1, 3, 10):
        (model / str(v)).mkdir(parents=True)
    (model / "notes").mkdir()
    assert contract.list_versions(model) == [1, 3, 10]
    assert contract.pick_version(model, None) == 10 and contract.pick_version(model, 3) == 3
    assert contract.next_version(model) == 11 and contract.next_version(tmp_path / "missing") == 1
    with pytest.raises(contract.RepositoryError, match="version 2 not found"):
        contract.pick_version(model, 2)
    with pytest.raises(contract.RepositoryError, match="does not exist"):
        contract.pick_version(tmp_path / "missing", None)


def test_labels_round_trip_and_validation(tmp_path):
    info = contract.LabelsFile(("a", "b", "c"), 64, "int8", "classifier_int8", 2, "head_tail", 16)
    contract.write_labels(tmp_path, info)
    assert contract.read_labels(tmp_path) == info
    old = {"labels": ["x", "y"], "max_length": 32}  # a file written before truncation was recorded
    (tmp_path / "labels.json").write_text(json.dumps(old))
    assert contract.read_labels(tmp_path).truncation == "head"
    for bad in ({"labels": ["only"], "max_length": 32}, {"labels": ["x", "y"]}, {**old, "truncation": "middle"}):
        (tmp_path / "labels.json").write_text(json.dumps(bad))
        with pytest.raises(contract.RepositoryError):
            contract.read_labels(tmp_path)
    with pytest.raises(contract.RepositoryError, match="missing"):
        contract.read_labels(tmp_path / "nowhere")


def test_provenance_and_version_checks(tmp_path):
    contract.write_provenance(tmp_path, {"data_hash": "abc"}, git_sha="deadbeef")
    prov = contract.read_provenance(tmp_path)
    assert prov["git_sha"] == "deadbeef" and prov["data_hash"] == "abc" and prov["published_at"].endswith("Z")
    assert contract.read_provenance(tmp_path / "none") == {}
    with pytest.raises(contract.RepositoryError, match="model.onnx"):
        contract.check_version(tmp_path)


def test_config_text_helpers_agree_with_the_committed_configs():
    text = (REPO_ROOT / "model_repository" / "classifier_int8" / "config.pbtxt").read_text()
    from service.triton.model_config import parse_model_config

    assert contract.config_max_batch_size(text) == parse_model_config(text).max_batch_size
    renamed = contract.rename_config(text, "classifier_small_int8")
    assert parse_model_config(renamed).name == "classifier_small_int8"
    assert contract.config_max_batch_size('name: "x"\nmax_batch_size: 0\n') is None


def test_contract_module_is_stdlib_only():
    code = (
        "import sys\n"
        "import service.triton.repository\n"
        "third = sorted({m.split('.')[0] for m in sys.modules} & {'numpy', 'google', 'tritonclient', 'pydantic'})\n"
        "assert not third, third\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
