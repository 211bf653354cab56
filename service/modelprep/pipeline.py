"""The whole build: data -> fine-tune -> merge -> ONNX FP32 -> FP16 / INT8 -> evaluate -> report -> publish.

Every stage writes into ``workdir/<stage>/`` with a ``stage.key`` holding the hash of everything it depends on;
a re-run skips each stage whose key still matches, so running the build twice costs seconds.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import BuildConfig, QuantizeConfig, TrainConfig, config_hash, config_to_dict
from .data import Dataset, load_dataset

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    """Paths of what the build produced and the report dict."""

    workdir: Path
    report_path: Path
    published: dict[str, Path]
    report: dict
    reused: list[str]


class _Stages:
    def __init__(self, workdir: Path, force: bool) -> None:
        self.workdir = workdir
        self.force = force
        self.reused: list[str] = []
        #: seconds each stage took when it was (last) built, reused or not
        self.seconds: dict[str, float] = {}

    def run(self, name: str, key: str, fn: Callable[[Path], None]) -> Path:
        d = self.workdir / name
        stamp = d / "stage.key"
        if not self.force and stamp.is_file() and stamp.read_text().strip() == key:
            self.reused.append(name)
            try:
                self.seconds[name] = float((d / "stage.seconds").read_text())
            except (OSError, ValueError):
                pass
            log.info("stage %s: up to date, reused", name)
            return d
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        t0 = time.perf_counter()
        fn(d)
        self.seconds[name] = time.perf_counter() - t0
        (d / "stage.seconds").write_text(f"{self.seconds[name]:.1f}")
        stamp.write_text(key)
        return d


def _say(msg: str) -> None:
    print(f"[modelprep] {msg}", flush=True)


def compare_methods(cfg: BuildConfig, data: Dataset, trained: dict, steps: int = 20) -> list[dict]:
    """Trainable parameters and seconds per epoch of LoRA, layered freezing and full fine-tuning.

    The served method's figure comes from its real training run; the others are timed over ``steps`` optimizer
    steps on the same data and batch size and extrapolated to a full epoch.
    """
    from .finetune import train

    out = []
    for method in ("lora", "layered", "full"):
        if method == cfg.train.method and cfg.train.freeze_layers == 0:
            out.append(
                {
                    "method": method,
                    "trainable_parameters": trained["trainable_parameters"],
                    "trainable_fraction": trained["trainable_parameters"] / trained["total_parameters"],
                    "epoch_seconds": statistics.median(trained["epoch_seconds"]),
                    "how": f"median of {len(trained['epoch_seconds'])} full epoch(s) of the served build",
                }
            )
            continue
        common = dict(
            epochs=1,
            max_steps=steps,
            batch_size=cfg.train.batch_size,
            max_length=cfg.train.max_length,
            seed=cfg.train.seed,
            base_model=cfg.train.base_model,
        )
        tcfg = {
            "lora": lambda: TrainConfig.lora(**common),
            "layered": lambda: TrainConfig.layered(freeze_layers=4, **common),
            "full": lambda: TrainConfig.full(**common),
        }[method]()
        with tempfile.TemporaryDirectory() as tmp:
            _say(f"timing {method} fine-tuning over {steps} steps")
            res = train(tcfg, data, Path(tmp), progress=True)
        out.append(
            {
                "method": method + (" (freeze 4 of 6 layers, tune upper attention)" if method == "layered" else ""),
                "trainable_parameters": res.trainable_parameters,
                "trainable_fraction": res.trainable_parameters / res.total_parameters,
                "epoch_seconds": res.epoch_seconds[0],
                "how": f"{steps} steps timed, extrapolated to one epoch",
            }
        )
    return out


def build(cfg: BuildConfig, *, force: bool = False, progress: bool = True) -> BuildResult:
    """Run (or resume) the whole build and publish the served variants.

    Args:
        cfg: the build configuration.
        force: rebuild every stage even when its key matches.
        progress: show progress bars.

    Returns:
        A ``BuildResult``.
    """
    from .evaluate import evaluate_variant, measure_throughput_interleaved
    from .export import export_onnx
    from .finetune import train
    from .merge import merge_adapter
    from .publish import model_name, publish_variant
    from .quantize import convert_fp16, quantize_int8
    from .report import machine_description, write_report

    t_start = time.perf_counter()
    workdir = cfg.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    stages = _Stages(workdir, force)

    data = load_dataset(cfg.data)
    _say(
        f"data {data.name}: {len(data.train)} train / {len(data.validation)} validation / {len(data.test)} test, "
        f"{len(data.label_names)} labels"
    )
    k_train = config_hash(cfg.data, cfg.train, data.data_hash)
    train_dir = stages.run("train", k_train, lambda d: train(cfg.train, data, d, progress=progress))
    trained = json.loads((train_dir / "train.json").read_text())

    parity_texts = data.validation.texts[:64] or data.test.texts[:64]
    k_merge = config_hash(k_train, "merge")
    merged_dir = stages.run("merged", k_merge, lambda d: merge_adapter(train_dir, d, parity_texts))
    merge_meta = json.loads((merged_dir / "merge.json").read_text())
    max_length = int(merge_meta["max_length"])

    k_export = config_hash(k_merge, cfg.export)
    onnx_dir = stages.run(
        "onnx", k_export, lambda d: export_onnx(cfg.export, merged_dir, d / "fp32.onnx", parity_texts)
    )
    fp32_path = onnx_dir / "fp32.onnx"
    export_meta = json.loads(fp32_path.with_suffix(".json").read_text())

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir / "tokenizer"), local_files_only=True)

    variant_paths: dict[str, Path] = {"fp32": fp32_path}
    k_fp16 = config_hash(k_export, cfg.fp16)
    d16 = stages.run("fp16", k_fp16, lambda d: convert_fp16(cfg.fp16, fp32_path, d / "fp16.onnx"))
    variant_paths["fp16"] = d16 / "fp16.onnx"

    int8_recipes: list[tuple[str, QuantizeConfig]] = [("int8", cfg.int8)]
    for q in cfg.report_variants:
        if q.tag != cfg.int8.tag:
            int8_recipes.append((q.tag, q))
    calib = data.train.texts
    for name, q in int8_recipes:
        k_q = config_hash(k_export, q)
        _say(f"quantizing {name} ({q.tag})")
        dq = stages.run(
            f"int8/{q.tag}",
            k_q,
            lambda d, q=q: quantize_int8(
                q, fp32_path, d / "model.onnx", tokenizer=tokenizer, calibration_texts=calib, max_length=max_length
            ),
        )
        variant_paths[name if name == "int8" else q.tag] = dq / "model.onnx"

    compressed_meta: dict[str, dict] = {}
    if cfg.compress is not None:
        compressed_meta = _build_compressed(
            cfg, stages, data, merged_dir, k_merge, parity_texts, tokenizer, max_length, variant_paths, progress
        )

    # evaluation: cached too (throughput measurement takes minutes)
    k_eval = config_hash(
        k_export,
        k_fp16,
        [config_hash(k_export, q) for _, q in int8_recipes],
        cfg.evaluate,
        cfg.served_variants,
        cfg.compare_methods,
        cfg.compress,
    )
    report_holder: dict = {}

    def do_eval(d: Path) -> None:
        from tqdm.auto import tqdm

        n_tp = len(cfg.evaluate.batch_sizes) * cfg.evaluate.repeats if cfg.evaluate.throughput else 0
        bar = tqdm(total=n_tp * len(variant_paths), desc="throughput", unit="run", disable=not progress or not n_tp)
        rows, sessions = [], {}
        ref = None
        texts, gold = data.test.texts, data.test.labels
        for name, path in variant_paths.items():
            _say(f"evaluating {name}")
            row, logits, sessions[name] = evaluate_variant(
                name,
                path,
                tokenizer,
                texts,
                gold,
                len(data.label_names),
                max_length,
                cfg.evaluate,
                reference_logits=ref,
            )
            if name == "fp32":
                ref = logits
            row.served = name in cfg.served_variants
            if name == "int8":
                row.note = f"served recipe: {cfg.int8.tag}"
            elif name in compressed_meta:
                row.note = compressed_meta[name].get("note", "")
            rows.append(row)
        if cfg.evaluate.throughput:
            _say(f"throughput of {len(sessions)} variants, interleaved ({cfg.evaluate.repeats} rounds)")
            speed = measure_throughput_interleaved(sessions, tokenizer, texts, max_length, cfg.evaluate, bar)
            for row in rows:
                row.throughput, row.throughput_runs = speed[row.name]
        sessions.clear()
        rows = [row.to_dict() for row in rows]
        bar.close()
        methods = compare_methods(cfg, data, trained) if cfg.compare_methods else []
        report_holder["variants"] = rows
        report_holder["methods"] = methods
        (d / "eval.json").write_text(json.dumps({"variants": rows, "methods": methods}, indent=2))

    eval_dir = stages.run("eval", k_eval, do_eval)
    ev = json.loads((eval_dir / "eval.json").read_text())
    rows, methods = ev["variants"], ev["methods"]

    report = {
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": 0.0,
        "reused_stages": stages.reused,
        "machine": machine_description(),
        "dataset": data.summary(),
        "config": config_to_dict(cfg),
        "train": {
            "method": cfg.train.method,
            "epochs_run": len(trained["history"]),
            "steps": trained["steps"],
            "best_validation_accuracy": trained["best_validation_accuracy"],
            "trainable_parameters": trained["trainable_parameters"],
            "total_parameters": trained["total_parameters"],
            "epoch_seconds": trained["epoch_seconds"],
            "history": trained["history"],
        },
        "merge": merge_meta,
        "export": export_meta,
        "evaluate": config_to_dict(cfg.evaluate),
        "variants": rows,
        "methods": methods,
        "compression": compressed_meta,
    }
    report["targets"] = check_targets(report)

    published: dict[str, Path] = {}
    by_name = {r["name"]: r for r in rows}
    for variant in cfg.served_variants:
        name = model_name(variant)
        vdir = cfg.repository / name / str(cfg.model_version)
        build_key = config_hash(k_eval, variant)
        prov_path = vdir / "provenance.json"
        if not force and prov_path.is_file() and (vdir / "model.onnx").is_file():
            try:
                if json.loads(prov_path.read_text()).get("build_key") == build_key:
                    published[variant] = vdir
                    stages.reused.append(f"publish/{variant}")
                    continue
            except json.JSONDecodeError:
                pass
        _say(f"publishing {name} version {cfg.model_version} into {cfg.repository}")
        published[variant] = publish_variant(
            variant,
            variant_paths[variant],
            merged_dir / "tokenizer",
            data.label_names,
            max_length,
            cfg.repository,
            cfg.model_version,
            {
                "build_key": build_key,
                "config": config_to_dict(cfg),
                "data_hash": data.data_hash,
                "dataset": data.summary(),
                "metrics": by_name.get(variant),
                "fp32_metrics": {k: by_name["fp32"][k] for k in ("accuracy", "macro_f1")},
                "onnx_parity_vs_torch": export_meta["parity_max_abs_logit_diff_vs_torch"],
                "merge_parity_vs_adapter": merge_meta["max_abs_logit_diff_vs_adapter"],
            },
        )
    if cfg.compress is not None and cfg.compress.publish and "distilled-pruned-int8" in variant_paths:
        name = "small_int8"
        vdir = publish_variant(
            name,
            variant_paths["distilled-pruned-int8"],
            merged_dir / "tokenizer",
            data.label_names,
            max_length,
            cfg.repository,
            cfg.model_version,
            {
                "build_key": config_hash(k_eval, name),
                "config": config_to_dict(cfg),
                "data_hash": data.data_hash,
                "metrics": by_name.get("distilled-pruned-int8"),
                "compression": compressed_meta.get("distilled-pruned"),
            },
        )
        published[name] = vdir
    report["build_seconds"] = time.perf_counter() - t_start
    report["reused_stages"] = stages.reused
    report["stage_seconds"] = {k: round(v, 1) for k, v in stages.seconds.items()}
    report_dir = cfg.report_dir or (workdir / "report")
    report_path = write_report(report, report_dir)
    _say(f"report written to {report_dir}/report.md")
    return BuildResult(workdir, report_path, published, report, stages.reused)


def _build_compressed(
    cfg: BuildConfig,
    stages: _Stages,
    data: Dataset,
    merged_dir: Path,
    k_merge: str,
    parity_texts: list[str],
    tokenizer,
    max_length: int,
    variant_paths: dict[str, Path],
    progress: bool,
) -> dict[str, dict]:
    """Pruned, distilled, distilled+pruned (each FP32 and INT8) and sparse variants; adds them to ``variant_paths``."""
    from .compress import distill, magnitude_prune, structured_prune
    from .export import export_onnx
    from .quantize import quantize_int8

    cc = cfg.compress
    assert cc is not None
    meta: dict[str, dict] = {}

    def model_stage(name: str, key: str, make: Callable[[Path], Path]) -> Path:
        def run(d: Path) -> None:
            make(d / "hf")
            export_onnx(cfg.export, d / "hf", d / "model.onnx", parity_texts)

        _say(f"compression: {name}")
        d = stages.run(f"compress/{name}", key, run)
        m = json.loads((d / "hf" / "merge.json").read_text())
        meta[name] = {k: v for k, v in m.items() if k not in ("labels",)}
        variant_paths[name] = d / "model.onnx"
        return d

    def int8_stage(name: str, source: Path, key: str) -> None:
        d = stages.run(
            f"compress/{name}",
            config_hash(key, cc.int8),
            lambda d: quantize_int8(
                cc.int8,
                source,
                d / "model.onnx",
                tokenizer=tokenizer,
                calibration_texts=data.train.texts,
                max_length=max_length,
            ),
        )
        variant_paths[name] = d / "model.onnx"

    k_pruned = config_hash(k_merge, cc.prune)
    pd = model_stage(
        "pruned", k_pruned, lambda out: structured_prune(cc.prune, merged_dir, data, out, progress=progress)
    )
    meta["pruned"]["note"] = (
        f"FFN neurons kept: {meta['pruned']['intermediate_size'][1]} of "
        f"{meta['pruned']['intermediate_size'][0]} per layer, "
        f"{100 * meta['pruned']['removed_fraction']:.0f}% of parameters removed"
    )
    int8_stage("pruned-int8", pd / "model.onnx", k_pruned)
    k_dist = config_hash(k_merge, cc.distill)
    dd = model_stage("distilled", k_dist, lambda out: distill(cc.distill, merged_dir, data, out, progress=progress))
    meta["distilled"]["note"] = f"student keeps layers {list(cc.distill.student_layers)} of the teacher"
    int8_stage("distilled-int8", dd / "model.onnx", k_dist)
    k_dp = config_hash(k_dist, cc.prune_student)
    dp = model_stage(
        "distilled-pruned",
        k_dp,
        lambda out: structured_prune(cc.prune_student, dd / "hf", data, out, progress=progress),
    )
    meta["distilled-pruned"]["note"] = (
        f"distilled student, then FFN {meta['distilled-pruned']['intermediate_size'][1]}/"
        f"{meta['distilled-pruned']['intermediate_size'][0]} neurons"
    )
    int8_stage("distilled-pruned-int8", dp / "model.onnx", k_dp)
    if cc.magnitude is not None:
        model_stage(
            "sparse",
            config_hash(k_merge, cc.magnitude),
            lambda out: magnitude_prune(cc.magnitude, merged_dir, data, out, progress=progress),
        )
        meta["sparse"]["note"] = (
            f"{100 * meta['sparse']['sparsity']:.0f}% of encoder weights are zero; dense kernels gain no speed from it"
        )
    return meta


def check_targets(report: dict) -> list[dict]:
    """The acceptance targets of the default build, evaluated on this report (PASS/MISS, never hidden)."""
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
                    "detail": f"{ratio:.2f}x ({rows['int8']['throughput'][b]:.0f} vs "
                    f"{fp32['throughput'][b]:.0f} seq/s)",
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
