"""The build, one stage function per step: data -> train -> merge -> ONNX FP32 -> FP16 / INT8 -> evaluate -> publish.

Every stage goes through the one ``StageCache`` (cache.py): it writes into ``workdir/<stage>/`` with a key of
everything it depends on, and a re-run reuses each stage whose key still matches, publishing included. The default
build is what serving needs; ``BuildConfig.with_full_report()`` adds the extra INT8 recipes, throughput rounds, the
fine-tuning method comparison and compression, each as more stages of the same kind.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from .cache import StageCache
from .config import BuildConfig, QuantizeConfig, config_hash, config_to_dict
from .data import Dataset, load_dataset
from .progress import Progress, Silent, fmt_seconds
from .tokens import encode

log = logging.getLogger(__name__)

#: Rough seconds of each short stage for MiniLM-L6 (22.7 M parameters) on 2 CPU cores, scaled by the base model's
#: size: the ETA of a stage that was never built in this workdir. Measured on the development machine.
_REFERENCE_PARAMETERS = 22.7e6
_STAGE_SECONDS = {
    "merged": 4.0,
    "onnx": 8.0,
    "onnx-fused": 15.0,
    "fp16": 5.0,
    "int8-dynamic": 6.0,
    "int8-static": 20.0,
    "publish": 1.0,
}


@dataclass
class BuildResult:
    """Paths of what the build produced and the report dict."""

    workdir: Path
    report_path: Path
    published: dict[str, Path]
    report: dict
    reused: list[str]


@dataclass
class BuildContext:
    """What the stages share: the config, the cache, the data, each stage's key and the variants built so far."""

    cfg: BuildConfig
    cache: StageCache
    progress: Progress
    data: Dataset
    keys: dict[str, str] = field(default_factory=dict)
    variant_paths: dict[str, Path] = field(default_factory=dict)
    compressed_meta: dict[str, dict] = field(default_factory=dict)
    #: what the INT8 recipes quantize: the fused FP32 graph when graph optimization applied, else the export
    int8_source: Path | None = None
    #: the graph-optimization record for the report (fusion.fuse_graph's meta, or why it did not run)
    graph_optimization: dict = field(default_factory=dict)
    _tokenizer: object = None

    @property
    def merged_dir(self) -> Path:
        return self.cache.path("merged")

    @property
    def merge_meta(self) -> dict:
        return json.loads((self.merged_dir / "merge.json").read_text())

    @property
    def max_length(self) -> int:
        return int(self.merge_meta["max_length"])

    @property
    def truncation(self) -> str:
        return self.merge_meta.get("truncation", "head")

    @property
    def parity_texts(self) -> list[str]:
        return self.data.validation.texts[:64] or self.data.test.texts[:64]

    def tokenizer(self):
        """The trained model's tokenizer, loaded on first use (a fully cached build never needs it)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.merged_dir / "tokenizer"), local_files_only=True)
        return self._tokenizer

    def size_factor(self) -> float:
        """Base-model parameters relative to MiniLM-L6 (from the size of its weight file)."""
        try:
            from .modeling import resolve_base_model

            base = resolve_base_model(self.cfg.train.base_model)
            files = list(base.glob("*.safetensors")) or list(base.glob("*.bin"))
            return max(0.5, sum(f.stat().st_size for f in files) / 4 / _REFERENCE_PARAMETERS)
        except Exception:  # noqa: BLE001 - an ETA is never worth failing a build for
            return 1.0

    def eta(self, stage: str) -> tuple[float, str]:
        return _STAGE_SECONDS[stage] * self.size_factor(), "estimate from the base model's size"


def _progress(progress: bool | Progress) -> Progress:
    if isinstance(progress, Progress):
        return progress
    return Progress(bars=True) if progress else Progress(bars=False)


def build(cfg: BuildConfig, *, force: bool = False, progress: bool | Progress = True) -> BuildResult:
    """Run (or resume) the build and publish the served variants.

    Args:
        cfg: the build configuration.
        force: rebuild every stage even when its key matches.
        progress: True: lines and bars; False: lines only (``--quiet``); or a ``Progress``.

    Returns:
        A ``BuildResult``.
    """
    t_start = time.perf_counter()
    prog = _progress(progress)
    cache = StageCache(cfg.workdir, force, prog)
    ctx = BuildContext(cfg, cache, prog, stage_data(cfg, prog))
    stage_train(ctx)
    stage_merge(ctx)
    stage_export(ctx)
    stage_fuse(ctx)
    stage_fp16(ctx)
    stage_int8(ctx)
    if cfg.compress is not None:
        stage_compress(ctx)
    rows = stage_evaluate(ctx)
    methods = stage_methods(ctx) if cfg.compare_methods else []
    published = stage_publish(ctx, rows)
    report_dir = cfg.report_dir or (cfg.workdir / "report")
    report_path = report_dir / "report.json"
    if not cache.built and report_path.is_file():
        # nothing was rebuilt: the report on disk describes this very build (and rendering it costs seconds)
        report = json.loads(report_path.read_text())
        prog.line(f"done in {fmt_seconds(time.perf_counter() - t_start)}: every stage reused; report {report_path}")
        return BuildResult(cfg.workdir, report_path, published, report, cache.reused)
    report = assemble_report(ctx, rows, methods)
    report["build_seconds"] = time.perf_counter() - t_start
    report["reused_stages"] = cache.reused
    report["stage_seconds"] = {k: round(v, 1) for k, v in cache.seconds.items()}
    from .report import write_report

    report_path = write_report(report, report_dir)
    prog.line(f"done in {fmt_seconds(report['build_seconds'])}; report written to {report_dir}/report.md")
    return BuildResult(cfg.workdir, report_path, published, report, cache.reused)


def stage_data(cfg: BuildConfig, prog: Progress | None = None) -> Dataset:
    """Load and split the data (not cached: reading and splitting takes well under a second)."""
    data = load_dataset(cfg.data)
    (prog or Silent()).line(
        f"data {data.name}: {len(data.train)} train / {len(data.validation)} validation / {len(data.test)} test, "
        f"{len(data.label_names)} labels"
    )
    return data


def stage_train(ctx: BuildContext) -> Path:
    """Fine-tune with early stopping (finetune.train); the ETA comes from the first steps' measured rate."""
    from .finetune import train

    cfg = ctx.cfg
    key = config_hash(cfg.data, cfg.train, ctx.data.data_hash)
    ctx.keys["train"] = key
    t = cfg.train
    detail = f"{t.method} on {t.base_model or 'minilm'}, up to {t.epochs} epochs" + (
        f", early stopping (patience {t.patience})" if t.patience else ""
    )
    return ctx.cache.run(
        "train",
        key,
        lambda d: train(cfg.train, ctx.data, d, progress=ctx.progress),
        eta=(None, "measured after the first 10 steps"),
        detail=detail,
    )


