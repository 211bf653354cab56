"""The classifier's GPU check (bench/gpu/classifier_check.py): its torch-only BERT, its bundle and its CPU dry run.

The GPU machine has only torch (and perhaps onnxruntime), so the check rebuilds the model in plain PyTorch and the
bundle carries the build's weights, test set and ONNX files in <= 64 MiB. What is checked here: the rebuilt model
is the model transformers runs, the bundle's cut vocabulary does not change a logit, and the dry run measures
every engine and precision.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu" / "classifier_check.py"


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("classifier_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bundle(check, tiny_build, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-bundle")
    manifest = check.make_bundle(tiny_build.workdir, out, tiny_build.report_path)
    return out, manifest


def test_torch_bert_is_the_transformers_model(check):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=97,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=40,
        num_labels=5,
    )
    reference = BertForSequenceClassification(cfg).eval()
    ours = check.TorchBert({**cfg.to_dict(), "num_labels": 5}).eval()
    ours.load_state_dict(check.hf_to_torch_bert_names(reference.state_dict()))
    ids = torch.randint(1, 97, (4, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding, as the gateway sends it
    mask[3, 3:] = 0
    ids[mask == 0] = 0
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, mask)
    assert got.shape == (4, 5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_bundle_fits_and_cutting_the_vocabulary_keeps_every_logit(check, bundle, tiny_build):
    out, manifest = bundle
    size = sum(p.stat().st_size for p in out.iterdir())
    assert size <= check.BUNDLE_LIMIT_BYTES
    assert manifest["bundle_mib"] * 2**20 == pytest.approx(size - (out / "manifest.json").stat().st_size, rel=0.01)
    assert manifest["kept_vocabulary"] < 30522  # MiniLM's table, cut to the test set's tokens
    assert set(manifest["onnx"]) == {"fp16", "int8"} and not manifest["left_out"]
    payload = torch.load(out / "bundle.pt", weights_only=True)
    ids, original, mask = (payload[k][:32].long().numpy() for k in ("test_ids", "test_ids_original", "test_mask"))
    width = int(mask.sum(1).max())
    ids, original, mask = ids[:, :width], original[:, :width], mask[:, :width]
    for variant, served in (("fp16", tiny_build.workdir / "fp16" / "fp16.onnx"), ("int8", None)):
        served = served or next((tiny_build.workdir / "int8").glob("*/model.onnx"))
        assert manifest["onnx"][variant]["vocab"] == "cut"
        whole = ort.InferenceSession(str(served), providers=["CPUExecutionProvider"])
        cut = ort.InferenceSession(str(out / manifest["onnx"][variant]["file"]), providers=["CPUExecutionProvider"])
        want = whole.run(["logits"], {"input_ids": original, "attention_mask": mask})[0]
        got = cut.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
        np.testing.assert_array_equal(got, want)
    # The torch weights (FP16 in the bundle, run in FP32) against the build's FP32 ONNX file on the original ids.
    model = check.TorchBert(payload["config"]).eval()
    model.load_state_dict({k: v.float() for k, v in payload["state_dict_fp16"].items()})
    with torch.no_grad():
        got = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    fp32 = ort.InferenceSession(str(tiny_build.workdir / "onnx" / "fp32.onnx"), providers=["CPUExecutionProvider"])
    want = fp32.run(["logits"], {"input_ids": original, "attention_mask": mask})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-3)  # the FP16 rounding of the weights


def test_dry_run_on_cpu_measures_every_engine_and_agrees(check, bundle, tmp_path, capsys):
    out_dir, _ = bundle
    out = tmp_path / "check.json"
    argv = ["run", "--bundle", str(out_dir), "--device", "cpu", "--batches", "1", "4", "--seconds", "0.05"]
    assert check.main([*argv, "--repeats", "1", "--limit", "96", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["machine"]["device"] == "cpu"
    assert report["settings"]["test_texts_used"] == 96
    engines = {(r["engine"], r["dtype"], r["batch"]) for r in report["rows"]}
    assert engines == {(e, d, b) for e, d in report_series() for b in (1, 4)}
    assert all(r["sequences_per_second"] > 0 for r in report["rows"])
    quality = report["quality"]
    assert quality["fp16"]["top1_agreement"] >= 0.95 and quality["fp16"]["max_abs_logit_diff"] < 0.05
    for variant in ("fp16", "int8"):
        assert report["onnx"][variant]["providers"] == ["CPUExecutionProvider"]
    # FP16 ONNX and torch FP16 see the same weights: same answers.
    assert report["onnx"]["fp16"]["vs_torch_fp32_top1_agreement"] >= 0.95
    assert not report["skipped_over_budget"]
    printed = capsys.readouterr().out
    assert "sequences/s" in printed and "torch fp16: accuracy" in printed


def report_series() -> list[tuple[str, str]]:
    return [("torch", "fp32"), ("torch", "fp16"), ("onnxruntime", "fp16"), ("onnxruntime", "int8")]


def test_gpu_run_skips_the_onnx_part_without_a_cuda_provider(check, bundle, tmp_path, monkeypatch):
    out_dir, _ = bundle
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    args = check.parse_args(["run", "--bundle", str(out_dir), "--device", "cuda", "--out", str(tmp_path / "x.json")])
    payload = torch.load(out_dir / "bundle.pt", weights_only=True)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    result = check._run_onnx(args, manifest, payload, None, None, None, None, [], [], lambda: False)
    assert "no CUDA provider" in result["skipped"]


@pytest.mark.gpu
def test_full_check_on_gpu(check, bundle, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    out_dir, manifest = bundle
    out = tmp_path / "check.json"
    assert check.main(["run", "--bundle", str(out_dir), "--device", "cuda", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["quality"]["fp32"]["accuracy"] == pytest.approx(manifest["reported_test_accuracy"]["fp32"], abs=2e-3)
