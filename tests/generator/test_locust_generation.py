"""loadtest/generation.py runs headless against a real gateway + Triton and passes or fails on its TTFT threshold."""

from __future__ import annotations

import csv
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from service.gateway.app import create_app
from service.gateway.backend.fake import FakeBackend
from tests.generator.conftest import free_port, make_settings
from tests.helpers.gateway import LABELS

pytestmark = pytest.mark.integration

LOCUSTFILE = Path(__file__).resolve().parents[2] / "loadtest" / "generation.py"


@pytest.fixture
def gateway_url(combined_repository, generator_triton, monkeypatch):
    import uvicorn

    monkeypatch.setenv("GATEWAY_GENERATE__ENABLED", "1")
    app = create_app(make_settings(combined_repository, generator_triton), FakeBackend(len(LABELS)))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.02)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


def run_locust(url: str, tmp_path: Path, *extra: str) -> tuple[int, dict[str, dict[str, str]], str]:
    prefix = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "-u",
        "3",
        "-r",
        "3",
        "-t",
        "5s",
        "--host",
        url,
        "--max-new-tokens",
        "8",
        "--csv",
        str(prefix),
        "--only-summary",
        "--stop-timeout",
        "10",
        *extra,
    ]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    with open(f"{prefix}_stats.csv", newline="") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    return done.returncode, rows, done.stderr


def test_generation_users_stream_and_pass_a_loose_threshold(gateway_url, tmp_path):
    code, rows, log = run_locust(gateway_url, tmp_path, "--max-ttft-p99-ms", "60000")
    assert code == 0, log[-3000:]
    assert int(rows["time to first token"]["Request Count"]) >= 1
    assert int(rows["generate stream"]["Request Count"]) >= 1
    assert int(rows["generate stream"]["Failure Count"]) == 0


def test_an_impossible_ttft_threshold_fails_the_run(gateway_url, tmp_path):
    code, _rows, log = run_locust(gateway_url, tmp_path, "--max-ttft-p99-ms", "0.001")
    assert code == 1
    assert "P99 time to first token" in log
