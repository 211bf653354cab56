"""Triton python-backend model: runs the version directory's ``model.onnx`` with ONNX Runtime.

``service.modelprep`` copies this file into every version directory as ``<model>/<version>/model.py``
(docs/model_repository.md). Inside Triton it runs in the python backend stub, whose interpreter finds our
environment's numpy and onnxruntime (the launcher puts the venv's ``bin/`` first on PATH). It therefore
imports nothing from ``service`` and nothing beyond numpy, onnxruntime and the stub's
``triton_python_backend_utils``.

Why padding happens here: the model config marks both inputs ``allow_ragged_batch``, so Triton's dynamic
batcher hands one ``execute`` call requests of different sequence lengths. Each request is ``[b_i, L_i]``;
they are padded to the longest ``L`` of the whole Triton batch (pad id 0, mask 0), concatenated and run
through ONNX Runtime once, and the logits rows are split back per request. Without this, Triton only
batches identical shapes and batches stay at size 1 for real text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:  # Only importable inside Triton's python backend stub.
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - exercised by unit tests of the pure helpers below
    pb_utils = None

try:
    import onnxruntime as ort
except ImportError:  # pragma: no cover - reported clearly by initialize()
    ort = None

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"
PAD_TOKEN_ID = 0

DEFAULT_INTRA_OP_THREADS = 2
DEFAULT_INTER_OP_THREADS = 1
DEFAULT_MAX_SEQUENCE_LENGTH = 512
# ONNX Runtime's intra-op threads busy-wait ("spin") after each run by default. On a small CPU pod shared with the
# gateway, the spinning threads take the cores the gateway and Triton's own threads need, and some executions then
# stall for ~0.5 s. Measured on 2 cores, 64 closed-loop clients through the gateway: with spinning 620 req/s, P99
# 600 ms (2% of backend calls 0.5-0.75 s); without 843 req/s, P99 120 ms. Set the parameter to 1 on dedicated cores.
DEFAULT_ALLOW_SPINNING = 0


class RequestError(ValueError):
    """A problem with one request's inputs; answered to that request only."""


def check_request_inputs(input_ids: np.ndarray, attention_mask: np.ndarray, max_sequence_length: int) -> None:
    """Validate one request's tensors before they join a padded batch.

    A bad request must fail alone: once padded into the shared batch, an out-of-range value would make the
    single ONNX Runtime run fail for every request of the batch.

    Args:
        input_ids: The request's token ids, expected ``[b, L]`` integers.
        attention_mask: The request's mask, same shape, values 0 or 1.
        max_sequence_length: Longest ``L`` accepted; 0 disables the check.

    Raises:
        RequestError: If shapes, dtypes or values are unusable.
    """
    if input_ids.ndim != 2 or attention_mask.ndim != 2:
        raise RequestError(
            f"{INPUT_IDS} and {ATTENTION_MASK} must be 2-D [batch, seq]; got shapes "
            f"{list(input_ids.shape)} and {list(attention_mask.shape)}"
        )
    if input_ids.shape != attention_mask.shape:
        raise RequestError(
            f"{INPUT_IDS} shape {list(input_ids.shape)} != {ATTENTION_MASK} shape {list(attention_mask.shape)}"
        )
    batch, seq = input_ids.shape
    if batch < 1 or seq < 1:
        raise RequestError(f"empty input: shape {list(input_ids.shape)}")
    if max_sequence_length and seq > max_sequence_length:
        raise RequestError(f"sequence length {seq} exceeds max_sequence_length {max_sequence_length}")
    if not np.issubdtype(input_ids.dtype, np.integer) or not np.issubdtype(attention_mask.dtype, np.integer):
        raise RequestError(f"inputs must be integers; got {input_ids.dtype} and {attention_mask.dtype}")
    if int(input_ids.min()) < 0:
        raise RequestError(f"{INPUT_IDS} must be >= 0")
    if int(attention_mask.min()) < 0 or int(attention_mask.max()) > 1:
        raise RequestError(f"{ATTENTION_MASK} values must be 0 or 1")


