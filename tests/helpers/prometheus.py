"""A real Prometheus for the tests: started by hand on 127.0.0.1 with a scratch config, stopped by PID.

Prometheus comes from Debian's ``prometheus`` package. Missing outside CI: skipped; missing in CI: failure.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.helpers.gateway_process import REPO_ROOT, closed_port

RULES_DIR = REPO_ROOT / "deploy" / "prometheus"
# Static target labels standing in for what the Prometheus Operator adds in a cluster (namespace, pod, service),
# so the recording rules and the adapter's label matchers see the shapes they will see there.
TARGET_LABELS = {"namespace": "loraserve-test", "pod": "loraserve-0", "service": "loraserve"}
SCRAPE_INTERVAL = "1s"
#: Short TREC-like questions the Prometheus tests send.
QUESTIONS = [
    "What is the capital of France?",
    "Who wrote Hamlet?",
    "How many legs does a spider have?",
    "When did the Berlin wall fall?",
    "What does NASA stand for?",
    "Where is Mount Kilimanjaro?",
    "Why is the sky blue during the day but red at sunset?",
    "Name a famous Dutch painter.",
    "How far is the moon from the earth?",
    "Why do cats purr?",
]


def prometheus_binary() -> str:
    """Debian's prometheus binary; skipped where missing, a failure in CI."""
    path = shutil.which("prometheus")
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("prometheus is missing in CI: install Debian's 'prometheus' package (scripts/setup.sh does)")
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    return path


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


class PrometheusProcess:
    """A Prometheus server on a free 127.0.0.1 port with a scratch config and storage under ``workdir``."""

    def __init__(
        self,
        binary: str,
        workdir: Path,
        scrape_targets: dict[str, str],
        *,
        rule_files: list[str] | None = None,
        target_labels: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.port = closed_port()
        self.url = f"http://127.0.0.1:{self.port}"
        rules = rule_files or [str(RULES_DIR / "recording-rules.yml"), str(RULES_DIR / "alert-rules.yml")]
        labels = target_labels or {}
        config = {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
            "rule_files": rules,
            "scrape_configs": [
                {
                    "job_name": job,
                    "metrics_path": "/metrics",
                    "static_configs": [{"targets": [target], "labels": labels.get(job, TARGET_LABELS)}],
                }
                for job, target in scrape_targets.items()
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout_seconds: float) -> None:
        give_up = time.monotonic() + timeout_seconds
        while time.monotonic() < give_up:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.25)
        raise AssertionError(f"prometheus not ready in {timeout_seconds} s:\n{self.log()}")

    def query(self, expr: str) -> list[dict]:
        data = get_json(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert data["status"] == "success", data
        return data["data"]["result"]

    def wait_for(self, expr: str, timeout_seconds: float) -> list[dict]:
        """Poll (bounded) until ``expr`` returns at least one finite sample, and return the result."""
        give_up = time.monotonic() + timeout_seconds
        result: list[dict] = []
        while time.monotonic() < give_up:
            result = [r for r in self.query(expr) if math.isfinite(float(r["value"][1]))]
            if result:
                return result
            time.sleep(0.5)
        raise AssertionError(f"no finite sample for {expr!r} within {timeout_seconds} s (last {result})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
