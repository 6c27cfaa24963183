#!/usr/bin/env bash
# Create .venv (Python 3.11) and install coreml-hub with its test extras.
# torch comes first, pinned to the CPU build, so no multi-GB CUDA build is fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import coreml_hub, torch, coremltools, diffusers" >/dev/null 2>&1 || {
  echo "setup failed: coreml-hub's dependencies did not install" >&2; exit 1; }
