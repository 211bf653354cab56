"""The Dockerfiles, checked where they can be without a container engine (none runs on our machines):

* the gateway image's pip line is resolved for real (``pip install --dry-run``) from this checkout, and the resolved
  set holds the gateway's dependencies and none of torch, peft or transformers;
* base images are pinned, the runtime user is not root, the health check hits the gateway's liveness endpoint;
* the Triton image is NVIDIA's, pinned to the Triton release we test against, and carries the built repository;
* .dockerignore keeps local state out but lets the sources and the model repository in.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN_IN_GATEWAY = {"torch", "peft", "transformers", "nvidia-pytriton", "onnx"}
REQUIRED_IN_GATEWAY = {"fastapi", "uvicorn", "tokenizers", "tritonclient", "prometheus-client", "pydantic-settings"}


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _args(instr: list[tuple[str, str]]) -> dict[str, str]:
    return {k: v for op, rest in instr if op == "ARG" and "=" in rest for k, v in [rest.split("=", 1)]}


def _final_stage(instr: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last = max(i for i, (op, _) in enumerate(instr) if op == "FROM")
    return instr[last:]


def gateway_pip_requirement() -> str:
    """The requirement the gateway Dockerfile installs (e.g. ``.[serve]``)."""
    runs = [rest for op, rest in _instructions(REPO_ROOT / "Dockerfile") if op == "RUN" and "pip install" in rest]
    assert len(runs) == 1, runs
    words = shlex.split(runs[0])
    reqs = [w for w in words[words.index("install") + 1 :] if not w.startswith("-")]
    assert len(reqs) == 1, reqs
    return reqs[0]


def test_gateway_dockerfile_is_pinned_multistage_nonroot_with_healthcheck():
    instr = _instructions(REPO_ROOT / "Dockerfile")
    base = _args(instr)["PYTHON_IMAGE"]
    # An exact patch version (or a digest), slim Debian: never a floating "3.11" or "latest".
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    froms = [rest for op, rest in instr if op == "FROM"]
    assert len(froms) >= 2 and all(f.startswith("${PYTHON_IMAGE}") for f in froms)
    final = _final_stage(instr)
    user = [rest for op, rest in final if op == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    health = " ".join(rest for op, rest in final if op == "HEALTHCHECK")
    assert "http://127.0.0.1:8080/healthz" in health
    env = " ".join(rest for op, rest in final if op == "ENV")
    assert "GATEWAY_PORT=8080" in env and "GATEWAY_HOST=0.0.0.0" in env
    assert [rest for op, rest in final if op == "CMD"] == ['["python", "-m", "service.gateway"]']
    # The runtime stage gets only the finished venv, not the build tools or the sources' tests.
    assert any(op == "COPY" and rest.startswith("--from=build /opt/venv") for op, rest in final)
    assert gateway_pip_requirement() == ".[serve]"


def test_the_gateway_install_line_resolves_without_torch(tmp_path):
    """Run the Dockerfile's install step as pip would in the image, but resolve only (no container engine here)."""
    requirement = gateway_pip_requirement().replace(".", str(REPO_ROOT), 1)
    report = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--disable-pip-version-check",
            "--report",
            str(report),
            requirement,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0 and "No matching distribution" in result.stderr + result.stdout:
        pytest.fail(f"the gateway requirements do not resolve:\n{result.stderr[-3000:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    names = {item["metadata"]["name"].lower().replace("_", "-") for item in json.loads(report.read_text())["install"]}
    assert "loraserve" in names
    assert REQUIRED_IN_GATEWAY <= names, REQUIRED_IN_GATEWAY - names
    assert not FORBIDDEN_IN_GATEWAY & names, FORBIDDEN_IN_GATEWAY & names


def test_triton_dockerfile_uses_the_tested_triton_release_and_ships_the_repository():
    instr = _instructions(REPO_ROOT / "Dockerfile.triton")
    image = _args(instr)["TRITON_IMAGE"]
    # 24.10 carries tritonserver 2.51, the version of the nvidia-pytriton wheel the integration tests run.
    assert image == "nvcr.io/nvidia/tritonserver:24.10-py3"
    runs = " ".join(rest for op, rest in instr if op == "RUN")
    assert re.search(r'"onnxruntime-gpu==\d+\.\d+\.\d+"', runs) and '"numpy>=1.24,<2"' in runs
    copies = [rest for op, rest in instr if op == "COPY"]
    assert any("model_repository/ /opt/loraserve/model_repository/" in c for c in copies)
    user = [rest for op, rest in instr if op == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert "/v2/health/ready" in " ".join(rest for op, rest in instr if op == "HEALTHCHECK")
    # The chart's init container copies exactly this path.
    values = (REPO_ROOT / "helm/loraserve/values.yaml").read_text()
    assert "imagePath: /opt/loraserve/model_repository" in values


def test_dockerignore_keeps_local_state_out_and_sources_in():
    patterns = {
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "artifacts", ".tools"} <= patterns
    for needed in ("service", "pyproject.toml", "README.md", "model_repository"):
        assert needed not in patterns and (REPO_ROOT / needed).exists()
