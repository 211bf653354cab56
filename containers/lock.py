"""Regenerate containers/constraints-gateway.txt: the exact versions the gateway image installs.

Resolves ``.[serve]`` of this checkout with ``pip install --dry-run --report`` (nothing is installed) and writes one
``name==version`` per resolved distribution, so image builds are reproducible and pip never backtracks.

    python containers/lock.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "containers" / "constraints-gateway.txt"
HEADER = (
    "# Exact versions of the gateway image's dependencies (.[serve]), so image builds are reproducible and pip never\n"
    "# backtracks. Regenerate: python containers/lock.py (resolves .[serve] with pip --dry-run --report).\n"
)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--dry-run",
                "--ignore-installed",
                "--quiet",
                "--report",
                str(report),
                f"{ROOT}[serve]",
            ],
            check=True,
        )
        resolved = json.loads(report.read_text())["install"]
    pins = sorted(
        (item["metadata"]["name"], item["metadata"]["version"])
        for item in resolved
        if item["metadata"]["name"] != "loraserve"
    )
    LOCK.write_text(
        HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(pins, key=lambda p: p[0].lower()))
    )
    print(f"{LOCK}: {len(pins)} pins")
    return 0


if __name__ == "__main__":
    sys.exit(main())
