"""``python -m service.modelprep build-generator``: the generator's build verb (registered by service/modelprep/cli.py).

Standard library only at import time: the model-prep CLI imports this module to build its parser, and torch is
loaded only when the verb runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_build_generator_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the verb's options to its sub-parser."""
    parser.add_argument(
        "--preset",
        choices=["default", "tiny"],
        default="default",
        help="default: SmolLM2-135M-Instruct, minutes on 2 cores; tiny: a random Llama of the same architecture, "
        "a few LoRA steps, under a minute (tests and smoke runs; its numbers mean nothing)",
    )
    parser.add_argument("--workdir", type=Path, help="ONNX files and report (default: artifacts/generator/<preset>)")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"), help="Triton model repository")
    parser.add_argument("--no-publish", action="store_true", help="build and report without publishing")
    parser.add_argument("--served", help="variants published as generator_<variant> (default: fp32,int8; tiny: fp32)")
    parser.add_argument("--variants", help="variants built and reported (default: fp32,int8,fp16; tiny: fp32,int8)")
    parser.add_argument("--steps", type=int, help="LoRA optimizer steps (default: 40; tiny: 6)")
    parser.add_argument("--base-cache", type=Path, help="cache of the de-quantized base weights")
    parser.add_argument("--model-version", type=int, default=1, help="Triton version directory to publish")
    parser.add_argument("--max-kv-cache-bytes", type=int, help="KV-cache budget written into the Triton config")


def _list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def run_build_generator(args: argparse.Namespace) -> int:
    """Build, report and publish; print the Markdown report.

    Returns:
        0 on success.

    Raises:
        ValueError: Bad option values (the model-prep CLI turns it into exit code 2).
    """
    from dataclasses import replace

    from .base import DEFAULT_CACHE_DIR
    from .pipeline import GeneratorBuildConfig, build_generator

    workdir = args.workdir or Path("artifacts/generator") / args.preset
    repository = None if args.no_publish else args.repository
    overrides: dict[str, object] = {
        "model_version": args.model_version,
        "base_cache_dir": args.base_cache or DEFAULT_CACHE_DIR,
    }
    if args.variants:
        overrides["variants"] = _list(args.variants)
    if args.served:
        overrides["served"] = _list(args.served)
    if args.no_publish:
        overrides["served"] = ()
    if args.preset == "tiny":
        cfg = GeneratorBuildConfig.tiny(workdir, repository, **overrides)
    else:
        cfg = GeneratorBuildConfig(workdir=workdir, repository=repository, **overrides)  # type: ignore[arg-type]
    if args.steps is not None:
        cfg.lora = replace(cfg.lora, steps=args.steps)
    if args.max_kv_cache_bytes is not None:
        cfg.limits = replace(cfg.limits, max_kv_cache_bytes=args.max_kv_cache_bytes)
    report = build_generator(cfg)
    print((Path(cfg.workdir) / "report.md").read_text())
    print(json.dumps({"published": report["published"], "total_seconds": report["total_seconds"]}, indent=2))
    return 0