def stage_merge(ctx: BuildContext) -> Path:
    """Fold LoRA adapters into the weights; the merged model must match the adapter model."""
    from .merge import merge_adapter

    ctx.keys["merged"] = config_hash(ctx.keys["train"], "merge")
    train_dir = ctx.cache.path("train")
    return ctx.cache.run(
        "merged",
        ctx.keys["merged"],
        lambda d: merge_adapter(train_dir, d, ctx.parity_texts),
        eta=ctx.eta("merged"),
        detail="merge adapters, check parity",
    )


def stage_export(ctx: BuildContext) -> Path:
    """ONNX FP32 export with a torch parity check (always the unfused graph: stage_fuse derives the fused one)."""
    from .export import export_onnx

    # the export does not depend on export.optimize: switching it reuses the export and reruns what follows
    export_cfg = dataclasses.replace(ctx.cfg.export, optimize="none")
    ctx.keys["onnx"] = config_hash(ctx.keys["merged"], export_cfg)
    d = ctx.cache.run(
        "onnx",
        ctx.keys["onnx"],
        lambda d: export_onnx(export_cfg, ctx.merged_dir, d / "fp32.onnx", ctx.parity_texts),
        eta=ctx.eta("onnx"),
        detail="ONNX FP32 export, parity vs torch",
    )
    ctx.variant_paths["fp32"] = d / "fp32.onnx"
    ctx.int8_source = d / "fp32.onnx"
    return d


