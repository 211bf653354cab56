"""Reading what the gateway needs from the model repository: labels, max_length and the tokenizer of a version.

Follows docs/model_repository.md: ``<repository>/<model>/<version>/{labels.json, tokenizer.json}``. Only the
``tokenizers`` library is used (no transformers, no torch).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


class RepositoryError(RuntimeError):
    """The model repository does not hold what the gateway needs (raised at start-up)."""


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
    """

    variant: str
    model_name: str
    version: int
    labels: tuple[str, ...]
    max_length: int
    version_dir: Path


def pick_version(model_dir: Path, pinned: int | None) -> int:
    """Return the version to serve from ``model_dir``.

    Args:
        model_dir: ``<repository>/<model>``.
        pinned: A version to use; None means the highest numeric version directory.

    Returns:
        The version number.

    Raises:
        RepositoryError: If the model or the version is missing.
    """
    if not model_dir.is_dir():
        raise RepositoryError(f"model directory {model_dir} does not exist")
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if pinned is not None:
        if pinned not in versions:
            raise RepositoryError(f"model version {pinned} not found in {model_dir} (found {versions})")
        return pinned
    if not versions:
        raise RepositoryError(f"no version directory in {model_dir}; build the model first")
    return versions[-1]


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
    version = pick_version(repository / model_name, pinned_version)
    version_dir = repository / model_name / str(version)
    labels_path = version_dir / "labels.json"
    if not (version_dir / "tokenizer.json").is_file():
        raise RepositoryError(f"{version_dir / 'tokenizer.json'} is missing")
    try:
        meta = json.loads(labels_path.read_text(encoding="utf-8"))
        labels = tuple(str(x) for x in meta["labels"])
        max_length = int(meta["max_length"])
    except FileNotFoundError:
        raise RepositoryError(f"{labels_path} is missing") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise RepositoryError(f"{labels_path} is malformed: {exc!r}") from None
    if len(labels) < 2 or max_length < 2:
        raise RepositoryError(f"{labels_path}: need >= 2 labels and max_length >= 2, got {labels!r}, {max_length}")
    return VariantModel(variant, model_name, version, labels, max_length, version_dir)


class BatchEncoder:
    """Tokenizes batches of texts for one model version: truncation to max_length, padding to the batch's longest.

    Args:
        tokenizer_path: The version's tokenizer.json.
        max_length: Truncation length in tokens.
    """

    def __init__(self, tokenizer_path: Path, max_length: int) -> None:
        tok = Tokenizer.from_file(str(tokenizer_path))
        saved_padding = tok.padding or {}
        pad_token = saved_padding.get("pad_token", "[PAD]")
        pad_id = saved_padding.get("pad_id", tok.token_to_id(pad_token))
        if pad_id is None:
            raise RepositoryError(f"{tokenizer_path}: no padding token ({pad_token!r} is not in the vocabulary)")
        tok.enable_truncation(max_length)
        # A saved tokenizer.json often pads to a fixed length (the base model's pads to 128): override it so a
        # batch is only as long as its longest text.
        tok.enable_padding(pad_id=pad_id, pad_token=pad_token, length=None)
        self._tokenizer = tok
        self.max_length = max_length

    def estimate_tokens(self, text: str) -> int:
        """Estimate the token count of ``text`` without tokenizing it (for length bucketing at admission).

        English WordPiece averages 3-4 characters per token (3.8 on TREC questions, 3.2 on SMS); the estimate is
        within about 0.5x-1.8x of the true count, which is enough to pick a power-of-two bucket.

        Args:
            text: The input text.

        Returns:
            Estimated tokens including the two special tokens, capped at max_length.
        """
        return min(self.max_length, 2 + math.ceil(len(text) / 4))

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize a batch.

        Args:
            texts: The batch's texts.

        Returns:
            ``(input_ids, attention_mask)``, both INT64 of shape [len(texts), longest sequence].
        """
        encodings = self._tokenizer.encode_batch(texts)
        input_ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
        attention_mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
        return input_ids, attention_mask
