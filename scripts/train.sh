#!/usr/bin/env bash
# Set up (first time only), then run the main job: fine-tune the embedded default model on the
# built-in task with LoRA, evaluate before/after, save the adapter. Extra flags go to `lorakit train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/lorakit train "$@"