def stage_fuse(ctx: BuildContext) -> Path | None:
    """ONNX Runtime's transformer optimizer on the FP32 export (``export.optimize = "fused"``, fusion.py): the
    fused graph is what INT8 quantizes, and its FP32 form is evaluated as the ``fp32-fused`` row. Falls back to the
    unfused export, with a warning, when the optimizer fails, fuses nothing or changes the logits."""
    from .fusion import FUSION_VERSION, OPT_LEVEL, fuse_graph

    if ctx.cfg.export.optimize != "fused":
        ctx.graph_optimization = {"requested": "none", "applied": False, "reason": "export.optimize = none"}
        return None
    ctx.keys["onnx-fused"] = config_hash(ctx.keys["onnx"], "fused", FUSION_VERSION, OPT_LEVEL)
    fp32 = ctx.variant_paths["fp32"]

    def run(d: Path) -> None:
        tok = ctx.tokenizer()
        texts = ctx.parity_texts
        feeds = [
            encode(tok, texts[s : s + b], ctx.max_length, ctx.truncation, tensors="np")
            for b in (1, 8, 32)
            for s in range(0, min(len(texts), 2 * b), b)
        ]
        fuse_graph(fp32, d / "fp32-fused.onnx", ctx.merged_dir, feeds)

    d = ctx.cache.run(
        "onnx-fused",
        ctx.keys["onnx-fused"],
        run,
        eta=ctx.eta("onnx-fused"),
        detail="fused attention / LayerNorm / GELU (ONNX Runtime transformer optimizer), parity vs unfused",
    )
    meta = json.loads((d / "fp32-fused.json").read_text())["graph_optimization"]
    ctx.graph_optimization = {"requested": "fused", **meta}
    if not meta["applied"]:
        ctx.progress.line(f"graph optimization not applied ({meta['reason']}); INT8 quantizes the unfused export")
        # what follows is exactly the unfused build (same files): keep its keys so its stages are reused
        del ctx.keys["onnx-fused"]
        return d
    ctx.variant_paths["fp32-fused"] = d / "fp32-fused.onnx"
    ctx.int8_source = d / "fp32-fused.onnx"
    return d


def stage_fp16(ctx: BuildContext) -> Path:
    """FP16 conversion (fragile ops kept in FP32)."""
    from .quantize import convert_fp16

    ctx.keys["fp16"] = config_hash(ctx.keys["onnx"], ctx.cfg.fp16)
    fp32 = ctx.variant_paths["fp32"]
    d = ctx.cache.run(
        "fp16",
        ctx.keys["fp16"],
        lambda d: convert_fp16(ctx.cfg.fp16, fp32, d / "fp16.onnx"),
        eta=ctx.eta("fp16"),
        detail="FP16 conversion",
    )
    ctx.variant_paths["fp16"] = d / "fp16.onnx"
    return d


def int8_recipes(cfg: BuildConfig) -> list[tuple[str, QuantizeConfig]]:
    """(variant name, recipe) of the served INT8 model and of the report-only recipes."""
    out = [("int8", cfg.int8)]
    out += [(q.tag, q) for q in cfg.report_variants if q.tag != cfg.int8.tag]
    return out


