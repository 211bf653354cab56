#!/usr/bin/env bash
# GPU check of the generator's engine (issue 17 item 7): KV-cache decode speed at batch 1-64, FP16 vs FP32.
# Needs only python3 with torch (CUDA build) and this repository; no network, no model files (random weights of
# SmolLM2-135M's exact architecture; see generator_check.py). Bounded at 5 minutes. Extra arguments pass through,
# e.g. --dry-run (CPU, seconds) or --out results.json. Writes $OUT/generator_check.json when $OUT is set.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
exec timeout 300 "$PYTHON" bench/gpu/generator_check.py "$@"
