#!/usr/bin/env bash
# The main job: set up (idempotent), build the default model if missing (cached, ~10 min the first time on
# 2 CPU cores, seconds afterwards), then start the embedded Triton and the gateway on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m service.modelprep build "$@"
exec .venv/bin/python -m service.gateway --embedded-triton
