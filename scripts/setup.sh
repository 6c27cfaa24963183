#!/usr/bin/env bash
# Create .venv (Python 3.11) and install coreml-hub with its test extras.
# torch comes first, pinned to the CPU build, so no multi-GB CUDA build is fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv with $("$PY" --version)..." >&2
  "$PY" -m venv .venv
fi
. .venv/bin/activate
log=.venv/coreml-hub-install.log
install() {
  python -m pip install "$@" >>"$log" 2>&1 || {
    echo "pip install $* failed; the end of $log:" >&2; tail -n 30 "$log" >&2; exit 1; }
}
: >"$log"
python -c "import torch" 2>/dev/null || { echo "Installing torch==2.13.0 (CPU build)..." >&2; install "torch==2.13.0"; }
echo "Installing coreml-hub and its dependencies..." >&2
install -e ".[test]"
python -c "import coreml_hub, torch, coremltools, diffusers, transformers" >/dev/null 2>&1 || {
  echo "setup failed: coreml-hub's dependencies do not import (see $log)" >&2; exit 1; }
