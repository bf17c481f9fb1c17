#!/usr/bin/env bash
# Set up llmarch on a fresh machine: a virtual environment in .venv with the CPU build of
# PyTorch (installed first, so that no multi-GB CUDA build is pulled in), llmarch itself and,
# with --test, the test dependencies (transformers as the reference oracle, the second real
# checkpoint, and Chromium for the report's browser test).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
if [ "${1:-}" = "--test" ]; then
  python -m pip install -q -e ".[test]"
  if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "setup: chromium not installed; the browser test will be skipped" >&2
  fi
else
  python -m pip install -q -e .
fi
