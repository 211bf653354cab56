"""Read and check Triton ``config.pbtxt`` files with Triton's own ``ModelConfig`` protobuf.

Parsing with the protobuf that tritonclient ships (``tritonclient.grpc.model_config_pb2``) catches what Triton
itself would reject (unknown fields, wrong enum names, type errors) without starting a server. On top of that,
:func:`validate_model_config` enforces the project's contract (docs/model_repository.md): the tensor names and
types the gateway sends, ragged batching on, a bounded queue. The gateway calls :func:`read_max_batch_size` to
check that its own batch size fits Triton's.

:func:`render_onnxruntime_config` derives the config for Triton's native ``onnxruntime`` backend from ours
(docs/triton.md explains when to prefer it).
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

CONFIG_FILE = "config.pbtxt"
MODEL_NAME_PREFIX = "classifier_"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
# The Triton batcher is the second guard behind the gateway's batcher; a long delay here adds directly to
# every request's latency, so anything beyond 100 ms is treated as a mistake.
MAX_QUEUE_DELAY_MICROSECONDS = 100_000

ModelConfig = mc.ModelConfig


class ModelConfigError(ValueError):
    """A config.pbtxt that Triton cannot parse or that breaks the model repository contract."""


def parse_model_config(text: str, *, source: str = "<string>") -> ModelConfig:
    """Parse protobuf text format into Triton's ``ModelConfig``.

    Args:
        text: The ``config.pbtxt`` contents.
        source: Where the text came from, for error messages.

    Returns:
        The parsed message.

    Raises:
        ModelConfigError: If the text is not a valid ``ModelConfig`` (the message names the line and field).
    """
    try:
        return text_format.Parse(text, ModelConfig())
    except text_format.ParseError as error:
        raise ModelConfigError(f"{source}: not a valid Triton ModelConfig: {error}") from error


def load_model_config(path: Path) -> ModelConfig:
    """Parse one ``config.pbtxt`` file (or a model directory containing one).

    Args:
        path: The file, or the model directory that holds ``config.pbtxt``.

    Returns:
        The parsed message.

    Raises:
        ModelConfigError: If the file is missing or invalid.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    if not path.is_file():
        raise ModelConfigError(f"{path}: no such config file")
    return parse_model_config(path.read_text(encoding="utf-8"), source=str(path))


def contract_violations(config: ModelConfig, *, expected_name: str | None = None) -> list[str]:
    """List every way a parsed config breaks the model repository contract.

    Args:
        config: A parsed ``ModelConfig``.
        expected_name: The model's directory name; the config's ``name`` must equal it when given.

    Returns:
        Human-readable problems; empty when the config is acceptable.
    """
    problems: list[str] = []
    if expected_name is not None and config.name != expected_name:
        problems.append(f"name {config.name!r} must equal the model directory name {expected_name!r}")
    if not config.name.startswith(MODEL_NAME_PREFIX):
        problems.append(f"name {config.name!r} must start with {MODEL_NAME_PREFIX!r}")
    if config.backend != "python":
        problems.append(f"backend must be 'python' (got {config.backend!r})")
    if config.max_batch_size < 1:
        problems.append(f"max_batch_size must be >= 1 (got {config.max_batch_size}); 0 disables batching")

    inputs = {tensor.name: tensor for tensor in config.input}
    if sorted(inputs) != sorted(INPUT_NAMES):
        problems.append(f"inputs must be exactly {list(INPUT_NAMES)} (got {sorted(inputs)})")
    for name in INPUT_NAMES:
        tensor = inputs.get(name)
        if tensor is None:
            continue
        if tensor.data_type != mc.TYPE_INT64:
            problems.append(f"input {name} must be TYPE_INT64 (got {mc.DataType.Name(tensor.data_type)})")
        if list(tensor.dims) != [-1]:
            problems.append(f"input {name} dims must be [-1] (got {list(tensor.dims)})")
        if not tensor.allow_ragged_batch:
            problems.append(
                f"input {name} needs allow_ragged_batch: true, else requests of different lengths never batch"
            )

    outputs = {tensor.name: tensor for tensor in config.output}
    if list(outputs) != [OUTPUT_NAME]:
        problems.append(f"outputs must be exactly ['{OUTPUT_NAME}'] (got {list(outputs)})")
    elif outputs[OUTPUT_NAME].data_type != mc.TYPE_FP32:
        problems.append(
            f"output {OUTPUT_NAME} must be TYPE_FP32 (got {mc.DataType.Name(outputs[OUTPUT_NAME].data_type)})"
        )
    elif list(outputs[OUTPUT_NAME].dims) != [-1]:
        problems.append(f"output {OUTPUT_NAME} dims must be [-1] (got {list(outputs[OUTPUT_NAME].dims)})")

    if not config.HasField("dynamic_batching"):
        problems.append("dynamic_batching must be set")
    else:
        batching = config.dynamic_batching
        delay = batching.max_queue_delay_microseconds
        if not 0 < delay <= MAX_QUEUE_DELAY_MICROSECONDS:
            problems.append(
                f"dynamic_batching.max_queue_delay_microseconds must be in (0, {MAX_QUEUE_DELAY_MICROSECONDS}] "
                f"(got {delay})"
            )
        if not batching.HasField("default_queue_policy"):
            problems.append("dynamic_batching.default_queue_policy must be set (else the queue is unbounded)")
        else:
            policy = batching.default_queue_policy
            if policy.max_queue_size < 1:
                problems.append(
                    f"default_queue_policy.max_queue_size must be >= 1 (got {policy.max_queue_size}; 0 = unbounded)"
                )
            if policy.timeout_action != mc.ModelQueuePolicy.REJECT:
                problems.append("default_queue_policy.timeout_action must be REJECT")
            if policy.default_timeout_microseconds <= 0:
                problems.append("default_queue_policy.default_timeout_microseconds must be > 0")

    if not config.instance_group:
        problems.append("instance_group must list at least one group")
    for group in config.instance_group:
        if group.count < 1:
            problems.append(f"instance_group count must be >= 1 (got {group.count})")
    return problems