def pad_and_concatenate(
    batches: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Pad requests to the longest sequence among them and stack them into one batch.

    Args:
        batches: ``(input_ids, attention_mask)`` pairs, each ``[b_i, L_i]``.

    Returns:
        ``(input_ids, attention_mask, rows)``: INT64 arrays ``[sum(b_i), max(L_i)]`` padded with id 0 and
        mask 0 on the right, and the row count ``b_i`` of each request, in order, for :func:`split_rows`.

    Raises:
        ValueError: If ``batches`` is empty.
    """
    if not batches:
        raise ValueError("no requests to batch")
    rows = [int(ids.shape[0]) for ids, _ in batches]
    max_len = max(int(ids.shape[1]) for ids, _ in batches)
    total = sum(rows)
    input_ids = np.full((total, max_len), PAD_TOKEN_ID, dtype=np.int64)
    attention_mask = np.zeros((total, max_len), dtype=np.int64)
    start = 0
    for (ids, mask), n in zip(batches, rows, strict=True):
        seq = ids.shape[1]
        input_ids[start : start + n, :seq] = ids
        attention_mask[start : start + n, :seq] = mask
        start += n
    return input_ids, attention_mask, rows


def split_rows(logits: np.ndarray, rows: Sequence[int]) -> list[np.ndarray]:
    """Split a batch's logits back into one array per request.

    Args:
        logits: ``[sum(rows), num_labels]``.
        rows: Row count of each request, as returned by :func:`pad_and_concatenate`.

    Returns:
        One ``[rows[i], num_labels]`` array per request.

    Raises:
        ValueError: If the logits do not have ``sum(rows)`` rows.
    """
    if logits.shape[0] != sum(rows):
        raise ValueError(f"model returned {logits.shape[0]} rows for {sum(rows)} inputs")
    return np.split(logits, np.cumsum(rows)[:-1].tolist(), axis=0) if rows else []


def _parameter(model_config: dict[str, Any], key: str, default: int) -> int:
    raw = model_config.get("parameters", {}).get(key, {}).get("string_value", "")
    if raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"config parameter {key!r} must be an integer, got {raw!r}") from exc
    if value < 0:
        raise ValueError(f"config parameter {key!r} must be >= 0, got {value}")
    return value


def choose_providers(instance_kind: str, device_id: int, available: Sequence[str]) -> list[Any]:
    """Pick ONNX Runtime execution providers for a Triton model instance.

    A ``KIND_GPU`` instance must run on CUDA: falling back to CPU there would look healthy while being
    many times slower, so it is an error instead. Any other instance kind uses CUDA when the installed
    onnxruntime offers it, else the CPU.

    Args:
        instance_kind: ``args["model_instance_kind"]`` from Triton (``"CPU"``, ``"GPU"``, ...).
        device_id: ``args["model_instance_device_id"]``.
        available: ``onnxruntime.get_available_providers()``.

    Returns:
        The providers list for ``onnxruntime.InferenceSession``.

    Raises:
        RuntimeError: For a GPU instance without ``CUDAExecutionProvider`` (install onnxruntime-gpu).
    """
    has_cuda = "CUDAExecutionProvider" in available
    kind = instance_kind.upper()
    if kind == "GPU" and not has_cuda:
        raise RuntimeError(
            "instance_group kind is KIND_GPU but onnxruntime has no CUDAExecutionProvider "
            f"(available: {list(available)}); install onnxruntime-gpu in Triton's python environment"
        )
    if has_cuda and kind != "CPU":
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _log(level: str, message: str) -> None:
    logger = getattr(pb_utils, "Logger", None) if pb_utils is not None else None
    if logger is not None:
        getattr(logger, f"log_{level}")(message)
    else:  # pragma: no cover - outside Triton
        print(f"[{level}] {message}")


def check_providers_in_use(instance_kind: str, in_use: Sequence[str]) -> None:
    """Refuse a GPU instance whose session does not run on CUDA.

    ``CUDAExecutionProvider`` can be *available* and still not be *used*: ONNX Runtime drops a provider it cannot
    initialize (a missing cuDNN, a CUDA/driver mismatch) with a warning and runs everything on the CPU. For a
    ``KIND_GPU`` instance that is a silent 10x slowdown, so the model fails to load instead.

    Args:
        instance_kind: Triton's ``model_instance_kind`` (``CPU``/``GPU``, or ``KIND_*``).
        in_use: ``InferenceSession.get_providers()``, in priority order.

    Raises:
        RuntimeError: For a GPU instance whose first provider in use is not CUDA.
    """
    if instance_kind.upper().removeprefix("KIND_") == "GPU" and (not in_use or in_use[0] != "CUDAExecutionProvider"):
        raise RuntimeError(
            f"instance_group kind is KIND_GPU but ONNX Runtime runs on {list(in_use)}: CUDAExecutionProvider failed "
            "to initialize (check cuDNN / CUDA libraries in Triton's environment); refusing to serve on the CPU"
        )


class TritonPythonModel:
    """One ONNX Runtime session per Triton model instance; batches ragged requests into one run."""

    def initialize(self, args: dict[str, str]) -> None:
        """Load ``<model dir>/<version>/model.onnx`` into an ONNX Runtime session.

        Args:
            args: Triton's model arguments (``model_config`` JSON, ``model_repository`` = the model's
                directory, ``model_version``, ``model_instance_kind``, ``model_instance_device_id``).

        Raises:
            RuntimeError: If onnxruntime is missing, the ONNX file is absent, or a GPU instance has no CUDA.
        """
        if ort is None:
            raise RuntimeError("onnxruntime is not importable in Triton's python backend environment")
        config = json.loads(args["model_config"])
        self._model_name = config.get("name", "?")
        version_dir = Path(args["model_repository"]) / str(args["model_version"])
        model_path = version_dir / "model.onnx"
        if not model_path.is_file():
            raise RuntimeError(f"{self._model_name}: no model.onnx in {version_dir}")

        self._max_sequence_length = _parameter(config, "max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH)
        options = ort.SessionOptions()
        options.intra_op_num_threads = _parameter(config, "intra_op_thread_count", DEFAULT_INTRA_OP_THREADS)
        options.inter_op_num_threads = _parameter(config, "inter_op_thread_count", DEFAULT_INTER_OP_THREADS)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        spinning = _parameter(config, "allow_spinning", DEFAULT_ALLOW_SPINNING)
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
        providers = choose_providers(
            args.get("model_instance_kind", "CPU"),
            int(args.get("model_instance_device_id", 0) or 0),
            ort.get_available_providers(),
        )
        self._session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
        check_providers_in_use(args.get("model_instance_kind", "CPU"), self._session.get_providers())
        self._logits_dtype = np.float32
        if pb_utils is not None:
            output_config = pb_utils.get_output_config_by_name(config, LOGITS)
            if output_config is not None:
                self._logits_dtype = pb_utils.triton_string_to_numpy(output_config["data_type"])
        _log(
            "info",
            f"{self._model_name}: loaded {model_path} with {self._session.get_providers()}, "
            f"threads intra={options.intra_op_num_threads} inter={options.inter_op_num_threads}, spinning={spinning}",
        )

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        (logits,) = self._session.run([LOGITS], {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask})
        return np.asarray(logits, dtype=self._logits_dtype)

    def _run_batched(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray | Exception]:
        """One ORT run for all requests; on failure, re-run each alone so only the culprit fails."""
        try:
            ids, mask, rows = pad_and_concatenate(pairs)
            return list(split_rows(self._run(ids, mask), rows))
        except Exception as batch_error:  # noqa: BLE001 - turned into per-request errors below
            if len(pairs) == 1:
                return [batch_error]
            _log("warn", f"{self._model_name}: batched run failed ({batch_error}); isolating requests")
        results: list[np.ndarray | Exception] = []
        for ids, mask in pairs:
            try:
                results.append(self._run(ids.astype(np.int64, copy=False), mask.astype(np.int64, copy=False)))
            except Exception as error:  # noqa: BLE001
                results.append(error)
        return results

    def execute(self, requests: list[Any]) -> list[Any]:
        """Run one Triton batch: validate, pad to the longest sequence, one ORT run, split per request.

        Args:
            requests: ``pb_utils.InferenceRequest`` objects, each with ``input_ids`` and ``attention_mask``
                of shape ``[b_i, L_i]``.

        Returns:
            One ``pb_utils.InferenceResponse`` per request, in order; a failed request carries a
            ``pb_utils.TritonError`` instead of outputs, and never affects the others.
        """
        responses: list[Any] = [None] * len(requests)
        valid_indices: list[int] = []
        pairs: list[tuple[np.ndarray, np.ndarray]] = []
        for index, request in enumerate(requests):
            try:
                ids_tensor = pb_utils.get_input_tensor_by_name(request, INPUT_IDS)
                mask_tensor = pb_utils.get_input_tensor_by_name(request, ATTENTION_MASK)
                if ids_tensor is None or mask_tensor is None:
                    raise RequestError(f"request needs both {INPUT_IDS} and {ATTENTION_MASK}")
                ids, mask = ids_tensor.as_numpy(), mask_tensor.as_numpy()
                check_request_inputs(ids, mask, self._max_sequence_length)
            except Exception as error:  # noqa: BLE001 - answered to this request only
                responses[index] = self._error_response(error)
                continue
            valid_indices.append(index)
            pairs.append((ids, mask))

        if pairs:
            for index, result in zip(valid_indices, self._run_batched(pairs), strict=True):
                if isinstance(result, Exception):
                    responses[index] = self._error_response(result)
                else:
                    responses[index] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(LOGITS, result)])
        return responses

    def _error_response(self, error: Exception) -> Any:
        invalid = isinstance(error, RequestError)
        message = f"{self._model_name}: {error}"
        code_holder = getattr(pb_utils.TritonError, "INVALID_ARG" if invalid else "INTERNAL", None)
        triton_error = (
            pb_utils.TritonError(message, code_holder) if code_holder is not None else pb_utils.TritonError(message)
        )
        return pb_utils.InferenceResponse(output_tensors=[], error=triton_error)

    def finalize(self) -> None:
        """Release the ONNX Runtime session when Triton unloads the model."""
        self._session = None