def stage_int8(ctx: BuildContext) -> None:
    """The served INT8 recipe, and every report-only recipe of the full report."""
    from .quantize import quantize_int8

    fp32 = ctx.int8_source or ctx.variant_paths["fp32"]
    source_key = ctx.keys["onnx-fused"] if "fp32-fused" in ctx.variant_paths else ctx.keys["onnx"]

    def quantize(stage: str, key: str, q: QuantizeConfig, source: Path, detail: str) -> Path:
        d = ctx.cache.run(
            stage,
            key,
            lambda d: quantize_int8(
                q,
                source,
                d / "model.onnx",
                tokenizer=ctx.tokenizer(),
                calibration_texts=ctx.data.train.texts,
                max_length=ctx.max_length,
                truncation=ctx.truncation,
            ),
            eta=ctx.eta("int8-static" if q.mode == "static" else "int8-dynamic"),
            detail=detail,
        )
        return d / "model.onnx"

    for name, q in int8_recipes(ctx.cfg):
        key = config_hash(source_key, q)
        ctx.keys[f"int8/{q.tag}"] = key
        detail = f"INT8 {q.tag}" + (" (served)" if name == "int8" else " (report only)")
        ctx.variant_paths[name] = quantize(f"int8/{q.tag}", key, q, fp32, detail)
    if "fp32-fused" in ctx.variant_paths:
        # the served recipe quantized from the unfused export too, so the report shows what fusion changed; its key
        # is the one an unfused build's served INT8 has
        q = ctx.cfg.int8
        ctx.variant_paths["int8-unfused"] = quantize(
            f"int8-unfused/{q.tag}",
            config_hash(ctx.keys["onnx"], q),
            q,
            ctx.variant_paths["fp32"],
            f"INT8 {q.tag} from the unfused export (report only: fused vs unfused)",
        )


def stage_compress(ctx: BuildContext) -> None:
    """Pruned, distilled, distilled+pruned (each FP32 and INT8) and sparse variants (full report only)."""
    from .compress import distill, magnitude_prune, structured_prune
    from .export import export_onnx
    from .quantize import quantize_int8

    cfg, cc, data = ctx.cfg, ctx.cfg.compress, ctx.data
    assert cc is not None
    meta = ctx.compressed_meta
    k_merge = ctx.keys["merged"]
    bars = ctx.progress.bars

    def model_stage(name: str, key: str, make, passes: float) -> Path:
        def run(d: Path) -> None:
            make(d / "hf")
            export_onnx(cfg.export, d / "hf", d / "model.onnx", ctx.parity_texts)

        d = ctx.cache.run(f"compress/{name}", key, run, eta=_compress_eta(ctx, passes), detail=name)
        m = json.loads((d / "hf" / "merge.json").read_text())
        meta[name] = {k: v for k, v in m.items() if k not in ("labels",)}
        ctx.variant_paths[name] = d / "model.onnx"
        return d

    def int8_stage(name: str, source: Path, key: str) -> None:
        d = ctx.cache.run(
            f"compress/{name}",
            config_hash(key, cc.int8),
            lambda d: quantize_int8(
                cc.int8,
                source,
                d / "model.onnx",
                tokenizer=ctx.tokenizer(),
                calibration_texts=data.train.texts,
                max_length=ctx.max_length,
                truncation=ctx.truncation,
            ),
            eta=ctx.eta("int8-dynamic"),
            detail=name,
        )
        ctx.variant_paths[name] = d / "model.onnx"

    merged = ctx.merged_dir
    k_pruned = config_hash(k_merge, cc.prune)
    pd = model_stage(
        "pruned",
        k_pruned,
        lambda out: structured_prune(cc.prune, merged, data, out, progress=bars),
        _prune_passes(cc.prune),
    )
    pm = meta["pruned"]
    pm["note"] = (
        f"FFN neurons kept: {pm['intermediate_size'][1]} of {pm['intermediate_size'][0]} per layer, "
        f"{100 * pm['removed_fraction']:.0f}% of parameters removed"
    )
    int8_stage("pruned-int8", pd / "model.onnx", k_pruned)
    k_dist = config_hash(k_merge, cc.distill)
    dd = model_stage(
        "distilled",
        k_dist,
        lambda out: distill(cc.distill, merged, data, out, progress=bars),
        _distill_passes(cc.distill, len(data.train)),
    )
    meta["distilled"]["note"] = f"student keeps layers {list(cc.distill.student_layers)} of the teacher"
    int8_stage("distilled-int8", dd / "model.onnx", k_dist)
    k_dp = config_hash(k_dist, cc.prune_student)
    dp = model_stage(
        "distilled-pruned",
        k_dp,
        lambda out: structured_prune(cc.prune_student, dd / "hf", data, out, progress=bars),
        _prune_passes(cc.prune_student),
    )
    dm = meta["distilled-pruned"]
    dm["note"] = f"distilled student, then FFN {dm['intermediate_size'][1]}/{dm['intermediate_size'][0]} neurons"
    int8_stage("distilled-pruned-int8", dp / "model.onnx", k_dp)
    if cc.magnitude is not None:
        model_stage(
            "sparse",
            config_hash(k_merge, cc.magnitude),
            lambda out: magnitude_prune(cc.magnitude, merged, data, out, progress=bars),
            _steps_as_passes(cc.magnitude.steps * cc.magnitude.recovery_steps_per_round, cc.magnitude.batch_size, data),
        )
        meta["sparse"]["note"] = (
            f"{100 * meta['sparse']['sparsity']:.0f}% of encoder weights are zero; dense kernels gain no speed from it"
        )