def validate_model_config(config: ModelConfig, *, expected_name: str | None = None, source: str = "") -> None:
    """Raise if a parsed config breaks the contract.

    Args:
        config: A parsed ``ModelConfig``.
        expected_name: The model's directory name, checked against ``config.name`` when given.
        source: Where it came from, for the message.

    Raises:
        ModelConfigError: Listing every problem found, not just the first.
    """
    problems = contract_violations(config, expected_name=expected_name)
    if problems:
        where = source or config.name or "config"
        raise ModelConfigError(f"{where}: " + "; ".join(problems))


def load_and_validate(model_dir: Path) -> ModelConfig:
    """Parse ``<model_dir>/config.pbtxt`` and check it against the contract.

    Args:
        model_dir: A model directory of the repository (its name is the model name).

    Returns:
        The validated config.

    Raises:
        ModelConfigError: If the file is missing, unparsable or breaks the contract.
    """
    model_dir = Path(model_dir)
    config = load_model_config(model_dir)
    validate_model_config(config, expected_name=model_dir.name, source=str(model_dir / CONFIG_FILE))
    return config


def load_repository_configs(model_repository: Path) -> dict[str, ModelConfig]:
    """Parse and validate every model of a repository.

    Args:
        model_repository: The directory holding ``<model>/config.pbtxt``.

    Returns:
        Validated configs keyed by model name, sorted by name.

    Raises:
        ModelConfigError: If the repository has no models, or any config is invalid.
    """
    model_repository = Path(model_repository)
    model_dirs = sorted(p.parent for p in model_repository.glob(f"*/{CONFIG_FILE}"))
    if not model_dirs:
        raise ModelConfigError(f"{model_repository}: no <model>/{CONFIG_FILE} found")
    return {model_dir.name: load_and_validate(model_dir) for model_dir in model_dirs}


def read_max_batch_size(model_repository: Path, model_name: str) -> int:
    """Triton's ``max_batch_size`` for one model, from its validated ``config.pbtxt``.

    The gateway calls this at start-up: its own batches must not exceed this number, or Triton rejects them.

    Args:
        model_repository: The model repository directory.
        model_name: For example ``"classifier_int8"``.

    Returns:
        ``max_batch_size`` (>= 1).

    Raises:
        ModelConfigError: If the model's config is missing, unparsable or breaks the contract.
    """
    return load_and_validate(Path(model_repository) / model_name).max_batch_size


def render_onnxruntime_config(config: ModelConfig) -> ModelConfig:
    """Derive a config for Triton's native ``onnxruntime`` backend from one of our python-backend configs.

    The native backend runs ``<version>/model.onnx`` directly (no Python stub, no model.py; on GPU it can
    also use TensorRT), but it does not pad ragged inputs. So ``allow_ragged_batch`` is dropped and Triton's
    batcher then merges only requests of identical shape: the gateway must pad to a fixed length (for example
    ``max_length``) for Triton-side batching to happen. The thread parameters already use the names the
    onnxruntime backend reads; ``max_sequence_length`` (ours) is removed.

    Args:
        config: A validated python-backend config.

    Returns:
        A new ``ModelConfig``; the input is not modified. Write it with :func:`to_pbtxt`.
    """
    rendered = ModelConfig()
    rendered.CopyFrom(config)
    rendered.backend = "onnxruntime"
    rendered.platform = "onnxruntime_onnx"
    rendered.default_model_filename = "model.onnx"
    for tensor in rendered.input:
        tensor.allow_ragged_batch = False
    if "max_sequence_length" in rendered.parameters:
        del rendered.parameters["max_sequence_length"]
    return rendered


def to_pbtxt(config: ModelConfig) -> str:
    """Serialize a ``ModelConfig`` to protobuf text format (comments are not preserved).

    Args:
        config: The message.

    Returns:
        Text that Triton accepts as ``config.pbtxt``.
    """
    return text_format.MessageToString(config)
