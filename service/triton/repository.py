"""The model-repository contract, in one stdlib-only module (docs/model_repository.md is its prose form).

Every component that reads or writes the repository goes through here: model prep publishes into it, the gateway
loads labels and the tokenizer from it, the fake backend and the benchmarks fabricate or read it, and the Triton
launcher serves it. The layout::

    <repository>/<prefix>_<variant>/config.pbtxt              committed Triton config (one model per variant)
    <repository>/<prefix>_<variant>/<version>/model.onnx      built, never committed
    <repository>/<prefix>_<variant>/<version>/model.py        the python-backend code (service/triton/backend_model.py)
    <repository>/<prefix>_<variant>/<version>/tokenizer.json  the tokenizer the version was trained with
    <repository>/<prefix>_<variant>/<version>/labels.json     {"labels": [...], "max_length": n, "variant", ...}
    <repository>/<prefix>_<variant>/<version>/provenance.json where the version came from (config, data, git sha)

Nothing here imports numpy, protobuf or a web framework, so the gateway image, the model-prep tools and the tests
share it freely. Parsing a config with Triton's own protobuf lives in :mod:`service.triton.model_config`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The default model-name prefix: ``classifier_int8``, ``classifier_fp16``.
DEFAULT_PREFIX = "classifier"
CONFIG_FILE = "config.pbtxt"
MODEL_FILE = "model.onnx"
BACKEND_CODE_FILE = "model.py"
TOKENIZER_FILE = "tokenizer.json"
LABELS_FILE = "labels.json"
PROVENANCE_FILE = "provenance.json"
#: Tokenizer files copied beside a version when present (tokenizer.json is the one the gateway needs).
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")

_NAME_PART = re.compile(r"^[A-Za-z0-9\-]+(?:_[A-Za-z0-9\-]+)*$")


class RepositoryError(RuntimeError):
    """The model repository does not hold what the contract promises (the message names the path)."""


def model_name(variant: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The Triton model name of a variant: ``<prefix>_<variant>``.

    Args:
        variant: The precision variant, e.g. ``"int8"``.
        prefix: The model family prefix.

    Returns:
        For example ``"classifier_int8"``.

    Raises:
        ValueError: An empty or malformed variant or prefix.
    """
    for what, value in (("variant", variant), ("prefix", prefix)):
        if not value or not _NAME_PART.match(value):
            raise ValueError(f"{what} {value!r} must be letters, digits, '-' or single '_' separators")
    return f"{prefix}_{variant}"


def variant_of(name: str, prefix: str = DEFAULT_PREFIX) -> str | None:
    """Invert :func:`model_name`: the variant of ``name``, or None if ``name`` is not of the family."""
    head = f"{prefix}_"
    if name.startswith(head) and len(name) > len(head):
        return name[len(head) :]
    return None


def model_dir(repository: Path, name: str) -> Path:
    """``<repository>/<name>``."""
    return Path(repository) / name


def version_dir(repository: Path, name: str, version: int) -> Path:
    """``<repository>/<name>/<version>``."""
    return Path(repository) / name / str(version)


def list_versions(model_directory: Path) -> list[int]:
    """The numeric version directories of a model, ascending (none when the model directory is missing)."""
    if not model_directory.is_dir():
        return []
    return sorted(int(p.name) for p in model_directory.iterdir() if p.is_dir() and p.name.isdigit())


def pick_version(model_directory: Path, pinned: int | None) -> int:
    """Return the version to serve: ``pinned`` if given, else the highest numeric version directory.

    Raises:
        RepositoryError: The model, or the pinned version, is missing.
    """
    if not model_directory.is_dir():
        raise RepositoryError(f"model directory {model_directory} does not exist")
    versions = list_versions(model_directory)
    if pinned is not None:
        if pinned not in versions:
            raise RepositoryError(f"model version {pinned} not found in {model_directory} (found {versions})")
        return pinned
    if not versions:
        raise RepositoryError(f"no version directory in {model_directory}; build the model first")
    return versions[-1]


def next_version(model_directory: Path) -> int:
    """The version number a new publish should take (1 for a new model)."""
    versions = list_versions(model_directory)
    return versions[-1] + 1 if versions else 1


@dataclass(frozen=True)
class LabelsFile:
    """The content of ``labels.json``.

    Attributes:
        labels: Class names; index i names logit column i.
        max_length: Truncation length in tokens (the training length).
        variant: The variant the version belongs to.
        model_name: Its Triton model name.
        version: The version number.
        truncation: How long texts are cut: ``"head"`` keeps the first max_length tokens; ``"head_tail"`` keeps the
            first ``head_tokens`` and the last ``max_length - head_tokens`` (special tokens included). Older files
            have no field: ``"head"``.
        head_tokens: With ``"head_tail"``, how many leading tokens are kept.
    """

    labels: tuple[str, ...]
    max_length: int
    variant: str
    model_name: str
    version: int
    truncation: str = "head"
    head_tokens: int = 0


