"""Fine-tuning methods compared to convergence: LoRA, layered freezing with and without LoRA, full fine-tuning.

Every method trains on the same split with the same seed, batch size and truncation, with early stopping on the
validation split (the best epoch kept), in a fresh child process so its peak memory is its own. The comparison
reports test accuracy, macro-F1, trainable parameters, wall time to the best epoch, total training time and peak
resident memory, as JSON, Markdown and a PNG chart.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .config import TrainConfig, check, config_to_dict
from .data import Dataset
from .progress import Progress, Silent

#: method name -> (description, how to make its TrainConfig from the common settings)
METHODS = {
    "lora": "LoRA r=16 on the attention projections (+ pooler), all layers",
    "layered": "layered: freeze the lower 2/3 of the layers, tune the upper attention blocks + head",
    "layered+lora": "layered + LoRA: adapters only in the upper 1/3 of the layers (+ pooler, head)",
    "full": "full fine-tuning of every weight (the baseline)",
}


@dataclass
class CompareConfig:
    """Attributes:
    methods: which of ``METHODS`` to train, in order.
    epochs: the most epochs per method (early stopping usually ends sooner).
    patience: early-stopping patience in epochs.
    base: common settings (base model, batch size, max length, truncation, seed, selection metric, ...); the
        method-specific ones (method, learning rates, freeze_layers) are set per method.
    freeze_fraction: share of the encoder layers frozen by the layered methods (the reference text froze 8 of 12).
    """

    methods: tuple[str, ...] = tuple(METHODS)
    epochs: int = 10
    patience: int = 3
    base: TrainConfig = field(default_factory=TrainConfig)
    freeze_fraction: float = 2 / 3

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        for m in self.methods:
            check(m in METHODS, f"methods must be among {tuple(METHODS)}, got {m!r}")
        check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        check(self.patience >= 1, f"patience must be >= 1, got {self.patience}")
        check(0 < self.freeze_fraction < 1, f"freeze_fraction must be in (0, 1), got {self.freeze_fraction}")

    @staticmethod
    def for_build(train: TrainConfig, **kw) -> CompareConfig:
        """The comparison that matches a build's training settings."""
        return CompareConfig(base=train, epochs=kw.pop("epochs", max(train.epochs, 10)), **kw)

    def train_config(self, method: str, n_layers: int) -> TrainConfig:
        """The TrainConfig of one method."""
        b = self.base
        common = {
            "base_model": b.base_model,
            "batch_size": b.batch_size,
            "max_length": b.max_length,
            "max_length_coverage": b.max_length_coverage,
            "truncation": b.truncation,
            "seed": b.seed,
            "selection_metric": b.selection_metric,
            "class_weights": b.class_weights,
            "max_steps": b.max_steps,
            "epochs": self.epochs,
            "patience": self.patience,
        }
        frozen = max(1, min(n_layers - 1, round(n_layers * self.freeze_fraction)))
        if method == "lora":
            return TrainConfig.lora(**common)
        if method == "layered":
            return TrainConfig.layered(freeze_layers=frozen, **common)
        if method == "layered+lora":
            return TrainConfig.lora(freeze_layers=frozen, **common)
        return TrainConfig.full(**common)


def _rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _run_method(method: str, tcfg: TrainConfig, data: Dataset, bars: bool) -> dict:
    """One method in this (child) process: train, score the test split, measure memory."""
    import numpy as np

    from .finetune import train
    from .merge import load_trained
    from .modeling import predict_logits
    from .scoring import accuracy, class_report, macro_f1

    baseline = _rss_mib()
    prog = Progress(bars=bars, prefix=f"[modelprep {method}]")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = train(tcfg, data, Path(tmp), progress=prog)
        wall = time.perf_counter() - t0
        model, tok, _labels, max_length, truncation = load_trained(Path(tmp))
        logits = predict_logits(model, tok, data.test.texts, max_length, truncation=truncation)
        meta = json.loads((Path(tmp) / "train.json").read_text())
    pred, gold = logits.argmax(1), np.asarray(data.test.labels)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "method": method,
        "description": METHODS[method],
        "config": config_to_dict(dataclasses.replace(tcfg, max_length=max_length)),
        "trainable_parameters": res.trainable_parameters,
        "total_parameters": res.total_parameters,
        "trainable_fraction": res.trainable_parameters / res.total_parameters,
        "test_accuracy": accuracy(pred, gold),
        "test_macro_f1": macro_f1(pred, gold, len(data.label_names)),
        "per_class": class_report(pred, gold, data.label_names),
        "selection_metric": res.selection_metric,
        "best_validation_score": res.best_validation_score,
        "best_epoch": res.best_epoch,
        "epochs_run": len(res.history),
        "stopped_early": res.stopped_early,
        "seconds_to_best_epoch": res.seconds_to_best,
        "train_seconds": res.train_seconds,
        "cpu_seconds_to_best_epoch": res.cpu_seconds_to_best,
        "train_cpu_seconds": res.train_cpu_seconds,
        "wall_seconds": wall,
        "median_epoch_seconds": float(np.median(res.epoch_seconds)) if res.epoch_seconds else None,
        "peak_rss_mib": round(peak, 1),
        "rss_before_training_mib": round(baseline, 1),
        "max_length": max_length,
        "history": res.history,
        "token_lengths": meta.get("token_lengths"),
    }


