#!/usr/bin/env bash
# GPU check of the classifier (issue 16 item 8): the merged model in FP32/FP16 with plain PyTorch, sequences/s at
# batch 1-256, FP16 vs FP32 agreement and accuracy on the build's test set, and the bundled ONNX files through
# ONNX Runtime's CUDA provider where the installed onnxruntime has it. Needs python3 with torch (CUDA build), and
# onnxruntime-gpu for the ONNX part; no network; brings bench/gpu/bundle (<= 64 MiB, made here beforehand with
# `python bench/gpu/classifier_check.py bundle --workdir artifacts/default`). Bounded at 5 minutes. Extra arguments
# pass through to `classifier_check.py run` (e.g. --device cpu for a dry run, --out results.json); writes
# $OUT/classifier_check.json when $OUT is set.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
exec timeout 300 "$PYTHON" bench/gpu/classifier_check.py run "$@"
