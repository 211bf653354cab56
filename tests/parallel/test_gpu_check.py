"""The GPU check script (bench/gpu/generator_check.py): its CPU dry run, and the real run where a GPU exists."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu" / "generator_check.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("generator_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_writes_the_table_and_json(tmp_path, capsys):
    check = _load_script()
    out = tmp_path / "check.json"
    assert check.main(["--dry-run", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["machine"]["device"] == "cpu"
    assert {(r["dtype"], r["batch"]) for r in report["rows"]} == {("fp16", 1), ("fp16", 2), ("fp32", 1), ("fp32", 2)}
    for row in report["rows"]:
        assert row["cache_tokens_per_second"] > 0 and row["no_cache_tokens_per_second"] > 0
        if row["dtype"] == "fp32":  # the cache must not change greedy output
            assert row["cache_tokens_identical_fraction"] == 1.0
    agreement = report["fp16_vs_fp32"]
    assert agreement["max_abs_logit_diff"] < 0.05 < agreement["logit_std_fp32"]
    assert not report["skipped_over_budget"]
    printed = capsys.readouterr().out
    assert "no-cache tok/s" in printed and "FP16 vs FP32" in printed


@pytest.mark.gpu
def test_full_check_on_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    check = _load_script()
    out = tmp_path / "check.json"
    assert check.main(["--device", "cuda", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["parameters"] > 130_000_000  # SmolLM2-135M's shape
    assert all(r["cache_tokens_identical_fraction"] == 1.0 for r in report["rows"] if r["dtype"] == "fp32")