def _prune_passes(p) -> float:
    """Training-set passes of a structured pruning stage (recovery epochs with their perturbed copies)."""
    return p.recovery_epochs * (1 + p.augment_copies)


def _distill_passes(d, n_train: int) -> float:
    passes = d.epochs * (1 + d.augment_copies)
    if d.max_steps is not None:
        passes = min(passes, d.max_steps * d.batch_size / max(1, n_train))
    return passes


def _steps_as_passes(steps: int, batch_size: int, data: Dataset) -> float:
    return steps * batch_size / max(1, len(data.train))


#: one LoRA training pass over one short text on 2 cores (TREC: ~90 s for 3,766 questions)
_SECONDS_PER_TRAINING_TEXT = 0.025
#: compression recovery trains every weight and runs the teacher too: ~this many times a LoRA step's cost
_RECOVERY_COST = 2.0


def _compress_eta(ctx: BuildContext, passes: float) -> tuple[float | None, str]:
    """A compression stage's ETA from this build's own training speed (seconds per pass over the training texts)."""
    try:
        trained = json.loads((ctx.cache.path("train") / "train.json").read_text())
        # epoch_seconds are full-epoch times (a step-capped epoch is extrapolated to the whole split)
        per_pass = float(sum(trained["epoch_seconds"])) / len(trained["epoch_seconds"])
    except Exception:  # noqa: BLE001 - an ETA is never worth failing a build for
        per_pass = _SECONDS_PER_TRAINING_TEXT * len(ctx.data.train) * ctx.size_factor()
        basis = "estimate from the training-set and base-model size"
    else:
        basis = "rough: this build's training epoch time x recovery passes"
    return _RECOVERY_COST * per_pass * passes + _STAGE_SECONDS["onnx"] * ctx.size_factor(), basis


def stage_evaluate(ctx: BuildContext) -> list[dict]:
    """Test accuracy, macro-F1, per-class precision/recall and agreement with FP32 of every variant; throughput in
    interleaved rounds when the config asks for it. Returns the report rows."""
    cfg = ctx.cfg
    key = config_hash(
        [ctx.keys[k] for k in sorted(ctx.keys)],
        cfg.evaluate,
        cfg.served_variants,
        sorted(ctx.variant_paths),
        ctx.compressed_meta and sorted(ctx.compressed_meta),
    )
    ctx.keys["eval"] = key
    n_tp = len(cfg.evaluate.batch_sizes) * cfg.evaluate.repeats if cfg.evaluate.throughput else 0
    tp_seconds = n_tp * len(ctx.variant_paths) * cfg.evaluate.seconds_per_repeat
    n_texts = len(ctx.data.test) * len(ctx.variant_paths)
    # ~300 TREC questions (~50 characters) per second; longer texts cost about proportionally more
    chars = sum(len(t) for t in ctx.data.test.texts) / max(1, len(ctx.data.test))
    per_text = max(1.0, chars / 50.0) * ctx.size_factor() / 300.0
    eta = (n_texts * per_text + tp_seconds + 3, "test texts x variants at ~300 questions/s + throughput rounds")
    detail = f"{len(ctx.variant_paths)} variants on {len(ctx.data.test)} test texts" + (
        f", throughput {cfg.evaluate.repeats} rounds x {len(cfg.evaluate.batch_sizes)} batch sizes" if n_tp else ""
    )
    d = ctx.cache.run("eval", key, lambda d: _evaluate(ctx, d, n_tp), eta=eta, detail=detail)
    return json.loads((d / "eval.json").read_text())["variants"]


