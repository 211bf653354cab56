"""Helpers for the gateway's integration tests: the real app factory on a real Triton, in-process or as a process."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from service.gateway.app import create_app
from service.gateway.backend.base import InferOutput
from service.gateway.backend.triton import TritonBackend
from service.gateway.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_LINE = re.compile(r"gateway ready at (http://127\.0\.0\.1:\d+)")


def gateway_settings(model_repository: Path, grpc_url: str, **kw) -> Settings:
    """Settings for a gateway in front of ``grpc_url`` serving ``model_repository``."""
    batch = kw.pop("batch", {})
    triton = {
        "model_repository": model_repository,
        "grpc_url": grpc_url,
        "startup_timeout_seconds": 30.0,
        **kw.pop("triton", {}),
    }
    return Settings(triton=triton, batch=batch, **kw)


@dataclass
class RecordedBatch:
    model: str
    rows: int
    seq_len: int


class RecordingTritonBackend(TritonBackend):
    """The real Triton backend, also recording the shape of every batch it sends (for assertions)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings.triton)
        self.batches: list[RecordedBatch] = []

    async def infer(self, model: str, version: int, input_ids: np.ndarray, attention_mask: np.ndarray) -> InferOutput:
        self.batches.append(RecordedBatch(model, int(input_ids.shape[0]), int(input_ids.shape[1])))
        return await super().infer(model, version, input_ids, attention_mask)


@asynccontextmanager
async def gateway_client(settings: Settings, backend: TritonBackend | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and yield an httpx client bound to it (``client.app`` is the app)."""
    app = create_app(settings, backend)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=60.0) as client,
    ):
        client.app = app  # type: ignore[attr-defined]
        yield client


def closed_port() -> int:
    """A 127.0.0.1 port that nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GatewayProcess:
    """``python -m service.gateway`` as a child process, with its output in a file.

    Args:
        args: Extra command-line arguments.
        env: Extra environment variables.
        log_path: Where stdout and stderr go.
    """

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        full_env = {**os.environ, "GATEWAY_PORT": "0", "GATEWAY_GRPC_PORT": "0", **env}
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.gateway", *args],
            cwd=REPO_ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.url: str | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_seconds: float) -> str:
        """Wait (bounded) for the ready line and return the gateway's URL."""
        give_up = time.monotonic() + timeout_seconds
        while time.monotonic() < give_up:
            match = READY_LINE.search(self.log())
            if match:
                self.url = match.group(1)
                return self.url
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"gateway not ready in {timeout_seconds} s:\n{self.log()[-4000:]}")

    def terminate(self, timeout_seconds: float) -> int:
        """Send SIGTERM and wait (bounded) for the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_seconds)

    def stop(self) -> None:
        """Make sure the process is gone (kill after a bounded wait) and close the log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


#: Short TREC-like questions the process-level tests send.
QUESTIONS = ["Who wrote Hamlet ?", "Where is Rome ?", "What is a meteor ?", "How far is the moon ?"]


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``, in a Prometheus text exposition."""
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def external_gateway(triton_server, model_repository, tmp_path, **env: str) -> GatewayProcess:
    """A gateway process (int8 only, no gRPC, no drain grace) on an already running Triton."""
    base = {
        "GATEWAY_TRITON__GRPC_URL": triton_server.grpc_url,
        "GATEWAY_TRITON__MODEL_REPOSITORY": str(model_repository),
        "GATEWAY_GRPC_PORT": "-1",
        "GATEWAY_VARIANTS": "int8",
        "GATEWAY_DRAIN_GRACE_SECONDS": "0",
        "GATEWAY_LOG_LEVEL": "warning",
    }
    return GatewayProcess([], {**base, **env}, tmp_path / "gateway.log")
