"""Publish a generator variant into a Triton model repository: ``generator_<variant>/{config.pbtxt, <version>/}``.

The version directory holds ``model.onnx``, ``model.py`` (a copy of ``triton_model.py``), ``generation.json``
(cache geometry, end-of-sequence ids, chat format, context length) and the tokenizer files the gateway reads.

Why the config is rendered here and not committed under ``model_repository/``: the committed configs are the
classifier's contract (tests/unit/test_model_config.py checks every committed ``*/config.pbtxt`` against it), and a
committed generator config without its version directory would make a plain ``tritonserver
--model-repository=model_repository`` fail to start (``--exit-on-error``). The generator is published on request
(``python -m service.modelprep build-generator``) with its config, like the compressed classifier variants.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .export import copy_model

MODEL_PREFIX = "generator_"
TRITON_MODEL_SOURCE = Path(__file__).with_name("triton_model.py")


@dataclass
class ServingLimits:
    """The engine's limits, written as config parameters (docs/generation.md explains each).

    Attributes:
        max_kv_cache_bytes: Budget of reserved KV-cache bytes over all sequences (429 beyond).
        max_active_sequences: Most sequences holding a cache (the largest decode batch).
        max_context_tokens: Longest prompt + max_new_tokens.
        max_new_tokens_limit: Largest max_new_tokens a request may ask for.
        max_prefill_tokens: Most (padded) prompt tokens in one prefill call.
        intra_op_thread_count: ONNX Runtime threads.
    """

    max_kv_cache_bytes: int = 256 * 1024 * 1024
    max_active_sequences: int = 16
    max_context_tokens: int = 2048
    max_new_tokens_limit: int = 512
    max_prefill_tokens: int = 2048
    intra_op_thread_count: int = 2

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


def render_config(model_name: str, limits: ServingLimits) -> str:
    """The ``config.pbtxt`` of a generator model (python backend, decoupled, no Triton batching)."""
    params = "\n".join(
        f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}'
        for key, value in vars(limits).items()
    )
    return f"""# Generator served by the python backend (service/generator/triton_model.py, copied as <version>/model.py).
# Rendered by service.generator.publish; docs/generation.md explains every field.
name: "{model_name}"
backend: "python"

# 0: Triton does not batch these requests; the model batches itself, per decode iteration (continuous batching),
# because Triton's batchers form a batch per request, which cannot let new sequences join a running one.
max_batch_size: 0

# Decoupled: one request, many responses (one per generated token); execute() returns at once.
model_transaction_policy {{
  decoupled: true
}}

input [
  {{ name: "input_ids", data_type: TYPE_INT64, dims: [ -1 ], optional: true }},
  {{ name: "max_new_tokens", data_type: TYPE_INT32, dims: [ 1 ], optional: true }},
  {{ name: "temperature", data_type: TYPE_FP32, dims: [ 1 ], optional: true }},
  {{ name: "top_p", data_type: TYPE_FP32, dims: [ 1 ], optional: true }},
  {{ name: "seed", data_type: TYPE_INT64, dims: [ 1 ], optional: true }},
  {{ name: "ignore_eos", data_type: TYPE_BOOL, dims: [ 1 ], optional: true }},
  {{ name: "stats_only", data_type: TYPE_BOOL, dims: [ 1 ], optional: true }}
]

output [
  {{ name: "token_id", data_type: TYPE_INT64, dims: [ 1 ] }},
  {{ name: "step", data_type: TYPE_INT64, dims: [ 1 ] }},
  {{ name: "batch_size", data_type: TYPE_INT32, dims: [ 1 ] }},
  {{ name: "kv_cache_bytes", data_type: TYPE_INT64, dims: [ 1 ] }},
  {{ name: "active_sequences", data_type: TYPE_INT32, dims: [ 1 ] }},
  {{ name: "finish_reason", data_type: TYPE_STRING, dims: [ 1 ] }}
]

# One instance: it owns every sequence's cache and forms the decode batch; a second instance would split the
# batch in two and fight for the same cores. On GPU: kind KIND_GPU with onnxruntime-gpu (docs/generation.md).
instance_group [
  {{ kind: KIND_CPU, count: 1 }}
]

{params}
"""


def publish_generator(
    onnx_path: Path,
    tokenizer: Any,
    metadata: dict[str, Any],
    repository: Path,
    variant: str,
    *,
    version: int = 1,
    limits: ServingLimits | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write ``<repository>/generator_<variant>/`` (config and version directory).

    Args:
        onnx_path: The exported graph.
        tokenizer: The Hugging Face tokenizer (its files are saved beside the model).
        metadata: ``generation.json`` contents (cache geometry, eos ids, chat format, context).
        repository: Model repository root.
        variant: ``fp32``, ``int8`` or ``fp16``.
        version: Version directory number.
        limits: Engine limits for the config.
        provenance: Extra facts saved as ``provenance.json``.

    Returns:
        The model directory.
    """
    limits = limits or ServingLimits()
    name = f"{MODEL_PREFIX}{variant}"
    model_dir = Path(repository) / name
    version_dir = model_dir / str(version)
    if version_dir.exists():
        shutil.rmtree(version_dir)
    version_dir.mkdir(parents=True)
    copy_model(Path(onnx_path), version_dir / "model.onnx")
    shutil.copy2(TRITON_MODEL_SOURCE, version_dir / "model.py")
    tokenizer.save_pretrained(version_dir)
    for extra in ("chat_template.jinja", "special_tokens_map.json"):
        (version_dir / extra).unlink(missing_ok=True)  # the gateway reads tokenizer.json + generation.json only
    (version_dir / "generation.json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    (version_dir / "provenance.json").write_text(json.dumps(provenance or {}, indent=2, sort_keys=True) + "\n")
    (model_dir / "config.pbtxt").write_text(render_config(name, limits))
    return model_dir
