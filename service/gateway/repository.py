"""What the gateway reads from the model repository: labels, max_length and the tokenizer of a version.

The layout and the file formats are the contract of :mod:`service.triton.repository` (docs/model_repository.md).
Only the ``tokenizers`` library is used downstream (no transformers, no torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.triton import repository as contract
from service.triton.repository import RepositoryError

__all__ = ["RepositoryError", "VariantModel", "load_variant_model"]


@dataclass(frozen=True)
class VariantModel:
    """One served variant as the gateway sees it.

    Attributes:
        variant: Variant name, e.g. ``"int8"``.
        model_name: Triton model name, e.g. ``"classifier_int8"``.
        version: The model version (directory name) whose tokenizer and labels are loaded.
        labels: Class names, index i names logit column i.
        max_length: Truncation length in tokens (the training length).
        version_dir: The version directory.
        truncation: ``"head"`` or ``"head_tail"`` (how texts longer than max_length were cut in training).
        head_tokens: With ``"head_tail"``, the leading tokens kept.
    """

    variant: str
    model_name: str
    version: int
    labels: tuple[str, ...]
    max_length: int
    version_dir: Path
    truncation: str = "head"
    head_tokens: int = 0

    @property
    def tokenizer_path(self) -> Path:
        """The version's tokenizer.json."""
        return self.version_dir / contract.TOKENIZER_FILE


def load_variant_model(repository: Path, model_name: str, variant: str, pinned_version: int | None) -> VariantModel:
    """Read labels.json of one variant and check its tokenizer is present.

    Args:
        repository: The model repository root.
        model_name: Triton model name.
        variant: Variant name.
        pinned_version: Version to use, or None for the latest.

    Returns:
        The variant description.

    Raises:
        RepositoryError: If files are missing or labels.json is malformed.
    """
    version = contract.pick_version(contract.model_dir(repository, model_name), pinned_version)
    vdir = contract.version_dir(repository, model_name, version)
    contract.check_version(vdir, required=(contract.TOKENIZER_FILE,))
    info = contract.read_labels(vdir)
    return VariantModel(
        variant=variant,
        model_name=model_name,
        version=version,
        labels=info.labels,
        max_length=info.max_length,
        version_dir=vdir,
        truncation=info.truncation,
        head_tokens=info.head_tokens,
    )
