"""The evaluation report: JSON (everything), Markdown (the tables) and a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path


def machine_description() -> dict[str, object]:
    """The machine (see service.machine) plus the versions of the libraries that produced the figures."""
    from service.machine import describe_machine

    versions: dict[str, str] = {}
    for mod in ("torch", "transformers", "peft", "onnx", "onnxruntime"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            continue  # a missing library is just not listed
    return {**describe_machine(), "gpu": None, "libraries": versions}


def _fmt_size(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def render_markdown(report: dict) -> str:
    """The human-readable tables of a report dict (as written by the pipeline)."""
    m = report["machine"]
    lines = [
        f"# Model report: {report['dataset']['name']} ({report['train']['method']})",
        "",
        (
            f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, flags: {m['cpu_flags'] or 'none'}; "
            f"no GPU. Built {report['built_at']} in {report['build_seconds']:.0f} s."
        ),
        f"Data: {report['dataset']['sizes']} (hash {report['dataset']['data_hash']}); test split held out.",
        "",
        "## Variants (test split)",
        "",
    ]
    bss = report["evaluate"]["batch_sizes"] if report["evaluate"]["throughput"] else []
    head = [
        "variant",
        "served",
        "size",
        "accuracy",
        "macro-F1",
        "Δacc vs FP32 (pts)",
        "agree w/ FP32",
        "max |Δlogit|",
    ] + [f"seq/s b{b}" for b in bss]
    if bss:
        head.append(f"× FP32 b{bss[-1]}")
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    rows = report["variants"]
    fp32 = next((r for r in rows if r["name"] == "fp32"), None)
    for r in rows:
        d = (r["accuracy"] - fp32["accuracy"]) * 100 if fp32 else 0.0
        cells = [
            r["name"],
            "yes" if r["served"] else "",
            _fmt_size(r["size_bytes"]),
            f"{r['accuracy']:.4f}",
            f"{r['macro_f1']:.4f}",
            f"{d:+.2f}",
            "" if r["agreement_with_fp32"] is None else f"{r['agreement_with_fp32']:.4f}",
            "" if r["max_abs_logit_diff_vs_fp32"] is None else f"{r['max_abs_logit_diff_vs_fp32']:.3g}",
        ]
        cells += [f"{r['throughput'].get(str(b), 0):.0f}" for b in bss]
        if bss and fp32 and fp32["throughput"].get(str(bss[-1])):
            cells.append(f"{r['throughput'][str(bss[-1])] / fp32['throughput'][str(bss[-1])]:.2f}×")
        elif bss:
            cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    if bss:
        ev = report["evaluate"]
        lines += [
            "",
            (
                f"Throughput: in-process ONNX Runtime (CPU EP, {ev.get('threads') or m['cores']} threads), consecutive test "
                f"questions padded to their batch's longest, median of {ev['repeats']} rounds; each round times every "
                f"variant for ≥{ev['seconds_per_repeat']} s one after the other, so a slow spell of the shared VM (absolute "
                "figures vary by up to ~30% between builds) hits all variants alike and the ratios stay comparable."
            ),
        ]
    from .fusion import graph_optimization_lines

    lines += graph_optimization_lines(report)
    lines += ["", "## Targets", ""]
    for t in report.get("targets", []):
        lines.append(f"- {'PASS' if t['ok'] else 'MISS'}: {t['what']} — {t['detail']}")
    methods = report.get("methods") or []
    if methods:
        lines += [
            "",
            "## Fine-tuning methods (each trained to convergence, same split and seed)",
            "",
            (
                "| method | test accuracy | test macro-F1 | trainable params | trainable % | best epoch / run | "
                "s to best epoch | peak RSS MiB |"
            ),
            "|---|---|---|---|---|---|---|---|",
        ]
        for mm in methods:
            lines.append(
                f"| {mm['method']} | {mm['test_accuracy']:.4f} | {mm['test_macro_f1']:.4f} | "
                f"{mm['trainable_parameters']:,} | {100 * mm['trainable_fraction']:.2f}% | "
                f"{mm['best_epoch']} / {mm['epochs_run']} | {mm['seconds_to_best_epoch']:.0f} | {mm['peak_rss_mib']:.0f} |"
            )
    lines += _per_class_lines(report)
    st = report.get("stage_seconds") or {}
    if st:
        reused = set(report.get("reused_stages") or [])
        lines += [
            "",
            "## Build time per stage (seconds, when the stage was built)",
            "",
            "| stage | seconds | this run |",
            "|---|---|---|",
        ]
        for k, v in st.items():
            lines.append(f"| {k} | {v:.0f} | {'reused' if k in reused else 'built'} |")
        lines.append(f"| **sum** | **{sum(st.values()):.0f}** | |")
    tr = report["train"]
    metric = str(tr.get("selection_metric", "accuracy")).replace("_", "-")
    stop = (
        f"stopped early after epoch {tr['epochs_run']} of at most {tr.get('max_epochs')} (patience {tr.get('patience')})"
        if tr.get("stopped_early")
        else f"ran {tr['epochs_run']} of at most {tr.get('max_epochs')} epochs"
    )
    weights = " with class-weighted loss (balanced)" if tr.get("class_weights") else ""
    lines += [
        "",
        "## Training of the served model",
        "",
        f"Method {tr['method']}{weights}, {stop}, {tr['steps']} steps"
        + (f", {tr['train_seconds']:.0f} s" if tr.get("train_seconds") else "")
        + f". Best epoch {tr.get('best_epoch')} selected on validation {metric}"
        + (f" ({tr['selection_reason']})" if tr.get("selection_reason") else "")
        + " "
        f"({_num(tr.get('best_validation_score'))}; validation accuracy {_num(tr['best_validation_accuracy'])}). "
        f"Merge parity (merged vs adapter, max |Δlogit|) {report['merge']['max_abs_logit_diff_vs_adapter']}, "
        f"ONNX parity vs torch {report['export']['parity_max_abs_logit_diff_vs_torch']:.3g}.",
    ]
    lines += _length_lines(report)
    lines += ["", "![variants](report.png)", ""]
    return "\n".join(lines)


def _num(v) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else str(v)


def _length_lines(report: dict) -> list[str]:
    lengths = report.get("token_lengths") or {}
    tr, te = lengths.get("train"), lengths.get("test")
    if not tr:
        return []
    out = [
        "",
        "## Token lengths and truncation",
        "",
        f"max_length {tr['max_length']} ({tr.get('chosen', 'given')}), truncation {tr.get('truncation', 'head')}.",
        "",
        "| split | texts | p50 | p90 | p95 | p99 | max | truncated share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in (("train", tr), ("test", te)):
        if s and s.get("texts"):
            out.append(
                f"| {name} | {s['texts']} | {s['p50']} | {s['p90']} | {s['p95']} | {s['p99']} | {s['max']} | "
                f"{100 * s['truncated_share']:.1f}% |"
            )
    return out


def _per_class_lines(report: dict) -> list[str]:
    rows = [r for r in report["variants"] if r.get("per_class") and (r["name"] == "fp32" or r["served"])]
    if not rows:
        return []
    labels = list(rows[0]["per_class"])
    out = [
        "",
        "## Per-class precision / recall (test split)",
        "",
        "| class | support | " + " | ".join(f"{r['name']} P / R" for r in rows) + " |",
        "|---|---|" + "---|" * len(rows),
    ]
    for lab in labels:
        cells = [f"{r['per_class'][lab]['precision']:.3f} / {r['per_class'][lab]['recall']:.3f}" for r in rows]
        out.append(f"| {lab} | {rows[0]['per_class'][lab]['support']} | " + " | ".join(cells) + " |")
    return out


def render_png(report: dict, path: Path) -> Path:
    """Bar charts: test accuracy and throughput at the largest batch size per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["variants"]
    names = [r["name"] for r in rows]
    bss = report["evaluate"]["batch_sizes"] if report["evaluate"]["throughput"] else []
    ncols = 2 if bss else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.8), squeeze=False)
    colors = ["#4C72B0" if not r["served"] else "#DD8452" for r in rows]
    ax = axes[0][0]
    accs = [100 * r["accuracy"] for r in rows]
    ax.bar(names, accs, color=colors)
    lo = min(accs) - 3
    ax.set_ylim(max(0, lo), 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy per variant (orange = served)")
    for i, a in enumerate(accs):
        ax.text(i, a + 0.1, f"{a:.2f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    if bss:
        ax = axes[0][1]
        width = 0.8 / len(bss)
        for k, b in enumerate(bss):
            vals = [r["throughput"].get(str(b), 0) for r in rows]
            ax.bar([i + k * width - 0.4 + width / 2 for i in range(len(rows))], vals, width, label=f"batch {b}")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("sequences / s (median)")
        ax.set_title(f"In-process throughput, {report['machine']['cores']} CPU cores")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict, out_dir: Path) -> Path:
    """Write ``report.json``, ``report.md`` and ``report.png`` into ``out_dir``; returns the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "report.md").write_text(render_markdown(report))
    render_png(report, out_dir / "report.png")
    return out_dir / "report.json"


def _length_row(setting: str, path: Path, positive: str | None) -> dict:
    """One build's row for the ``--max-length`` comparison (see ``summarize_length_runs``)."""
    import statistics

    r = json.loads(Path(path).read_text())
    v = {x["name"]: x for x in r["variants"]}
    t, lengths = r["train"], r["token_lengths"]
    skipped = t["max_epochs"] - t["epochs_run"]
    median_epoch = statistics.median(t["epoch_seconds"]) if t["epoch_seconds"] else 0.0
    row = {
        "setting": setting,
        "max_length": lengths["train"]["max_length"],
        "truncated_train": lengths["train"]["truncated_share"],
        "truncated_test": lengths["test"]["truncated_share"],
        "fp32_accuracy": v["fp32"]["accuracy"],
        "fp32_macro_f1": v["fp32"]["macro_f1"],
        "int8_accuracy": v["int8"]["accuracy"],
        "int8_macro_f1": v["int8"]["macro_f1"],
        "epochs_run": t["epochs_run"],
        "max_epochs": t["max_epochs"],
        "best_epoch": t["best_epoch"],
        "stopped_early": t["stopped_early"],
        "selection_metric": t["selection_metric"],
        "train_seconds": t["train_seconds"],
        "seconds_to_best": t["seconds_to_best"],
        "seconds_saved_by_early_stopping": skipped * median_epoch,
        "report": str(path),
    }
    if positive:
        pc = v["int8"]["per_class"][positive]
        row[f"int8_{positive}_precision"], row[f"int8_{positive}_recall"] = pc["precision"], pc["recall"]
    return row


def summarize_length_runs(reports: dict[str, Path], positive: str | None = None) -> dict:
    """One row per build of the same data at different ``--max-length`` settings (``{setting: report.json}``).

    Each row: the length used, truncated shares, FP32 and served-INT8 test accuracy / macro-F1, the positive
    class's precision and recall (``positive``: e.g. ``spam``), epochs run against the maximum and the best epoch,
    training seconds, and the seconds early stopping saved (epochs skipped x the run's median epoch time). The
    summary also says which setting scored best on INT8 macro-F1 and how far ``auto`` is from it, in points.
    """
    rows = [_length_row(setting, path, positive) for setting, path in reports.items()]
    best = max(rows, key=lambda x: x["int8_macro_f1"])
    hand = [x for x in rows if x["setting"] != "auto"]
    auto = next((x for x in rows if x["setting"] == "auto"), None)
    out = {"rows": rows, "best_setting": best["setting"]}
    if auto and hand:
        best_hand = max(hand, key=lambda x: x["int8_macro_f1"])
        out["best_hand_picked"] = best_hand["setting"]
        out["auto_minus_best_hand_picked_points"] = {
            m: round(100 * (auto[m] - best_hand[m]), 2) for m in ("int8_macro_f1", "int8_accuracy")
        }
    return out


#: The test scores aggregated over training seeds by ``summarize_length_seed_runs``.
SEED_METRICS = ("int8_macro_f1", "int8_accuracy", "fp32_macro_f1", "fp32_accuracy")


def summarize_length_seed_runs(reports: dict[str, dict[int, Path]], positive: str | None = None) -> dict:
    """``summarize_length_runs`` repeated over training seeds on one split: ``{setting: {train_seed: report.json}}``.

    Training noise (initialization, dropout, batch order) on a small data set can move a score by more than the
    difference between two settings, so one seed per setting cannot say which is better. Each setting gets the
    mean, sample standard deviation, min and max over its seeds of every score in ``SEED_METRICS``; the best
    setting is the one with the highest mean INT8 macro-F1, and ``auto`` is compared with the best hand-picked
    setting by the difference of means and, seed by seed (same split, same seed: paired), by the per-seed
    differences. Reports that carry their config must share one data config (the same split) and the seed they
    are filed under.

    Raises:
        ValueError: a report's training seed differs from its key, or the runs were made on different splits.
    """
    import statistics

    rows, data_configs = [], set()
    for setting, runs in reports.items():
        for seed, path in sorted(runs.items()):
            cfg = json.loads(Path(path).read_text()).get("config")
            if cfg:
                if cfg["train"]["seed"] != seed:
                    raise ValueError(f"{path}: training seed {cfg['train']['seed']}, filed under seed {seed}")
                data_configs.add(json.dumps(cfg["data"], sort_keys=True))
            rows.append({**_length_row(setting, path, positive), "train_seed": seed})
    if len(data_configs) > 1:
        raise ValueError(f"the runs were made on {len(data_configs)} different data configs (splits)")
    settings = []
    for setting in reports:
        rs = [x for x in rows if x["setting"] == setting]
        agg = {
            "setting": setting,
            "max_length": sorted({x["max_length"] for x in rs}),
            "truncated_train": max(x["truncated_train"] for x in rs),
            "truncated_test": max(x["truncated_test"] for x in rs),
            "seeds": [x["train_seed"] for x in rs],
            "epochs_run": [x["epochs_run"] for x in rs],
            "best_epoch": [x["best_epoch"] for x in rs],
            "max_epochs": rs[0]["max_epochs"],
            "train_seconds": [x["train_seconds"] for x in rs],
        }
        for m in SEED_METRICS:
            vals = [x[m] for x in rs]
            agg[m] = {
                "mean": statistics.fmean(vals),
                "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "min": min(vals),
                "max": max(vals),
            }
        settings.append(agg)
    best = max(settings, key=lambda x: x["int8_macro_f1"]["mean"])
    out = {"rows": rows, "settings": settings, "best_setting": best["setting"]}
    hand = [x for x in settings if x["setting"] != "auto"]
    auto = next((x for x in settings if x["setting"] == "auto"), None)
    if auto and hand:
        best_hand = max(hand, key=lambda x: x["int8_macro_f1"]["mean"])
        out["best_hand_picked"] = best_hand["setting"]
        out["auto_minus_best_hand_picked_points"] = {
            m: round(100 * (auto[m]["mean"] - best_hand[m]["mean"]), 2) for m in ("int8_macro_f1", "int8_accuracy")
        }
        by_seed = {(x["setting"], x["train_seed"]): x for x in rows}
        out["auto_minus_best_hand_picked_points_per_seed"] = {
            str(seed): round(
                100 * (by_seed["auto", seed]["int8_macro_f1"] - by_seed[best_hand["setting"], seed]["int8_macro_f1"]), 2
            )
            for seed in auto["seeds"]
            if (best_hand["setting"], seed) in by_seed
        }
        out["auto_within_1_point_of_best_hand_picked"] = (
            out["auto_minus_best_hand_picked_points"]["int8_macro_f1"] >= -1.0
        )
    return out


def render_length_seed_runs(summary: dict) -> str:
    """The per-setting aggregate of ``summarize_length_seed_runs`` as a Markdown table (mean ± sd, min-max)."""

    def cell(a: dict) -> str:
        return f"{a['mean']:.4f} ± {a['sd']:.4f} ({a['min']:.4f}-{a['max']:.4f})"

    head = (
        "| --max-length | tokens | truncated (train / test) | seeds | INT8 macro-F1 mean ± sd (min-max) "
        "| INT8 acc mean ± sd (min-max) | FP32 macro-F1 mean | epochs run (best) per seed | training s per seed |"
    )
    lines = [
        head,
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in sorted(summary["settings"], key=lambda x: x["max_length"][0]):
        epochs = ", ".join(f"{r} ({b})" for r, b in zip(x["epochs_run"], x["best_epoch"], strict=True))
        lines.append(
            f"| {x['setting']} | {'/'.join(str(n) for n in x['max_length'])} "
            f"| {100 * x['truncated_train']:.1f}% / {100 * x['truncated_test']:.1f}% "
            f"| {', '.join(str(s) for s in x['seeds'])} | {cell(x['int8_macro_f1'])} | {cell(x['int8_accuracy'])} "
            f"| {x['fp32_macro_f1']['mean']:.4f} | {epochs} | {', '.join(f'{s:.0f}' for s in x['train_seconds'])} |"
        )
    return "\n".join(lines) + "\n"


def render_length_runs(summary: dict, positive: str | None = None) -> str:
    """The summary of ``summarize_length_runs`` as a Markdown table."""
    head = "| --max-length | tokens | truncated (train / test) | FP32 acc | FP32 macro-F1 | INT8 acc | INT8 macro-F1 |"
    sep = "|---|---|---|---|---|---|---|"
    if positive:
        head += f" INT8 {positive} P / R |"
        sep += "---|"
    head += " epochs run / max (best) | training s | s saved by early stopping |"
    sep += "---|---|---|"
    lines = [head, sep]
    for x in sorted(summary["rows"], key=lambda x: x["max_length"]):
        line = (
            f"| {x['setting']} | {x['max_length']} | {100 * x['truncated_train']:.1f}% / {100 * x['truncated_test']:.1f}% "
            f"| {x['fp32_accuracy']:.4f} | {x['fp32_macro_f1']:.4f} | {x['int8_accuracy']:.4f} | {x['int8_macro_f1']:.4f} |"
        )
        if positive:
            line += f" {x[f'int8_{positive}_precision']:.3f} / {x[f'int8_{positive}_recall']:.3f} |"
        line += (
            f" {x['epochs_run']} / {x['max_epochs']} ({x['best_epoch']}) | {x['train_seconds']:.0f} |"
            f" ~{x['seconds_saved_by_early_stopping']:.0f} |"
        )
        lines.append(line)
    return "\n".join(lines) + "\n"