def _evaluate(ctx: BuildContext, d: Path, n_tp: int) -> None:
    from .evaluate import evaluate_variant, measure_throughput_interleaved
    from .tokens import length_summary, token_lengths

    cfg, data = ctx.cfg, ctx.data
    tok = ctx.tokenizer()
    texts, gold = data.test.texts, data.test.labels
    rows, sessions, ref = [], {}, None
    for name, path in ctx.variant_paths.items():
        row, logits, sessions[name] = evaluate_variant(
            name,
            path,
            tok,
            texts,
            gold,
            len(data.label_names),
            ctx.max_length,
            cfg.evaluate,
            reference_logits=ref,
            label_names=data.label_names,
            truncation=ctx.truncation,
        )
        if name == "fp32":
            ref = logits
        row.served = name in cfg.served_variants
        if name == "int8":
            row.note = f"served recipe: {cfg.int8.tag}"
        elif name in ctx.compressed_meta:
            row.note = ctx.compressed_meta[name].get("note", "")
        rows.append(row)
    if n_tp:
        bar = ctx.progress.bar(range(n_tp * len(sessions)), total=n_tp * len(sessions), desc="throughput", unit="run")
        speed = measure_throughput_interleaved(
            sessions, tok, texts, ctx.max_length, cfg.evaluate, bar, truncation=ctx.truncation
        )
        bar.close()
        for row in rows:
            row.throughput, row.throughput_runs = speed[row.name]
    test_lengths = length_summary(token_lengths(tok, texts), ctx.max_length)
    (d / "eval.json").write_text(
        json.dumps({"variants": [r.to_dict() for r in rows], "test_token_lengths": test_lengths}, indent=2)
    )


def stage_methods(ctx: BuildContext) -> list[dict]:
    """The fine-tuning method comparison (compare.py) on the build's data and seed (full report only)."""
    from .compare import CompareConfig, compare_methods

    ccfg = CompareConfig.for_build(ctx.cfg.train)
    key = config_hash(ctx.cfg.data, ctx.data.data_hash, ccfg)
    d = ctx.cache.run(
        "methods",
        key,
        lambda d: compare_methods(ccfg, ctx.data, d, progress=ctx.progress),
        eta=(None, "each method's ETA is measured after its first steps"),
        detail=f"{len(ccfg.methods)} fine-tuning methods trained to convergence",
    )
    return json.loads((d / "methods.json").read_text())["methods"]


def assemble_report(ctx: BuildContext, rows: list[dict], methods: list[dict]) -> dict:
    """The report dict: machine, data, training (early stopping, selection metric, lengths), variants, targets."""
    from .report import machine_description

    cfg = ctx.cfg
    trained = json.loads((ctx.cache.path("train") / "train.json").read_text())
    export_meta = json.loads(ctx.variant_paths["fp32"].with_suffix(".json").read_text())
    ev = json.loads((ctx.cache.path("eval") / "eval.json").read_text())
    report = {
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": 0.0,
        "reused_stages": [],
        "machine": machine_description(),
        "dataset": ctx.data.summary(),
        "config": config_to_dict(cfg),
        "train": {
            "method": cfg.train.method,
            "base_model": trained.get("base_model"),
            "epochs_run": len(trained["history"]),
            "max_epochs": cfg.train.epochs,
            "patience": cfg.train.patience,
            "stopped_early": trained.get("stopped_early", False),
            "best_epoch": trained.get("best_epoch"),
            "selection_metric": trained.get("selection_metric", "accuracy"),
            "selection_reason": trained.get("selection_reason"),
            "best_validation_score": trained.get("best_validation_score"),
            "steps": trained["steps"],
            "best_validation_accuracy": trained["best_validation_accuracy"],
            "trainable_parameters": trained["trainable_parameters"],
            "total_parameters": trained["total_parameters"],
            "epoch_seconds": trained["epoch_seconds"],
            "train_seconds": trained.get("train_seconds"),
            "seconds_to_best": trained.get("seconds_to_best"),
            "class_weights": trained.get("class_weights"),
            "history": trained["history"],
        },
        "token_lengths": {"train": trained.get("token_lengths"), "test": ev.get("test_token_lengths")},
        "merge": ctx.merge_meta,
        "export": export_meta,
        "graph_optimization": _graph_optimization_record(ctx),
        "evaluate": config_to_dict(cfg.evaluate),
        "variants": rows,
        "methods": methods,
        "compression": ctx.compressed_meta,
    }
    report["targets"] = check_targets(report)
    return report


