"""The Dockerfiles, checked statically:

* the gateway image's pip line is resolved for real (``pip install --dry-run``) from this checkout, and the resolved
  set holds the gateway's dependencies and none of torch, peft or transformers;
* the runtime user is not root, the health check hits the gateway's liveness endpoint, dependencies are locked;
* the Triton images (CPU: nvidia-pytriton's server on Debian; GPU: NVIDIA's 24.10) carry no model;
* tests/integration/test_containers.py builds and runs the CPU images for real where podman runs;
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
    """The requirement the gateway Dockerfile installs (e.g. ``.[serve]``), option values skipped."""
    runs = [
        rest
        for op, rest in _instructions(REPO_ROOT / "Dockerfile")
        if op == "RUN" and "pip install" in rest and "--upgrade" not in rest
    ]
    assert len(runs) == 1, runs
    words = shlex.split(runs[0])
    args = words[words.index("install") + 1 :]
    reqs = [w for i, w in enumerate(args) if not w.startswith("-") and (i == 0 or args[i - 1] != "--constraint")]
    assert len(reqs) == 1, reqs
    return reqs[0]


BASE = "docker.io/library/debian:bookworm-slim"


def test_gateway_dockerfile_is_multistage_nonroot_with_healthcheck_and_locked_dependencies():
    instr = _instructions(REPO_ROOT / "Dockerfile")
    # Debian's own Python 3.11, the base every image of the project shares (the release workflow pins it by digest).
    assert _args(instr)["BASE"] == BASE
    froms = [rest for op, rest in instr if op == "FROM"]
    assert froms[0].startswith("${BASE}") and len(froms) >= 3
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
    # The proxy CA is a build argument naming a mounted file, never a file copied into the image.
    assert not any(op in ("COPY", "ADD") and ".crt" in rest for op, rest in instr)
    # Every resolved dependency is pinned, and the lock holds none of the forbidden packages.
    lock = (REPO_ROOT / "containers" / "constraints-gateway.txt").read_text().splitlines()
    pins = [line for line in lock if line and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[^=\s]+", p) for p in pins), pins
    names = {p.split("==")[0].lower().replace("_", "-") for p in pins}
    assert REQUIRED_IN_GATEWAY <= names and not FORBIDDEN_IN_GATEWAY & names


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
    # Every distribution the install resolves is pinned by the image's lock (containers/lock.py regenerates it).
    lock = (REPO_ROOT / "containers" / "constraints-gateway.txt").read_text().splitlines()
    pinned = {line.split("==")[0].lower().replace("_", "-") for line in lock if "==" in line}
    assert names - {"loraserve"} <= pinned, f"unpinned in the image lock: {sorted(names - {'loraserve'} - pinned)}"


def test_triton_images_carry_no_model_and_run_as_non_root():
    gpu = _instructions(REPO_ROOT / "Dockerfile.triton")
    # 24.10 carries tritonserver 2.51, the version of the nvidia-pytriton wheel the CPU image and the tests run.
    assert _args(gpu)["TRITON_IMAGE"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    cpu = _instructions(REPO_ROOT / "Dockerfile.triton-cpu")
    assert _args(cpu)["BASE"] == BASE and _args(cpu)["PYTRITON_VERSION"] == "0.7.0"
    cpu_runs = " ".join(rest for op, rest in cpu if op == "RUN")
    assert "libpython3.11" in cpu_runs and '"onnxruntime==' in cpu_runs and "python_backend_stubs/3.11" in cpu_runs
    assert "NVIDIA_VISIBLE_DEVICES=void" in " ".join(rest for op, rest in cpu if op == "ENV")
    for instr in (gpu, cpu):
        copies = " ".join(rest for op, rest in instr if op == "COPY")
        assert "model_repository" not in copies  # models are delivered by the chart, never baked in
        user = [rest for op, rest in instr if op == "USER"]
        assert user and user[-1].split(":")[0] not in ("0", "root")
        assert "/v2/health/ready" in " ".join(rest for op, rest in instr if op == "HEALTHCHECK")
    model = _instructions(REPO_ROOT / "Dockerfile.model")
    assert any(op == "COPY" and rest.endswith("/model/models.tar.gz") for op, rest in model)
    # The chart's model-image init container copies exactly this path.
    deployment = (REPO_ROOT / "helm/loraserve/templates/deployment.yaml").read_text()
    assert '"/model/models.tar.gz"' in deployment


def test_dockerignore_keeps_local_state_out_and_sources_in():
    patterns = {
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".tools", ".cache", "model_repository"} <= patterns
    for needed in ("service", "pyproject.toml", "README.md", "containers"):
        assert needed not in patterns and (REPO_ROOT / needed).exists()
