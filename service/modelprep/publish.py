"""Publish a built variant into a Triton model repository (see docs/model_repository.md)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from service.triton import repository as contract

from .errors import PrepError
from .tokens import HEAD_SHARE

PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: The committed Triton configs (config.pbtxt per model); copied into other repositories when they lack one.
TEMPLATE_REPOSITORY = PROJECT_ROOT / "model_repository"
BACKEND_MODEL = PROJECT_ROOT / "service" / "triton" / "backend_model.py"
TOKENIZER_FILES = contract.TOKENIZER_FILES


def model_name(variant: str) -> str:
    """The Triton model name of a precision variant (``int8`` -> ``classifier_int8``): the contract's rule."""
    return contract.model_name(variant)


def head_tokens_of(tokenizer_json: Path, max_length: int) -> int:
    """Leading tokens (special ones included) that head+tail truncation keeps, as the gateway counts them.

    Training keeps the first ``round(budget * HEAD_SHARE)`` content tokens after the leading special tokens
    (``service.modelprep.tokens``); the gateway keeps the first ``head_tokens`` ids of the full encoding.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_truncation()
    tok.no_padding()
    specials = tok.encode("").ids  # e.g. [CLS] [SEP]: one leading and the rest trailing
    leading = 1 if specials else 0
    budget = max_length - len(specials)
    return leading + max(1, round(budget * HEAD_SHARE))


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5, check=False
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def publish_variant(
    variant: str,
    onnx_path: Path,
    tokenizer_dir: Path,
    labels: list[str],
    max_length: int,
    repository: Path,
    version: int,
    provenance: dict,
    *,
    truncation: str = "head",
) -> Path:
    """Write ``<repository>/classifier_<variant>/<version>/`` with the model, its tokenizer, labels and provenance.

    ``labels.json`` records the truncation (``"head"``, or ``"head_tail"`` with ``head_tokens``), so the gateway
    tokenizes served texts exactly as training did (service/triton/repository.py is the contract).

    Returns:
        The version directory.
    """
    name = model_name(variant)
    repository = Path(repository)
    model_dir = repository / name
    model_dir.mkdir(parents=True, exist_ok=True)
    config = model_dir / "config.pbtxt"
    if not config.is_file():
        template = TEMPLATE_REPOSITORY / name / "config.pbtxt"
        if template.is_file():
            shutil.copy(template, config)
        else:
            # a variant without a committed config (e.g. a compressed one) gets the INT8 config under its own name
            base = TEMPLATE_REPOSITORY / model_name("int8") / "config.pbtxt"
            if not base.is_file():
                raise PrepError(f"no Triton config for {name}: expected {template} or {base}")
            text = base.read_text().replace(f'name: "{model_name("int8")}"', f'name: "{name}"')
            config.write_text(
                f"# Derived from {model_name('int8')}/config.pbtxt by service.modelprep.publish.\n" + text
            )
    if not BACKEND_MODEL.is_file():
        raise PrepError(f"missing the Triton python-backend model code {BACKEND_MODEL}")
    vdir = model_dir / str(version)
    tmp = model_dir / f".{version}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    shutil.copy(onnx_path, tmp / "model.onnx")
    shutil.copy(BACKEND_MODEL, tmp / "model.py")
    for f in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / f).is_file():
            shutil.copy(Path(tokenizer_dir) / f, tmp / f)
    if not (tmp / "tokenizer.json").is_file():
        raise PrepError(f"{tokenizer_dir} has no tokenizer.json (a fast tokenizer is required)")
    head_tokens = head_tokens_of(tmp / "tokenizer.json", max_length) if truncation == "head_tail" else 0
    contract.write_labels(
        tmp,
        contract.LabelsFile(
            labels=tuple(labels),
            max_length=max_length,
            variant=variant,
            model_name=name,
            version=version,
            truncation=truncation,
            head_tokens=head_tokens,
        ),
    )
    contract.write_provenance(tmp, provenance, git_sha=git_sha())
    # swap in atomically enough for a directory: a running Triton never sees a half-written version
    if vdir.exists():
        shutil.rmtree(vdir)
    tmp.rename(vdir)
    return vdir
