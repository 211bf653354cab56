"""``python -m service.modelprep build-generator --preset tiny``: every stage of the build, within a minute."""

from __future__ import annotations

import json
import math

import pytest

from service.modelprep.cli import main
from service.triton import model_config as mcfg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_generator_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("generator-build")
    code = main(
        ["build-generator", "--preset", "tiny", "--workdir", str(root / "work"), "--repository", str(root / "repo")]
    )
    assert code == 0
    return root, json.loads((root / "work" / "report.json").read_text())


def test_tiny_build_reports_parity_and_lora(tiny_generator_build):
    _, report = tiny_generator_build
    parity = report["parity"]
    assert parity["torch_cache_vs_no_cache_identical"] is True
    assert parity["onnx_fp32_vs_torch_identical"] is True
    assert parity["onnx_fp32_cache_vs_no_cache_identical"] is True
    assert parity["hf_vs_kvmodel_max_abs_logit_diff"] < 1e-4
    assert parity["token_agreement_vs_fp32"]["fp32"] == 1.0
    assert 0.0 <= parity["token_agreement_vs_fp32"]["int8"] <= 1.0
    lora = report["lora"]
    assert (lora["r"], lora["alpha"], lora["dropout"]) == (16, 32, 0.1)
    assert lora["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    # 2 layers x (q: 128->128, k: 128->64, v: 128->64, o: 128->128), each A (r x in) + B (out x r), r = 16.
    assert lora["trainable_parameters"] == 2 * 16 * ((128 + 128) + (128 + 64) + (128 + 64) + (128 + 128))
    quality = report["quality"]
    assert all(math.isfinite(quality[k]) for k in ("answer_perplexity_before", "answer_perplexity_after"))
    assert all(0.0 <= quality[k] <= 1.0 for k in ("greedy_exact_accuracy_before", "greedy_exact_accuracy_after"))
    assert {row["new_tokens"] for row in report["speed_single_sequence"]} == {4, 8}
    assert report["sizes_bytes"]["int8"] < report["sizes_bytes"]["fp32"]


def test_tiny_build_publishes_a_valid_triton_model(tiny_generator_build):
    root, report = tiny_generator_build
    model_dir = root / "repo" / "generator_fp32"
    assert report["published"] == {"fp32": str(model_dir)}
    config = mcfg.load_model_config(model_dir)  # Triton's own ModelConfig protobuf parses it
    assert config.name == "generator_fp32" and config.backend == "python"
    assert config.model_transaction_policy.decoupled
    assert config.max_batch_size == 0
    assert {t.name for t in config.input} >= {"input_ids", "max_new_tokens", "temperature", "top_p", "seed"}
    assert int(config.parameters["max_kv_cache_bytes"].string_value) == 8 * 1024 * 1024
    version = model_dir / "1"
    for name in ("model.onnx", "model.py", "tokenizer.json", "generation.json", "provenance.json"):
        assert (version / name).is_file(), name
    meta = json.loads((version / "generation.json").read_text())
    assert meta["eos_token_ids"] == [2] and meta["chat_format"] == "chatml"
    assert meta["bytes_per_token"] == 2 * 2 * 2 * 32 * 4