def _graph_optimization_record(ctx: BuildContext) -> dict:
    """The report's graph-optimization section: the fusion record and which ops the served INT8 quantized."""
    rec = dict(ctx.graph_optimization)
    if rec.get("applied"):
        int8_meta = ctx.variant_paths["int8"].with_suffix(".json")
        try:
            rec["int8_quantized_fused_ops"] = json.loads(int8_meta.read_text()).get("quantized_fused_ops")
        except (OSError, ValueError):
            rec["int8_quantized_fused_ops"] = None
        rec["variants_from_fused_graph"] = ["fp32-fused"] + [n for n, _ in int8_recipes(ctx.cfg)]
        rec["variants_from_unfused_export"] = ["fp32", "fp16", "int8-unfused"]
    return rec


def stage_publish(ctx: BuildContext, rows: list[dict]) -> dict[str, Path]:
    """Write each served variant into the model repository (docs/model_repository.md), through the same cache:
    a stage per variant whose key is the evaluation's, valid while the repository still holds that build."""
    from .publish import model_name, publish_variant

    cfg = ctx.cfg
    by_name = {r["name"]: r for r in rows}
    export_meta = json.loads(ctx.variant_paths["fp32"].with_suffix(".json").read_text())
    published: dict[str, Path] = {}
    targets = list(cfg.served_variants)
    if cfg.compress is not None and cfg.compress.publish and "distilled-pruned-int8" in ctx.variant_paths:
        targets.append("small_int8")
    for variant in targets:
        source = "distilled-pruned-int8" if variant == "small_int8" else variant
        vdir = cfg.repository / model_name(variant) / str(cfg.model_version)
        build_key = config_hash(ctx.keys["eval"], variant, str(cfg.repository.resolve()), cfg.model_version)

        def valid(vdir: Path = vdir, build_key: str = build_key) -> bool:
            try:
                prov = json.loads((vdir / "provenance.json").read_text())
            except (OSError, ValueError):
                return False
            return prov.get("build_key") == build_key and (vdir / "model.onnx").is_file()

        provenance = {
            "build_key": build_key,
            "config": config_to_dict(cfg),
            "data_hash": ctx.data.data_hash,
            "dataset": ctx.data.summary(),
            "metrics": by_name.get(source),
            "fp32_metrics": {k: by_name["fp32"][k] for k in ("accuracy", "macro_f1")},
            "onnx_parity_vs_torch": export_meta["parity_max_abs_logit_diff_vs_torch"],
            "merge_parity_vs_adapter": ctx.merge_meta["max_abs_logit_diff_vs_adapter"],
            "truncation": ctx.truncation,
            "graph_optimization": {
                **{k: ctx.graph_optimization.get(k) for k in ("requested", "applied", "reason", "fused_operators")},
                # only INT8 is quantized from the fused graph; FP16 converts the unfused export
                "this_variant_fused": bool(ctx.graph_optimization.get("applied")) and variant == "int8",
            },
        }
        if variant == "small_int8":
            provenance["compression"] = ctx.compressed_meta.get("distilled-pruned")

        def do_publish(_d: Path, variant=variant, source=source, provenance=provenance) -> None:
            publish_variant(
                variant,
                ctx.variant_paths[source],
                ctx.merged_dir / "tokenizer",
                ctx.data.label_names,
                ctx.max_length,
                cfg.repository,
                cfg.model_version,
                provenance,
                truncation=ctx.truncation,
            )

        ctx.cache.run(
            f"publish/{variant}",
            build_key,
            do_publish,
            eta=ctx.eta("publish"),
            detail=f"{model_name(variant)} version {cfg.model_version} into {cfg.repository}",
            valid=valid,
        )
        published[variant] = vdir
    return published