def compare_methods(
    cfg: CompareConfig,
    data: Dataset,
    out_dir: Path,
    *,
    progress: Progress | None = None,
    max_train_samples: int | None = None,
) -> dict:
    """Train every method of ``cfg`` to convergence on ``data``; write ``methods.json/.md/.png`` into ``out_dir``.

    Each method runs in a child process started with ``spawn``: a script that calls this must do so under
    ``if __name__ == "__main__":`` (the CLI and pytest do).

    Returns:
        ``{"methods": [row, ...], "machine": ..., "dataset": ..., ...}`` (also written as ``methods.json``).
    """
    from .modeling import resolve_base_model

    prog = progress or Silent()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = resolve_base_model(cfg.base.base_model)
    n_layers = int(json.loads((base / "config.json").read_text())["num_hidden_layers"])
    rows = []
    started = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    for i, method in enumerate(cfg.methods, start=1):
        tcfg = cfg.train_config(method, n_layers)
        prog.line(
            f"method {i}/{len(cfg.methods)}: {METHODS[method]} (up to {cfg.epochs} epochs, patience {cfg.patience})"
        )
        # a fresh process per method: its peak memory is its own, and nothing is left over from the last one
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            row = pool.submit(_run_method, method, tcfg, data, prog.bars).result()
        rows.append(row)
        # written after every method: a long comparison that is stopped keeps the methods it finished
        _write(_result(cfg, data, base, max_train_samples, started, rows, complete=i == len(cfg.methods)), out_dir)
        prog.line(
            f"method {method}: test accuracy {row['test_accuracy']:.4f}, macro-F1 {row['test_macro_f1']:.4f}, "
            f"best epoch {row['best_epoch']} of {row['epochs_run']} run, {row['seconds_to_best_epoch']:.0f} s to it"
        )
    result = _result(cfg, data, base, max_train_samples, started, rows, complete=True)
    _write(result, out_dir)
    return result


def _result(
    cfg: CompareConfig,
    data: Dataset,
    base: Path,
    max_train_samples: int | None,
    started: float,
    rows: list,
    complete: bool,
) -> dict:
    from .report import machine_description

    return {
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_description(),
        "dataset": data.summary(),
        "base_model": str(base),
        "base_model_name": str(cfg.base.base_model or "minilm"),
        "max_train_samples": max_train_samples,
        "epochs": cfg.epochs,
        "patience": cfg.patience,
        "seconds": time.perf_counter() - started,
        "methods_requested": list(cfg.methods),
        "complete": complete,
        "methods": list(rows),
    }


def _write(result: dict, out_dir: Path) -> None:
    (out_dir / "methods.json").write_text(json.dumps(result, indent=2, default=str))
    (out_dir / "methods.md").write_text(render_markdown(result))
    render_png(result, out_dir / "methods.png")


