"""The locust load shapes are pure functions of the clock: check the burst shape's three bursts.

Run in a subprocess: locust must be imported before requests in a process (gevent monkey-patching), and pytest's
process has imported requests long before.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

CODE = """
from loadtest.shapes import SHAPES, target
run, peak = 100.0, 20
users = [target("burst", t + 0.5, run, peak)[0] for t in range(100)]
at_peak = [t for t, u in enumerate(users) if u == peak]
bursts = sum(1 for i, t in enumerate(at_peak) if i == 0 or t != at_peak[i - 1] + 1)
assert bursts == 3 and min(users) == 4, users
assert target("burst", run, run, peak) is None
assert all(s.until <= 1.0 for s in SHAPES["burst"])
print("ok")
"""


def test_burst_shape_jumps_to_the_peak_three_times_and_falls_back():
    result = subprocess.run(
        [sys.executable, "-c", CODE], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