def check_targets(report: dict) -> list[dict]:
    """The acceptance targets of the build, evaluated on this report (PASS/MISS, never hidden)."""
    rows = {r["name"]: r for r in report["variants"]}
    out = []
    fp32 = rows.get("fp32")
    if not fp32:
        return out
    out.append(
        {
            "what": "merged FP32 test accuracy >= 0.95",
            "ok": fp32["accuracy"] >= 0.95,
            "detail": f"{fp32['accuracy']:.4f}",
        }
    )
    if "int8" in rows:
        acc = rows["int8"]["accuracy"]
        out.append(
            {
                "what": "served INT8 test accuracy >= 0.94 (the figure before early stopping)",
                "ok": acc >= 0.94,
                "detail": f"{acc:.4f}",
            }
        )
        d = (rows["int8"]["accuracy"] - fp32["accuracy"]) * 100
        out.append({"what": "served INT8 within 0.5 points of FP32", "ok": d >= -0.5, "detail": f"{d:+.2f} points"})
        tp = report["evaluate"]
        if tp["throughput"] and tp["batch_sizes"]:
            b = str(max(tp["batch_sizes"]))
            ratio = rows["int8"]["throughput"][b] / fp32["throughput"][b]
            out.append(
                {
                    "what": f"served INT8 >= 1.4x FP32 throughput at batch {b}",
                    "ok": ratio >= 1.4,
                    "detail": f"{ratio:.2f}x ({rows['int8']['throughput'][b]:.0f} vs {fp32['throughput'][b]:.0f} seq/s)",
                }
            )
    g = report.get("graph_optimization") or {}
    if g.get("applied") and "int8" in rows:
        d = (rows["int8"]["accuracy"] - fp32["accuracy"]) * 100
        out.append(
            {
                "what": "served INT8 from the fused graph within 0.3 points of FP32",
                "ok": d >= -0.3,
                "detail": f"{d:+.2f} points",
            }
        )
    if g.get("applied") and "fp32-fused" in rows:
        diff = g["parity_max_abs_logit_diff_vs_unfused"]
        out.append(
            {
                "what": f"fused FP32 logits = unfused FP32 within {g['tolerance']:g} (and same test predictions)",
                "ok": diff <= g["tolerance"] and rows["fp32-fused"]["agreement_with_fp32"] == 1.0,
                "detail": f"max |Δlogit| {diff:.3g} on parity batches; test agreement "
                f"{rows['fp32-fused']['agreement_with_fp32']:.4f}",
            }
        )
    if "fp16" in rows:
        d = (rows["fp16"]["accuracy"] - fp32["accuracy"]) * 100
        out.append({"what": "FP16 within 0.1 points of FP32", "ok": abs(d) <= 0.1, "detail": f"{d:+.2f} points"})
    tp = report["evaluate"]
    compressed = [r for r in report["variants"] if r["name"].removesuffix("-int8") in report.get("compression", {})]
    if compressed and "int8" in rows and tp["throughput"] and tp["batch_sizes"]:
        b = str(max(tp["batch_sizes"]))
        base = rows["int8"]["throughput"][b]
        best = None
        for r in compressed:
            loss = (fp32["accuracy"] - r["accuracy"]) * 100
            speed = r["throughput"][b] / base
            if loss <= 1.5 and (best is None or speed > best[1]):
                best = (r["name"], speed, loss)
        out.append(
            {
                "what": f"a compressed variant >= 2x the full model's INT8 throughput (batch {b}) losing <= 1.5 points",
                "ok": best is not None and best[1] >= 2.0,
                "detail": "no compressed variant within 1.5 points"
                if best is None
                else f"{best[0]}: {best[1]:.2f}x INT8 throughput, {best[2]:+.2f} points lost vs FP32",
            }
        )
    return out
