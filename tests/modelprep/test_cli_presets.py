"""``build`` options reach the build config for every preset (``--preset tiny --full-report`` used to drop them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.modelprep.cli import build_config, build_parser
from service.modelprep.config import REPORT_INT8_RECIPES, ExportConfig
from service.modelprep.errors import ConfigError


def _cfg(*args: str):
    return build_config(build_parser().parse_args(["build", *args]))


@pytest.mark.parametrize("preset", ["default", "tiny"])
def test_default_build_has_no_full_report_sections(preset):
    cfg = _cfg("--preset", preset)
    assert cfg.report_variants == ()
    assert cfg.evaluate.throughput is False
    assert cfg.compare_methods is False
    assert cfg.compress is None


@pytest.mark.parametrize("preset", ["default", "tiny"])
def test_full_report_adds_every_section_for_every_preset(preset):
    cfg = _cfg("--preset", preset, "--full-report")
    assert [q.tag for q in cfg.report_variants] == [q.tag for q in REPORT_INT8_RECIPES]
    assert cfg.evaluate.throughput is True
    assert cfg.compare_methods is True
    assert cfg.compress is not None and cfg.compress.magnitude is not None


def test_tiny_full_report_keeps_test_sized_budgets():
    tiny, full = _cfg("--preset", "tiny", "--full-report"), _cfg("--full-report")
    assert tiny.data.max_train_samples == 240 and tiny.train.max_steps == 12  # still the tiny build
    assert tiny.evaluate.repeats == 1 and tiny.evaluate.seconds_per_repeat < full.evaluate.seconds_per_repeat
    assert tiny.compress.distill.max_steps is not None and full.compress.distill.max_steps is None
    assert tiny.compress.prune.recovery_epochs == 0 < full.compress.prune.recovery_epochs
    assert tiny.workdir == Path("artifacts/default")  # the --workdir default, as for any preset


@pytest.mark.parametrize("preset", ["default", "tiny"])
def test_full_report_switches_drop_their_section(preset):
    cfg = _cfg("--preset", preset, "--full-report", "--no-throughput", "--no-compare-methods", "--no-report-variants")
    assert cfg.evaluate.throughput is False and cfg.compare_methods is False and cfg.report_variants == ()
    assert cfg.compress is not None  # compression stays: only its own switches remove it


def test_tiny_honours_compress_and_publish_compressed():
    assert _cfg("--preset", "tiny").compress is None
    cfg = _cfg("--preset", "tiny", "--publish-compressed")
    assert cfg.compress is not None and cfg.compress.publish is True
    assert cfg.compress.distill.max_steps is not None


def test_compression_stages_get_an_eta_from_the_builds_own_training_speed(tmp_path):
    import json
    from types import SimpleNamespace

    from service.modelprep.config import CompressConfig, DistillConfig, PruneConfig
    from service.modelprep.pipeline import _compress_eta, _distill_passes, _prune_passes

    train_dir = tmp_path / "train"
    data = SimpleNamespace(train=[None] * 1000)
    ctx = SimpleNamespace(cache=SimpleNamespace(path=lambda name: tmp_path / name), data=data, size_factor=lambda: 1.0)
    fallback, basis = _compress_eta(ctx, 2.0)  # no training timed yet: from the data size
    assert fallback > 0 and "estimate" in basis
    train_dir.mkdir()
    (train_dir / "train.json").write_text(json.dumps({"epoch_seconds": [100.0, 80.0, 90.0]}))
    one, basis = _compress_eta(ctx, 1.0)
    four, _ = _compress_eta(ctx, 4.0)
    assert "training epoch" in basis
    assert four - one == 3 * (one - _compress_eta(ctx, 0.0)[0])  # linear in the passes over the data
    assert one - _compress_eta(ctx, 0.0)[0] > 90.0  # recovery costs more than a LoRA epoch (90 s mean)
    cc = CompressConfig()
    assert _prune_passes(cc.prune) == cc.prune.recovery_epochs
    assert _prune_passes(cc.prune_student) == cc.prune_student.recovery_epochs * 2  # with its perturbed copies
    assert _distill_passes(cc.distill, 1000) == cc.distill.epochs * 2
    assert _distill_passes(DistillConfig(max_steps=4, batch_size=32), 1000) == 4 * 32 / 1000
    assert _prune_passes(PruneConfig(recovery_epochs=0)) == 0


def test_train_seed_varies_training_alone_on_the_same_split():
    cfg = _cfg("--seed", "13", "--train-seed", "14")
    assert cfg.data.seed == 13 and cfg.train.seed == 14
    same = _cfg("--seed", "21")
    assert same.data.seed == 21 and same.train.seed == 21  # without --train-seed, --seed seeds both


@pytest.mark.parametrize("preset", ["default", "tiny"])
def test_graph_optimization_reaches_the_export_config(preset):
    assert _cfg("--preset", preset).export.optimize == "none"
    assert _cfg("--preset", preset, "--graph-optimization", "fused").export.optimize == "fused"
    with pytest.raises(ConfigError, match="optimize must be"):
        ExportConfig(optimize="fast")
