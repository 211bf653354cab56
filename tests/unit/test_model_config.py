"""The committed Triton configs parse with Triton's own ModelConfig protobuf and meet the repository contract."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.triton import model_config as mcfg
from service.triton.model_config import ModelConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = REPO_ROOT / "model_repository"
COMMITTED = sorted(p.parent.name for p in MODEL_REPOSITORY.glob("*/config.pbtxt"))


def _committed_text(name: str = "classifier_int8") -> str:
    return (MODEL_REPOSITORY / name / "config.pbtxt").read_text()


def test_both_variants_are_committed():
    assert {"classifier_int8", "classifier_fp16"} <= set(COMMITTED)


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_config_meets_contract(name):
    config = mcfg.load_and_validate(MODEL_REPOSITORY / name)
    assert config.name == name
    assert config.backend == "python"
    assert config.max_batch_size >= 1
    assert all(t.allow_ragged_batch for t in config.input)
    policy = config.dynamic_batching.default_queue_policy
    assert policy.max_queue_size >= 1
    assert policy.allow_timeout_override
    assert config.instance_group[0].kind == mcfg.mc.ModelInstanceGroup.KIND_CPU
    # Warm-up must feed both inputs, or Triton refuses to load the model.
    assert {w_input for w in config.model_warmup for w_input in w.inputs} == set(mcfg.INPUT_NAMES)
    assert int(config.parameters["intra_op_thread_count"].string_value) >= 1


def test_load_repository_configs_and_read_max_batch_size():
    configs = mcfg.load_repository_configs(MODEL_REPOSITORY)
    assert sorted(configs) == COMMITTED
    assert mcfg.read_max_batch_size(MODEL_REPOSITORY, "classifier_int8") == configs["classifier_int8"].max_batch_size


def test_read_max_batch_size_of_missing_model_names_the_file(tmp_path):
    with pytest.raises(ModelConfigError, match="no such config file"):
        mcfg.read_max_batch_size(tmp_path, "classifier_int8")


def test_syntax_error_is_rejected_with_location():
    with pytest.raises(ModelConfigError, match=r"broken\.pbtxt: not a valid Triton ModelConfig: .*max_batch_sise"):
        mcfg.parse_model_config(_committed_text().replace("max_batch_size", "max_batch_sise"), source="broken.pbtxt")


def test_bad_enum_is_rejected_by_the_protobuf():
    with pytest.raises(ModelConfigError, match="TYPE_INT65"):
        mcfg.parse_model_config(_committed_text().replace("TYPE_INT64", "TYPE_INT65", 1))


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("allow_ragged_batch: true", "allow_ragged_batch: false", "allow_ragged_batch"),
        ("max_queue_size: 128", "max_queue_size: 0", "max_queue_size must be >= 1"),
        ("max_batch_size: 64", "max_batch_size: 0", "max_batch_size must be >= 1"),
        ('name: "input_ids"', 'name: "token_ids"', "inputs must be exactly"),
        ("data_type: TYPE_FP32", "data_type: TYPE_FP16", "must be TYPE_FP32"),
        ("timeout_action: REJECT", "timeout_action: DELAY", "timeout_action must be REJECT"),
        ("max_queue_delay_microseconds: 100", "max_queue_delay_microseconds: 500000", "max_queue_delay"),
        ('backend: "python"', 'backend: "tensorflow"', "backend must be one of"),
        ('backend: "python"', 'backend: "onnxruntime"', "does not pad ragged inputs"),
        ("kind: KIND_CPU\n    count: 2", "kind: KIND_CPU\n    count: 0", "count must be >= 1"),
    ],
)
def test_contract_violation_is_named(old, new, expected):
    text = _committed_text()
    assert old in text, f"fixture drift: {old!r} not in the committed config"
    config = mcfg.parse_model_config(text.replace(old, new, 1))
    with pytest.raises(ModelConfigError, match=expected):
        mcfg.validate_model_config(config, source="classifier_int8/config.pbtxt")


def test_missing_queue_policy_is_unbounded_and_rejected():
    config = mcfg.parse_model_config(_committed_text())
    config.dynamic_batching.ClearField("default_queue_policy")
    problems = mcfg.contract_violations(config)
    assert any("unbounded" in p for p in problems)


def test_all_problems_are_reported_together():
    config = mcfg.parse_model_config(_committed_text())
    config.max_batch_size = 0
    config.ClearField("dynamic_batching")
    assert len(mcfg.contract_violations(config)) == 2


def test_directory_name_must_match(tmp_path):
    model_dir = tmp_path / "classifier_other"
    model_dir.mkdir()
    (model_dir / "config.pbtxt").write_text(_committed_text())
    with pytest.raises(ModelConfigError, match="must equal the model directory name 'classifier_other'"):
        mcfg.load_and_validate(model_dir)


def test_render_onnxruntime_config_round_trips():
    ours = mcfg.load_and_validate(MODEL_REPOSITORY / "classifier_int8")
    rendered = mcfg.parse_model_config(mcfg.to_pbtxt(mcfg.render_onnxruntime_config(ours)))
    assert rendered.backend == "onnxruntime"
    assert rendered.platform == "onnxruntime_onnx"
    assert not any(t.allow_ragged_batch for t in rendered.input)
    assert "max_sequence_length" not in rendered.parameters
    assert (
        rendered.parameters["intra_op_thread_count"].string_value
        == ours.parameters["intra_op_thread_count"].string_value
    )
    assert rendered.dynamic_batching == ours.dynamic_batching
    # The source message is left untouched.
    assert ours.backend == "python" and all(t.allow_ragged_batch for t in ours.input)


@pytest.mark.parametrize("variant", ["int8", "fp16"])
def test_render_model_config_for_each_target(variant):
    kind = mcfg.mc.ModelInstanceGroup
    cpu = mcfg.render_model_config(variant, "cpu")
    assert cpu.backend == "python" and [g.kind for g in cpu.instance_group] == [kind.KIND_CPU]
    assert cpu == mcfg.load_and_validate(MODEL_REPOSITORY / f"classifier_{variant}")  # the embedded default's
    gpu = mcfg.render_model_config(variant, "gpu", instance_count=2)
    assert gpu.backend == "onnxruntime" and gpu.platform == "onnxruntime_onnx"
    assert [(g.kind, g.count) for g in gpu.instance_group] == [(kind.KIND_GPU, 2)]
    assert not gpu.output  # auto-completed from model.onnx: [batch, num_labels] is model-specific
    assert not gpu.optimization.execution_accelerators.gpu_execution_accelerator
    trt = mcfg.render_model_config(variant, "gpu", accelerator="tensorrt")
    (accelerator,) = trt.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
    for config in (cpu, gpu, trt):  # what Triton parses is what we rendered
        assert mcfg.parse_model_config(mcfg.to_pbtxt(config)) == config


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"target": "tpu"}, "target must be one of"),
        ({"accelerator": "rocm"}, "accelerator"),
        ({"instance_count": 0}, "instance_count"),
    ],
)
def test_render_model_config_rejects_unknown_options(kwargs, expected):
    with pytest.raises(ModelConfigError, match=expected):
        mcfg.render_model_config("int8", **{"target": "gpu", **kwargs})


def test_render_cli_writes_the_chart_files(tmp_path):
    assert mcfg.main(["render", "--target", "gpu", "--output", str(tmp_path)]) == 0
    chart = REPO_ROOT / "helm" / "loraserve" / "files" / "triton" / "gpu"
    for path in sorted(tmp_path.glob("*.pbtxt")):
        assert path.read_text() == (chart / path.name).read_text()
