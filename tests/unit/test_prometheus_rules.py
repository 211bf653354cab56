"""The Prometheus rules in deploy/prometheus pass the real ``promtool`` (syntax and unit tests on synthetic series).

promtool comes from Debian's ``prometheus`` package (scripts/setup.sh installs it). Without it these tests skip on a
developer machine, but fail in CI (``CI=true``), where a missing promtool must never pass silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = REPO_ROOT / "deploy" / "prometheus"
RULE_FILES = ("recording-rules.yml", "alert-rules.yml")
OPERATING_ALERTS = {"LoraserveGpuUnderutilized", "LoraserveP99LatencyHigh", "LoraserveGpuMemoryHigh"}
#: The autoscaling chain and service health (issue 13): none of these failures may go unnoticed.
SCALING_ALERTS = {
    "LoraserveContainerMemoryHigh",
    "LoraserveHpaScalingInactive",
    "LoraserveHpaAtMaxReplicas",
    "LoraserveScalingMetricsAbsent",
    "LoraserveModelNotReady",
    "LoraserveHighErrorRatio",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    """Path of promtool; skip outside CI when it is missing, fail in CI."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("promtool is missing in CI: install Debian's 'prometheus' package (scripts/setup.sh does)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return path


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=RULES_DIR, capture_output=True, text=True, timeout=60, check=False)


def test_promtool_check_rules(promtool):
    result = _run([promtool, "check", "rules", *RULE_FILES])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_pass(promtool):
    tests = sorted(p.name for p in RULES_DIR.glob("*test*.yml"))
    assert tests, "no promtool unit test files next to the rules"
    result = _run([promtool, "test", "rules", *tests])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_can_fail(promtool, tmp_path):
    """A wrong expectation in the same test file fails: the unit tests really compare values."""
    for name in RULE_FILES:
        shutil.copy(RULES_DIR / name, tmp_path / name)
    text = (RULES_DIR / "rules-test.yml").read_text()
    assert "value: 0.299" in text
    (tmp_path / "broken-test.yml").write_text(text.replace("value: 0.299", "value: 0.35", 1))
    result = subprocess.run(
        [promtool, "test", "rules", "broken-test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "p99_rate2m" in result.stdout + result.stderr


def test_every_rule_is_unit_tested_and_every_operating_rule_alerts():
    rules = [
        r for name in RULE_FILES for g in yaml.safe_load((RULES_DIR / name).read_text())["groups"] for r in g["rules"]
    ]
    alerts = {r["alert"] for r in rules if "alert" in r}
    records = {r["record"] for r in rules if "record" in r}
    assert OPERATING_ALERTS | SCALING_ALERTS <= alerts  # others may be added; each must be unit-tested (below)
    tests = yaml.safe_load((RULES_DIR / "rules-test.yml").read_text())["tests"]
    tested_alerts = {a["alertname"] for t in tests for a in t.get("alert_rule_test", [])}
    tested_exprs = " ".join(e["expr"] for t in tests for e in t.get("promql_expr_test", []))
    assert tested_alerts == alerts
    # namespace_pod:gateway_requests:rate5m is exercised through LoraserveGpuUnderutilized's traffic guard.
    untested = {r for r in records if r not in tested_exprs} - {"namespace_pod:gateway_requests:rate5m"}
    assert not untested, f"recording rules without a promtool test: {untested}"
    for r in rules:  # colons only in recording-rule names, never in what the gateway exports
        if "alert" in r:
            assert r["labels"]["severity"] in {"info", "warning", "critical"}
            assert r["annotations"]["summary"] and r["annotations"]["description"]
