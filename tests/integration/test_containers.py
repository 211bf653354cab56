"""The CPU images, built from a fresh clone and run for real (podman), delivered and configured the way the chart does.

1. ``git clone`` of HEAD (no trained model in it), then ``podman build`` of the gateway image (Dockerfile) and the
   CPU Triton image (Dockerfile.triton-cpu) on a Debian base imported from ``debootstrap`` (no registry is
   reachable here; containers/podman-env.sh).
2. The session's tiny real model is packaged (``service.modelprep.package``) into an OCI model image
   (Dockerfile.model); the chart's init containers run as rendered by ``helm template``: model-image copies the
   archive, model-setup (gateway image) verifies and installs it with the chart's CPU configs.
3. Triton and the gateway run with the chart's args/env and security context (uid 1000, read-only root filesystem,
   every capability dropped, no privilege escalation) on 127.0.0.1, and classify over REST and gRPC exactly as the
   embedded default (the in-process gateway over the wheel's tritonserver) does.

Skips, with the reason, only where no container runtime can run (no podman, or podman cannot start a container).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml

from service.modelprep.package import package_repository
from service.triton.model_config import render_target_files
from tests.helpers.gateway_process import gateway_client, gateway_settings

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["Who wrote Hamlet ?", "Where is Rome ?", "How many feet are in a mile ?"]
VARIANT = "int8"
BUILD_TIMEOUT_SECONDS = 900
READY_TIMEOUT_SECONDS = 120
STORE_LIMIT_BYTES = 8 << 30
#: Same model, same padded batch, same ONNX Runtime build: only float formatting may differ.
ATOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Podman:
    """podman with the project's containers.conf / storage (containers/podman-env.sh), on the host network."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.started: list[str] = []

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args[:3])}... failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
            )
        return result

    def build(self, context: Path, dockerfile: str, tag: str, *build_args: str) -> float:
        """Build an image; return the seconds it took. The host CA bundle is mounted for the build only."""
        ca = Path(os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"))
        proxy_ca = (
            ["-v", f"{ca}:/run/build-ca.crt:ro", "--build-arg", "PIP_CERT=/run/build-ca.crt"] if ca.is_file() else []
        )
        extra = [a for arg in build_args for a in ("--build-arg", arg)]
        start = time.monotonic()
        self.run(
            "build",
            "--format",
            "docker",
            "--network",
            "host",
            *proxy_ca,
            *extra,
            "-f",
            dockerfile,
            "-t",
            tag,
            str(context),
            timeout=BUILD_TIMEOUT_SECONDS,
        )
        return time.monotonic() - start

    def size_mb(self, tag: str) -> float:
        return int(self.run("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip()) / 1e6

    def start(self, name: str, image: str, args: list[str], *, env: dict[str, str], mounts: list[str]) -> None:
        """Start a detached container with the chart's security context."""
        self.started.append(name)
        self.run(
            "run",
            "-d",
            "--name",
            name,
            *CHART_SECURITY,
            *[f for m in mounts for f in ("-v", m)],
            *[f for k, v in env.items() for f in ("-e", f"{k}={v}")],
            image,
            *args,
        )

    def once(self, name: str, image: str, args: list[str], *, mounts: list[str]) -> None:
        """Run a container to completion (an init container); fail with its output if it fails."""
        self.run(
            "run",
            "--rm",
            "--name",
            name,
            *CHART_SECURITY,
            *[f for m in mounts for f in ("-v", m)],
            image,
            *args,
            timeout=300,
        )

    def logs(self, name: str) -> str:
        result = self.run("logs", name, check=False)
        return (result.stdout + result.stderr)[-4000:]

    def remove_started(self) -> None:
        for name in reversed(self.started):
            self.run("rm", "-f", "-t", "10", name, check=False, timeout=60)


#: podman's spelling of the chart's pod/container security context (values.yaml podSecurityContext/securityContext);
#: the host network stands in for the pod's shared network namespace (Triton's loopback ports reach the gateway).
#: Kubernetes ignores an image's HEALTHCHECK (the chart's probes replace it), and so does this test.
CHART_SECURITY = [
    "--network",
    "host",
    "--user",
    "1000:1000",
    "--read-only",
    "--tmpfs",
    "/tmp:rw,size=256m",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
    "--shm-size",
    "256m",
    "--no-healthcheck",
]


@pytest.fixture(scope="module")
def podman() -> Podman:
    """podman configured by containers/podman-env.sh, with the Debian base image present; skip if none can run."""
    if shutil.which("podman") is None:
        pytest.skip("no container runtime: podman is not installed (scripts/setup.sh installs it as root with apt)")
    if os.geteuid() != 0:
        # The pod's volumes are host directories handed to uid 1000 (what fsGroup does in Kubernetes): root podman.
        pytest.skip("the container test runs podman as root (rootless podman would need subuid maps for uid 1000)")
    script = "source containers/podman-env.sh && loraserve_base_image >&2 && env -0"
    result = subprocess.run(["bash", "-c", script], cwd=REPO_ROOT, capture_output=True, timeout=600, check=False)
    if result.returncode != 0:
        pytest.skip(f"no container runtime can run here: base image set-up failed: {result.stderr.decode()[-1500:]}")
    env = dict(item.split("=", 1) for item in result.stdout.decode().split("\0") if "=" in item)
    tool = Podman(env)
    probe = tool.run("run", "--rm", "--network", "host", env["LORASERVE_BASE_IMAGE"], "true", check=False)
    if probe.returncode != 0:
        pytest.skip(f"no container runtime can run here: podman run failed: {probe.stderr[-1500:]}")
    return tool


@pytest.fixture(scope="module")
def chart(tmp_path_factory) -> dict[str, dict]:
    """The chart's default (CPU) render: containers and init containers by name."""
    subprocess.run(["bash", "scripts/get-helm.sh"], cwd=REPO_ROOT, check=True, capture_output=True, timeout=300)
    out = subprocess.run(
        [
            str(REPO_ROOT / ".tools/bin/helm"),
            "template",
            "loraserve",
            str(REPO_ROOT / "helm/loraserve"),
            "--set",
            f"gateway.config.variants={{{VARIANT}}},gateway.config.defaultVariant={VARIANT}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    deployment = next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec["initContainers"] + spec["containers"]}


@pytest.fixture(scope="module")
def images(podman, tmp_path_factory) -> dict[str, dict]:
    """Both CPU images built from a fresh clone of HEAD; their build seconds and sizes."""
    clone = tmp_path_factory.mktemp("clone") / "loraserve"
    subprocess.run(
        ["git", "clone", "-q", "--depth", "1", f"file://{REPO_ROOT}", str(clone)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert not list(clone.glob("model_repository/*/[0-9]*")), "a fresh clone carries no trained model"
    figures = {}
    for key, dockerfile, tag in (
        ("gateway", "Dockerfile", "localhost/loraserve/gateway:test"),
        ("triton-cpu", "Dockerfile.triton-cpu", "localhost/loraserve/triton-cpu:test"),
    ):
        seconds = podman.build(clone, dockerfile, tag)
        figures[key] = {"tag": tag, "build_seconds": round(seconds, 1), "size_mb": round(podman.size_mb(tag), 1)}
    # Keep the private store bounded across runs: past STORE_LIMIT_BYTES drop untagged images (earlier builds and
    # the layer cache); below it keep them, so an unchanged rebuild is a cache hit.
    store = Path(podman.env["LORASERVE_CONTAINERS_DIR"]) / "storage"
    used = subprocess.run(["du", "-sb", str(store)], capture_output=True, text=True, timeout=120, check=False)
    if used.returncode == 0 and int(used.stdout.split()[0]) > STORE_LIMIT_BYTES:
        podman.run("image", "prune", "-f", timeout=300, check=False)
    (Path(podman.env["LORASERVE_CONTAINERS_DIR"]) / "figures.json").write_text(json.dumps(figures, indent=2))
    print(f"\ncontainer images: {json.dumps(figures)}")
    return figures


@pytest.fixture(scope="module")
def pod(podman, images, chart, model_repository, tmp_path_factory):
    """The chart's pod, container by container: model-image, model-setup, triton, gateway. Yields the URLs."""
    work = tmp_path_factory.mktemp("pod")
    archive = package_repository(model_repository, work / "package", version="test")
    context = work / "model-image"
    context.mkdir()
    shutil.copy(archive, context / "models.tar.gz")
    podman.build(
        context, str(REPO_ROOT / "Dockerfile.model"), "localhost/loraserve/models:test", "ARCHIVE=models.tar.gz"
    )
    # Volumes of the pod (emptyDirs), owned by the pod's uid as fsGroup makes them in Kubernetes.
    volumes = {name: work / name for name in ("staging", "models", "triton-configs")}
    for path in volumes.values():
        path.mkdir(exist_ok=True)
    render_target_files("cpu", volumes["triton-configs"], [VARIANT])  # the chart's ConfigMap content
    for path in volumes.values():
        os.chown(path, 1000, 1000)
    tag = str(time.monotonic_ns())
    try:
        image_init = chart["model-image"]
        podman.once(
            f"loraserve-model-image-{tag}",
            "localhost/loraserve/models:test",
            image_init["command"],
            mounts=[f"{volumes['staging']}:/staging"],
        )
        setup = chart["model-setup"]
        assert "--source=/staging/models.tar.gz" in setup["args"]
        podman.once(
            f"loraserve-model-setup-{tag}",
            images["gateway"]["tag"],
            setup["args"],
            mounts=[
                f"{volumes['models']}:/models",
                f"{volumes['staging']}:/staging:ro",
                f"{volumes['triton-configs']}:/triton-configs:ro",
            ],
        )
        assert (volumes["models"] / "MANIFEST.json").is_file()

        http_port, grpc_port, metrics_port = _free_port(), _free_port(), _free_port()
        triton = chart["triton"]
        args = [a for a in triton["args"] if not a.startswith(("--http-port=", "--grpc-port=", "--metrics-port="))]
        args += [
            f"--http-port={http_port}",
            f"--grpc-port={grpc_port}",
            f"--metrics-port={metrics_port}",
            "--metrics-address=127.0.0.1",
        ]
        triton_name = f"loraserve-triton-{tag}"
        podman.start(
            triton_name,
            images["triton-cpu"]["tag"],
            args,
            env={e["name"]: e["value"] for e in triton.get("env", [])},
            mounts=[f"{volumes['models']}:/models:ro"],
        )
        probe = [a.replace(":8000/", f":{http_port}/") for a in triton["readinessProbe"]["exec"]["command"]]
        _wait(
            lambda: podman.run("exec", triton_name, *probe, check=False).returncode == 0,
            lambda: podman.logs(triton_name),
        )

        gateway = chart["gateway"]
        env = {e["name"]: e["value"] for e in gateway["env"] if "value" in e}
        gw_port, gw_grpc = _free_port(), _free_port()
        env.update(
            {
                "GATEWAY_HOST": "127.0.0.1",
                "GATEWAY_PORT": str(gw_port),
                "GATEWAY_GRPC_PORT": str(gw_grpc),
                "GATEWAY_TRITON__GRPC_URL": f"127.0.0.1:{grpc_port}",
                "GATEWAY_DRAIN_GRACE_SECONDS": "0",
            }
        )
        gateway_name = f"loraserve-gateway-{tag}"
        podman.start(
            gateway_name, images["gateway"]["tag"], gateway["args"], env=env, mounts=[f"{volumes['models']}:/models:ro"]
        )
        url = f"http://127.0.0.1:{gw_port}"
        _wait(lambda: _ok(f"{url}/readyz"), lambda: podman.logs(gateway_name))
        yield {"http": url, "grpc": f"127.0.0.1:{gw_grpc}", "triton": triton_name, "gateway": gateway_name}
    finally:
        podman.remove_started()


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(ready, logs) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(1)
    raise AssertionError(f"not ready within {READY_TIMEOUT_SECONDS} s:\n{logs()}")


def _probabilities(body: dict, labels: list[str]) -> np.ndarray:
    return np.array([[r["probabilities"][lbl] for lbl in labels] for r in body["results"]])


async def test_containers_classify_like_the_embedded_default(pod, triton_server, model_repository):
    async with httpx.AsyncClient(base_url=pod["http"], timeout=60) as container:
        body = (await container.post("/v1/classify", json={"texts": TEXTS, "variant": VARIANT})).json()
        labels = (await container.get("/v1/models")).json()["models"][0]["labels"]
    settings = gateway_settings(model_repository, triton_server.grpc_url, variants=[VARIANT], default_variant=VARIANT)
    async with gateway_client(settings) as client:
        embedded = (await client.post("/v1/classify", json={"texts": TEXTS, "variant": VARIANT})).json()
    assert [r["label"] for r in body["results"]] == [r["label"] for r in embedded["results"]]
    np.testing.assert_allclose(_probabilities(body, labels), _probabilities(embedded, labels), atol=ATOL)

    # The gateway's v2 gRPC API in the container gives the same logits-derived answer.
    client = grpcclient.InferenceServerClient(pod["grpc"])
    try:
        tensor = grpcclient.InferInput("text", [len(TEXTS)], "BYTES")
        tensor.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))
        result = client.infer(f"classifier_{VARIANT}", [tensor], client_timeout=60)
    finally:
        client.close()
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in result.as_numpy("labels").reshape(-1)]
    assert names == [r["label"] for r in embedded["results"]]
    np.testing.assert_allclose(result.as_numpy("probabilities"), _probabilities(embedded, labels), atol=ATOL)


def test_containers_run_locked_down(podman, pod):
    for name in (pod["triton"], pod["gateway"]):
        state = json.loads(podman.run("inspect", name).stdout)[0]
        assert state["Config"]["User"] == "1000:1000"
        assert state["HostConfig"]["ReadonlyRootfs"] is True
        assert not state["EffectiveCaps"], state["EffectiveCaps"]
        whoami = podman.run("exec", name, "id", "-u").stdout.strip()
        assert whoami == "1000"
        assert podman.run("exec", name, "touch", "/opt/x", check=False).returncode != 0  # read-only root
    # Triton's HTTP (model-control) API listens on loopback only: it is not on the host's other addresses.
    env = json.loads(podman.run("inspect", pod["triton"]).stdout)[0]["Config"]["Env"]
    assert "NVIDIA_VISIBLE_DEVICES=void" in env


def test_image_figures_are_recorded(images):
    for figures in images.values():
        assert figures["size_mb"] > 0 and figures["build_seconds"] > 0