def render_markdown(result: dict) -> str:
    """The comparison as a Markdown table with the machine named."""
    from service.machine import machine_line

    m = result["machine"]
    rows = result["methods"]
    metric = rows[0]["selection_metric"] if rows else "accuracy"
    lines = [
        f"# Fine-tuning methods on {result['dataset']['name']}, trained to convergence",
        "",
        f"Machine: {machine_line(m)}; no GPU; the cores were shared with other work, so times carry noise.",
        (
            f"Built {result['built_at']}. Data: {result['dataset']['sizes']} (hash {result['dataset']['data_hash']}); "
            f"base model `{result.get('base_model_name') or Path(result['base_model']).name}`"
            + (
                f", training split capped at {result['max_train_samples']} texts (stratified)"
                if result.get("max_train_samples")
                else ""
            )
            + ". Same split, seed, batch size and truncation for every "
            f"method; up to {result['epochs']} epochs with early stopping (patience {result['patience']}) on validation "
            f"{metric.replace('_', '-')}, best epoch kept; test split scored once at the end."
        ),
        "",
        (
            "| method | test accuracy | test macro-F1 | trainable params | trainable % | best epoch / run | "
            "s to best epoch | best epoch x median s/epoch | CPU s to best epoch | s training | s/epoch | "
            "peak RSS MiB |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    stretched = []
    for r in rows:
        cpu = r.get("cpu_seconds_to_best_epoch")
        lines.append(
            f"| {r['method']} | {r['test_accuracy']:.4f} | {r['test_macro_f1']:.4f} | {r['trainable_parameters']:,} | "
            f"{100 * r['trainable_fraction']:.2f}% | {r['best_epoch']} / {r['epochs_run']} | "
            f"{r['seconds_to_best_epoch']:.0f} | {median_seconds_to_best(r):.0f} | "
            f"{f'{cpu:.0f}' if cpu is not None else '–'} | {r['train_seconds']:.0f} | "
            f"{r['median_epoch_seconds']:.0f} | {r['peak_rss_mib']:.0f} |"
        )
        med = r["median_epoch_seconds"] or 0
        stretched += [
            f"{r['method']} epoch {h['epoch']} took {h['seconds']:.0f} s (median {med:.0f} s)"
            for h in r.get("history", [])
            if med and h["seconds"] > 3 * med
        ]
    lines += [
        "",
        (
            "Wall seconds include whatever else the machine did meanwhile (and any time the job was paused); "
            "'best epoch x median s/epoch' is the time to the best epoch at the run's typical epoch speed, and CPU "
            "seconds (all threads of the training process; '–' where the run predates that measurement) are not "
            "inflated by a pause."
        ),
    ]
    if stretched:
        lines += ["", "Epochs stretched by a paused or crowded machine: " + "; ".join(stretched) + "."]
    missing = [m for m in result.get("methods_requested", []) if m not in {r["method"] for r in rows}]
    if missing:
        lines += [
            "",
            f"**Incomplete**: {', '.join(missing)} had not finished when this was written (not measured here).",
        ]
    lines += ["", "Methods:", ""]
    lines += [f"- **{r['method']}**: {r['description']}" for r in rows]
    lines += [
        "",
        "Peak RSS is the child process's maximum resident memory (Python, torch, the model, optimizer state and "
        "activations); it includes the ~"
        + (f"{rows[0]['rss_before_training_mib']:.0f}" if rows else "?")
        + " MiB the process held before the model was loaded.",
        "",
        "![methods](methods.png)",
        "",
    ]
    return "\n".join(lines)


def median_seconds_to_best(row: dict) -> float:
    """Seconds to the best epoch at the run's median epoch time (robust to one paused or crowded epoch)."""
    return float(row["best_epoch"] or 0) * float(row["median_epoch_seconds"] or 0)


def render_png(result: dict, path: Path) -> Path:
    """Three panels: test accuracy and macro-F1, seconds to the best epoch, trainable parameters (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["methods"]
    names = [r["method"] for r in rows]
    x = list(range(len(rows)))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4))
    ax = axes[0]
    acc = [100 * r["test_accuracy"] for r in rows]
    f1 = [100 * r["test_macro_f1"] for r in rows]
    ax.bar([i - 0.2 for i in x], acc, 0.4, label="accuracy")
    ax.bar([i + 0.2 for i in x], f1, 0.4, label="macro-F1")
    lo = min(acc + f1) if rows else 0
    ax.set_ylim(max(0, lo - 3), 100)
    ax.set_title("Test scores (%)")
    ax.legend(fontsize=8)
    axes[1].bar(x, [median_seconds_to_best(r) for r in rows], color="#DD8452")
    axes[1].set_title("Seconds to the best epoch (best epoch x median epoch)")
    axes[2].bar(x, [r["trainable_parameters"] for r in rows], color="#55A868")
    axes[2].set_yscale("log")
    axes[2].set_title("Trainable parameters (log)")
    for a in axes:
        a.set_xticks(x)
        a.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    fig.suptitle(f"Fine-tuning methods on {result['dataset']['name']} ({result['machine']['cores']} CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
