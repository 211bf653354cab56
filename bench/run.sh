#!/usr/bin/env bash
# The whole peer comparison in one command, from a fresh checkout:
#   set up the venv (scripts/setup.sh), add the peers' extra (Ray Serve), build a speed-equivalent model when no
#   model repository is built, run bench/compare.py, and render docs/benchmarks.md from its JSON.
# Arguments go to compare.py, e.g.  bash bench/run.sh --smoke   or   bash bench/run.sh --repeats 5
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! .venv/bin/python -c "import ray.serve" >/dev/null 2>&1; then
  echo "bench: installing the bench extra (Ray Serve)"
  .venv/bin/pip install -q --disable-pip-version-check -e ".[bench]"
fi
.venv/bin/python bench/compare.py "$@"
.venv/bin/python bench/render_docs.py