def write_labels(directory: Path, info: LabelsFile) -> Path:
    """Write ``labels.json`` into a version directory and return its path."""
    path = Path(directory) / LABELS_FILE
    payload = {
        "labels": list(info.labels),
        "max_length": info.max_length,
        "variant": info.variant,
        "model_name": info.model_name,
        "version": info.version,
    }
    # The default head truncation is the absence of the field, so default builds keep the original file format.
    if info.truncation == "head_tail":
        payload["truncation"] = info.truncation
        payload["head_tokens"] = info.head_tokens
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return path


def read_labels(directory: Path) -> LabelsFile:
    """Read and check ``labels.json`` of a version directory.

    Raises:
        RepositoryError: Missing or malformed, fewer than 2 labels, or max_length < 2.
    """
    path = Path(directory) / LABELS_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        labels = tuple(str(x) for x in meta["labels"])
        max_length = int(meta["max_length"])
        info = LabelsFile(
            labels=labels,
            max_length=max_length,
            variant=str(meta.get("variant", "")),
            model_name=str(meta.get("model_name", "")),
            version=int(meta.get("version", Path(directory).name if Path(directory).name.isdigit() else 0)),
            truncation=str(meta.get("truncation", "head")),
            head_tokens=int(meta.get("head_tokens", 0)),
        )
    except FileNotFoundError:
        raise RepositoryError(f"{path} is missing") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise RepositoryError(f"{path} is malformed: {exc!r}") from None
    if len(labels) < 2 or max_length < 2:
        raise RepositoryError(f"{path}: need >= 2 labels and max_length >= 2, got {labels!r}, {max_length}")
    if info.truncation not in ("head", "head_tail"):
        raise RepositoryError(f"{path}: truncation must be 'head' or 'head_tail', got {info.truncation!r}")
    if info.truncation == "head_tail" and not 1 <= info.head_tokens < max_length:
        raise RepositoryError(f"{path}: head_tokens must be in [1, max_length) with head_tail, got {info.head_tokens}")
    return info


def write_provenance(directory: Path, provenance: Mapping[str, Any], *, git_sha: str | None) -> Path:
    """Write ``provenance.json`` (publication time and git sha first, then the caller's fields)."""
    path = Path(directory) / PROVENANCE_FILE
    payload = {"published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_sha": git_sha, **provenance}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def read_provenance(directory: Path) -> dict[str, Any]:
    """Read ``provenance.json`` of a version directory (an empty dict when there is none)."""
    path = Path(directory) / PROVENANCE_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise RepositoryError(f"{path} is malformed: {exc!r}") from None
    if not isinstance(data, dict):
        raise RepositoryError(f"{path} must hold a JSON object")
    return data


_MAX_BATCH = re.compile(r"^\s*max_batch_size\s*:\s*(\d+)\s*$", re.MULTILINE)
_NAME_LINE = re.compile(r'^(\s*name\s*:\s*)"[^"]*"', re.MULTILINE)


def config_max_batch_size(config_text: str) -> int | None:
    """The top-level ``max_batch_size`` of a ``config.pbtxt`` text (None when absent or 0: no batching).

    A text-level read for tools without protobuf; :func:`service.triton.model_config.parse_model_config` is the
    strict parser.
    """
    match = _MAX_BATCH.search(config_text)
    if match is None:
        return None
    value = int(match.group(1))
    return value or None


def rename_config(config_text: str, name: str) -> str:
    """Return ``config_text`` with its model ``name`` replaced (the first, top-level ``name:`` line)."""
    renamed, count = _NAME_LINE.subn(lambda m: f'{m.group(1)}"{name}"', config_text, count=1)
    if count != 1:
        raise RepositoryError("config has no top-level name line")
    return renamed


def served_variants(repository: Path, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Variants of the family that have a config and at least one built version, sorted."""
    root = Path(repository)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        variant = variant_of(d.name, prefix)
        if variant is not None and (d / CONFIG_FILE).is_file() and list_versions(d):
            found.append(variant)
    return sorted(found)


def check_version(directory: Path, required: Sequence[str] = (MODEL_FILE, TOKENIZER_FILE, LABELS_FILE)) -> None:
    """Raise :class:`RepositoryError` naming the first file of ``required`` missing from a version directory."""
    for f in required:
        if not (Path(directory) / f).is_file():
            raise RepositoryError(f"{Path(directory) / f} is missing")
