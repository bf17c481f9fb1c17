#!/usr/bin/env bash
# Set up llmarch on a fresh machine: a virtual environment in .venv with PyTorch installed
# first, llmarch itself and, with --test, the test dependencies (transformers as the reference
# oracle, the second real checkpoint, the openai client, and Chromium for the report's browser test).
#
#   scripts/setup.sh [--test] [--cuda]
#
# PyTorch: the CPU build from PyTorch's CPU wheel index where that index is reachable (the
# default index's Linux wheel is the multi-GB CUDA build), else from the default index (a local
# wheel or pip's configured index); --cuda installs the CUDA build from the default index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=torch==2.13.0
CPU_INDEX=https://download.pytorch.org/whl/cpu
TEST=0 CUDA=0
for arg in "$@"; do
  case "$arg" in
    --test) TEST=1 ;;
    --cuda) CUDA=1 ;;
    *) echo "setup: unknown option $arg (expected --test and/or --cuda)" >&2; exit 2 ;;
  esac
done
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" 2>/dev/null; then
  if [ "$CUDA" = 1 ]; then
    python -m pip install -q "$TORCH"
  elif python -c "import urllib.request; urllib.request.urlopen('$CPU_INDEX/', timeout=5)" 2>/dev/null \
      && python -m pip install -q "$TORCH" --index-url "$CPU_INDEX"; then
    :
  else
    echo "setup: PyTorch's CPU index is unreachable; installing $TORCH from the default index" >&2
    python -m pip install -q "$TORCH"
  fi
fi
if [ "$TEST" = 1 ]; then
  python -m pip install -q -e ".[test]"
  if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "setup: chromium not installed; the browser test will be skipped" >&2
  fi
else
  python -m pip install -q -e .
fi
