"""Launcher pieces that need no running server: installation lookup, command line, environment, CLI help.

Starting, stopping and failing to start a real tritonserver are covered in tests/integration/test_triton.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.triton import launcher
from service.triton.launcher import TritonLaunchConfig, TritonServer, TritonStartError

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_installation_has_binary_and_python_stub(monkeypatch):
    monkeypatch.delenv(launcher.ENV_TRITONSERVER, raising=False)
    installation = launcher.find_installation()
    assert installation.binary.name == "tritonserver" and os.access(installation.binary, os.X_OK)
    stub = installation.backend_directory / "python" / "triton_python_backend_stub"
    assert stub.is_file()
    assert (installation.backend_directory / "python" / "libtriton_python.so").is_file()
    assert installation.library_path is not None and installation.library_path.is_dir()
    # Cached: a second lookup reuses the same directory.
    assert launcher.find_installation().backend_directory == installation.backend_directory


def test_override_must_be_an_executable(monkeypatch, tmp_path):
    monkeypatch.setenv(launcher.ENV_TRITONSERVER, str(tmp_path / "missing"))
    with pytest.raises(TritonStartError, match="LORASERVE_TRITONSERVER"):
        launcher.find_installation()


def test_override_uses_the_binary_as_installed(monkeypatch, tmp_path):
    binary = tmp_path / "tritonserver"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv(launcher.ENV_TRITONSERVER, str(binary))
    installation = launcher.find_installation()
    assert installation.binary == binary
    # NVIDIA's container brings its own backends and libraries: we add neither.
    assert installation.backend_directory is None and installation.library_path is None


def test_free_ports_are_distinct_loopback_ports():
    ports = launcher._free_ports(3)
    assert len(set(ports)) == 3 and all(1024 <= p < 65536 for p in ports)


def test_command_binds_loopback_and_loads_explicit_models(monkeypatch, tmp_path):
    monkeypatch.delenv(launcher.ENV_TRITONSERVER, raising=False)
    server = TritonServer(TritonLaunchConfig(tmp_path, models=("classifier_int8",), extra_args=("--log-verbose=1",)))
    command = server._command(launcher.find_installation(), (1111, 2222, 3333))
    for flag in ("--http-address", "--grpc-address", "--metrics-address"):
        assert f"{flag}=127.0.0.1" in command
    assert {"--http-port=1111", "--grpc-port=2222", "--metrics-port=3333"} <= set(command)
    assert "--model-control-mode=explicit" in command and "--load-model=classifier_int8" in command
    assert command[-1] == "--log-verbose=1", "extra args come last so they win"


def test_command_without_models_loads_everything(tmp_path):
    command = TritonServer(TritonLaunchConfig(tmp_path))._command(launcher.find_installation(), (1, 2, 3))
    assert not any(a.startswith(("--model-control-mode", "--load-model")) for a in command)


def test_environment_puts_our_interpreter_first():
    installation = launcher.find_installation()
    env = TritonServer(TritonLaunchConfig(Path(".")))._environment(installation)
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.prefix) / "bin")
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == str(installation.library_path)


def test_addresses_before_start():
    fixed = TritonServer(TritonLaunchConfig(Path("."), http_port=8000, grpc_port=8001, metrics_port=8002))
    assert fixed.http_url == "http://127.0.0.1:8000"
    assert fixed.grpc_url == "127.0.0.1:8001"
    assert fixed.metrics_url == "http://127.0.0.1:8002/metrics"
    with pytest.raises(RuntimeError, match="start the server first"):
        _ = TritonServer(TritonLaunchConfig(Path("."))).http_url


def test_stop_before_start_is_harmless():
    server = TritonServer(TritonLaunchConfig(Path(".")))
    server.stop()
    assert not server.is_alive() and server.pid is None and server.log_tail() == ""


def test_cli_help_documents_every_option():
    result = subprocess.run(
        [sys.executable, "-m", "service.triton", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for option in (
        "--model-repository",
        "--models",
        "--http-port",
        "--grpc-port",
        "--metrics-port",
        "--log-path",
        "--startup-timeout-seconds",
        "--no-validate",
        "TRITON_ARGS",
    ):
        assert option in result.stdout


def test_cli_rejects_a_broken_config_before_starting(tmp_path):
    model_dir = tmp_path / "classifier_int8"
    model_dir.mkdir()
    text = (REPO_ROOT / "model_repository" / "classifier_int8" / "config.pbtxt").read_text()
    (model_dir / "config.pbtxt").write_text(text.replace("max_queue_size: 128", "max_queue_size: 0"))
    result = subprocess.run(
        [sys.executable, "-m", "service.triton", "--model-repository", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "max_queue_size must be >= 1" in result.stderr
