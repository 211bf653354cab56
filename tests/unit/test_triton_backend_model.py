"""The python-backend model's padding, splitting, validation and batched ONNX Runtime run (no Triton needed).

Execution inside the real tritonserver is covered by tests/integration/test_triton.py.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.triton import backend_model as bm

VOCAB, HIDDEN, LABELS = 50, 4, 3


@pytest.fixture(scope="module")
def masked_mean_model(tmp_path_factory):
    """A tiny ONNX classifier: masked mean of token embeddings -> linear; invariant to right padding."""
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(VOCAB, HIDDEN)).astype(np.float32)
    weight = rng.normal(size=(HIDDEN, LABELS)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["embeddings", "input_ids"], ["emb"]),  # fails on ids >= VOCAB
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axis_last"], ["mask_3d"]),
        helper.make_node("Mul", ["emb", "mask_3d"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis_seq"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask_f", "axis_seq"], ["count"], keepdims=1),
        helper.make_node("Div", ["summed", "count"], ["mean"]),
        helper.make_node("MatMul", ["mean", "weight"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "masked_mean",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", LABELS])],
        initializer=[
            numpy_helper.from_array(embeddings, "embeddings"),
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "axis_last"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis_seq"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model_dir = tmp_path_factory.mktemp("classifier_tiny")
    (model_dir / "1").mkdir()
    onnx.save(model, model_dir / "1" / "model.onnx")
    return model_dir


@pytest.fixture(scope="module")
def loaded(masked_mean_model):
    model = bm.TritonPythonModel()
    config = {"name": "classifier_tiny", "parameters": {"intra_op_thread_count": {"string_value": "1"}}}
    model.initialize(
        {
            "model_config": json.dumps(config),
            "model_repository": str(masked_mean_model),
            "model_version": "1",
            "model_instance_kind": "CPU",
            "model_instance_device_id": "0",
        }
    )
    return model


def _request(rows: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(rows, length), dtype=np.int64)
    mask = np.ones_like(ids)
    return ids, mask


def test_pad_and_concatenate_pads_right_with_zero():
    a = (np.array([[5, 6, 7]]), np.array([[1, 1, 1]]))
    b = (np.array([[8], [9]]), np.array([[1], [1]]))
    ids, mask, rows = bm.pad_and_concatenate([a, b])
    assert rows == [1, 2]
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    np.testing.assert_array_equal(ids, [[5, 6, 7], [8, 0, 0], [9, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0], [1, 0, 0]])


def test_pad_and_concatenate_rejects_empty():
    with pytest.raises(ValueError, match="no requests"):
        bm.pad_and_concatenate([])


def test_split_rows_restores_request_boundaries():
    logits = np.arange(12, dtype=np.float32).reshape(6, 2)
    parts = bm.split_rows(logits, [1, 3, 2])
    assert [p.shape for p in parts] == [(1, 2), (3, 2), (2, 2)]
    np.testing.assert_array_equal(np.concatenate(parts), logits)
    with pytest.raises(ValueError, match="5 rows for 6 inputs"):
        bm.split_rows(logits[:5], [1, 3, 2])


@pytest.mark.parametrize(
    ("ids", "mask", "message"),
    [
        (np.zeros((3,), np.int64), np.zeros((3,), np.int64), "must be 2-D"),
        (np.zeros((1, 3), np.int64), np.zeros((1, 4), np.int64), "shape"),
        (np.zeros((0, 3), np.int64), np.zeros((0, 3), np.int64), "empty input"),
        (np.zeros((1, 9), np.int64), np.zeros((1, 9), np.int64), "exceeds max_sequence_length 8"),
        (np.full((1, 3), -1, np.int64), np.ones((1, 3), np.int64), ">= 0"),
        (np.zeros((1, 3), np.int64), np.full((1, 3), 2, np.int64), "0 or 1"),
        (np.zeros((1, 3), np.float32), np.zeros((1, 3), np.int64), "integers"),
    ],
)
def test_check_request_inputs_rejects(ids, mask, message):
    with pytest.raises(bm.RequestError, match=message):
        bm.check_request_inputs(ids, mask, max_sequence_length=8)


def test_check_request_inputs_accepts_valid():
    bm.check_request_inputs(*_request(2, 8, seed=1), max_sequence_length=8)


def test_choose_providers():
    cpu_only = ["CPUExecutionProvider"]
    with_cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert bm.choose_providers("CPU", 0, cpu_only) == ["CPUExecutionProvider"]
    assert bm.choose_providers("CPU", 0, with_cuda) == ["CPUExecutionProvider"]
    assert bm.choose_providers("GPU", 1, with_cuda)[0] == ("CUDAExecutionProvider", {"device_id": 1})
    with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
        bm.choose_providers("GPU", 0, cpu_only)


@pytest.mark.parametrize("kind", ["GPU", "KIND_GPU"])
def test_a_gpu_instance_that_fell_back_to_cpu_refuses_to_load(kind):
    """CUDA available but not in use (ONNX Runtime dropped it: missing cuDNN) must not serve silently on the CPU."""
    with pytest.raises(RuntimeError, match="refusing to serve on the CPU"):
        bm.check_providers_in_use(kind, ["CPUExecutionProvider"])
    bm.check_providers_in_use(kind, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    bm.check_providers_in_use("CPU", ["CPUExecutionProvider"])


def test_bad_thread_parameter_is_a_clear_error():
    with pytest.raises(ValueError, match="intra_op_thread_count.*'two'"):
        bm._parameter({"parameters": {"intra_op_thread_count": {"string_value": "two"}}}, "intra_op_thread_count", 1)


def test_missing_onnx_file_fails_initialize(tmp_path):
    with pytest.raises(RuntimeError, match="no model.onnx"):
        bm.TritonPythonModel().initialize(
            {"model_config": "{}", "model_repository": str(tmp_path), "model_version": "1"}
        )


def test_batched_run_equals_one_run_per_request(loaded):
    requests = [_request(1, 3, seed=2), _request(2, 7, seed=3), _request(1, 5, seed=4)]
    batched = loaded._run_batched(requests)
    for (ids, mask), result in zip(requests, batched, strict=True):
        alone = loaded._run(ids, mask)
        assert result.shape == (ids.shape[0], LABELS)
        np.testing.assert_allclose(result, alone, rtol=0, atol=1e-6)


def test_a_bad_request_fails_alone(loaded):
    good_a, good_b = _request(1, 4, seed=5), _request(2, 6, seed=6)
    bad_ids = np.full((1, 4), VOCAB + 10, dtype=np.int64)  # out of vocabulary: Gather fails
    results = loaded._run_batched([good_a, (bad_ids, np.ones_like(bad_ids)), good_b])
    assert isinstance(results[1], Exception)
    np.testing.assert_allclose(results[0], loaded._run(*good_a), atol=1e-6)
    np.testing.assert_allclose(results[2], loaded._run(*good_b), atol=1e-6)
